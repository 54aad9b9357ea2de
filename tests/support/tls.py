"""Throwaway certificate authorities for the TLS tests (made with the
openssl command), and a client context that presents what a test says."""

from __future__ import annotations

import os
import ssl
import subprocess


def _openssl(cwd, *args) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60,
                   stdin=subprocess.DEVNULL)


def make_ca(folder, name: str) -> dict[str, str]:
    """A throwaway CA and one certificate it signed, usable as server and
    client certificate."""
    os.makedirs(folder, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(folder, "req", "-x509", *key, "-keyout", f"{name}-ca.key", "-out",
             f"{name}-ca.pem", "-days", "2", "-subj", f"/CN={name} test CA")
    _openssl(folder, "req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name} node")
    with open(os.path.join(folder, f"{name}.ext"), "w") as handle:
        handle.write("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                     "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem",
             "-CAkey", f"{name}-ca.key", "-CAcreateserial", "-out", f"{name}.pem",
             "-days", "2", "-extfile", f"{name}.ext")
    return {what: os.path.join(folder, f"{name}{suffix}") for what, suffix in
            (("cert", ".pem"), ("key", ".key"), ("ca", "-ca.pem"))}


def make_role_certs(folder, roles: list[str], ca_name: str = "roles") -> dict:
    """One CA and a certificate per common name (``dispatcher``,
    ``runner-r1``, ``observer``...), as README's recipe makes them:
    v3, with the key usages a peer that both serves and calls needs."""
    os.makedirs(folder, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(folder, "req", "-x509", *key, "-keyout", f"{ca_name}-ca.key", "-out",
             f"{ca_name}-ca.pem", "-days", "2", "-subj", f"/CN={ca_name} CA")
    with open(os.path.join(folder, "v3.ext"), "w") as handle:
        handle.write("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                     "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
    made = {}
    for cn in roles:
        _openssl(folder, "req", *key, "-keyout", f"{cn}.key", "-out", f"{cn}.csr",
                 "-subj", f"/CN={cn}")
        _openssl(folder, "x509", "-req", "-in", f"{cn}.csr", "-CA", f"{ca_name}-ca.pem",
                 "-CAkey", f"{ca_name}-ca.key", "-CAcreateserial", "-out", f"{cn}.pem",
                 "-days", "2", "-extfile", "v3.ext")
        made[cn] = ["--tls-cert", os.path.join(folder, f"{cn}.pem"), "--tls-key",
                    os.path.join(folder, f"{cn}.key"), "--tls-ca",
                    os.path.join(folder, f"{ca_name}-ca.pem")]
    return made


def client_context(cert=None, key=None, ca=None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if ca:
        context.load_verify_locations(ca)
    else:
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context
