"""TLS certificate roles (issue 8): the certificate's common name is the
role.  A runner's certificate cannot pose as the dispatcher, the dashboard
wants the dispatcher's, roles at the dispatcher (with and without keys),
refused handshakes logged and probes quiet, plain and busy ports named;
TLS with issued keys tests a commit end to end."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading

import pytest

from ci import auth
import helpers
from support.cluster import PY, ROOT, wait_until
from ci.security import Security, make_tls_contexts
from ci.wire import Message, ProtocolError, encode_frame
from support.tls import client_context, make_role_certs
from support.privilege import (C1, C2, C3, LOOPBACK, MASTER, ask, git_head, key_security, warnings,
    write_secret)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="needs the openssl command")


@pytest.fixture(scope="module")
def role_certs(tmp_path_factory):
    return make_role_certs(tmp_path_factory.mktemp("tls"), [
        "dispatcher", "observer", "runner-r1", "runner-r2", "operator-op", "viewer-v"])


def tls_security(certs, cn: str, expect: str | None = "dispatcher",
                 **kwargs) -> Security:
    args = certs[cn]
    server, client = make_tls_contexts(args[1], args[3], args[5])
    return Security(server_tls=server, client_tls=client, tls_server_role=expect,
                            **kwargs)


class Recorder:
    """An in-process server that records every command it is sent."""

    def __init__(self, security: Security):
        self.seen: list[str] = []
        commands = {name: self.record for name in ("register", "dispatch", "notify",
                                                    "results", "status")}
        self.server = helpers.MessageServer((LOOPBACK, 0), commands, security)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def record(self, message, peer):
        self.seen.append(message.command)
        return Message("ok")

    def close(self):
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()


@needs_openssl
def test_a_runner_certificate_cannot_pose_as_the_dispatcher(cluster, role_certs, upstream):
    fake = Recorder(tls_security(role_certs, "runner-r2", expect=None))
    cluster.closers.append(fake)
    cluster.dispatcher_port = fake.port   # runner and observer call the fake
    runner = cluster.start_runner(*role_certs["runner-r1"])
    observer = cluster.start_observer(*role_certs["observer"], "--no-listen", wait=False)
    expected = "presented a certificate for role 'runner', not 'dispatcher'"
    wait_until(lambda: expected in runner.log() and expected in observer.log(), 15,
               what="runner and observer refusing the fake dispatcher")
    assert any(expected in w for w in warnings(runner))
    # The hook client, too, wants the observer and gets told who answered.
    notify = subprocess.run([PY, os.path.join(ROOT, "repo_observer.py"), "notify",
                             "--observer", f"{LOOPBACK}:{fake.port}",
                             *role_certs["observer"]], capture_output=True, text=True,
                            timeout=20)
    assert notify.returncode == 1
    assert "presented a certificate for role 'runner', not 'observer'" in notify.stderr
    assert fake.seen == []   # nothing was ever sent to the impostor
    # And the runner accepts work only from a dispatcher's certificate.
    impostor = tls_security(role_certs, "runner-r2", expect="runner")
    reply = helpers.call((LOOPBACK, runner.port), "runtest", f"{C1} {'0' * 32}",
                         security=impostor, timeout=3)
    assert reply == Message("error", "certificate role 'runner' not accepted here")
    wait_until(lambda: any("has a certificate for role 'runner'; refused" in w
                           for w in warnings(runner)), 5, what="refusal logged")
    assert "accepted" not in runner.log()


@needs_openssl
def test_the_dashboard_wants_the_dispatchers_certificate(role_certs, tmp_path):
    import dashboard
    fake = Recorder(tls_security(role_certs, "runner-r2", expect=None))
    try:
        (tmp_path / "results").mkdir()
        args = dashboard.build_parser().parse_args([
            "--host", LOOPBACK, "--port", "0", "--results-dir", str(tmp_path / "results"),
            "--dispatcher-server", f"{LOOPBACK}:{fake.port}", *role_certs["viewer-v"]])
        server = dashboard.make_server(args)
        try:
            state, error = server.app.live.state()
        finally:
            server.server_close()
        assert state is None
        assert "presented a certificate for role 'runner', not 'dispatcher'" in error, error
        assert fake.seen == []
    finally:
        fake.close()


@needs_openssl
def test_certificate_roles_at_the_dispatcher(cluster, role_certs, tmp_path):
    disp = cluster.start_dispatcher(*role_certs["dispatcher"], "--secret-file",
                                    write_secret(tmp_path / "master", MASTER))
    port = cluster.dispatcher_port

    def as_(cn, **kwargs):
        return tls_security(role_certs, cn, **kwargs)
    # Even with the master secret, a runner's certificate is a runner.
    reply = ask(port, "dispatch", C1, security=as_("runner-r1", secret=MASTER))
    assert reply == Message("error", "dispatch is not allowed for role runner")
    reply = ask(port, "dispatch", C1, security=as_("viewer-v", secret=MASTER))
    assert reply == Message("error", "dispatch is not allowed for role viewer")
    assert ask(port, "status", security=as_("viewer-v", secret=MASTER)).command == "ok"
    assert ask(port, "dispatch", C1, security=as_("observer", secret=MASTER)) == \
        Message("ok", "queued 1")
    assert ask(port, "retest", C2, security=as_("operator-op", secret=MASTER)) == \
        Message("ok", "queued 1")
    # With an issued key too, key and certificate must name the same role.
    viewer_key = key_security("viewer", "v")
    assert ask(port, "state", security=as_("viewer-v", secret=viewer_key.secret,
                                           key_id=viewer_key.key_id)).command == "ok"
    observer_key = key_security("observer", "obs")
    reply = ask(port, "dispatch", C3, security=as_("runner-r1", secret=observer_key.secret,
                                                   key_id=observer_key.key_id))
    assert reply == Message("error", "key role observer does not match certificate role "
                                     "runner")
    # The dispatcher's own certificate is no client's.
    with pytest.raises((OSError, ProtocolError)):
        ask(port, "status", security=as_("dispatcher", secret=MASTER))
    assert any("has a certificate for role 'dispatcher'; refused" in w
               for w in warnings(disp))
    state = json.loads(ask(port, "state", security=as_("viewer-v", secret=MASTER)).body)
    assert [q["commit"] for q in state["queue"]] == [C1, C2]

    # A client without a certificate: refused at WARNING, with its address.
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        where = f"{LOOPBACK}:{raw.getsockname()[1]}"
        try:
            with client_context(ca=role_certs["dispatcher"][5]).wrap_socket(raw) as tls:
                tls.sendall(encode_frame(b"status", MASTER))
                tls.recv(100)
        except (OSError, ssl.SSLError):
            pass
    wait_until(lambda: any(f"TLS handshake with {where} refused" in w
                           for w in warnings(disp)), 5, what="the refused handshake logged")
    # A port probe (connect, close) is not worth a warning.
    with socket.create_connection((LOOPBACK, port), timeout=5) as probe:
        probed = f"{LOOPBACK}:{probe.getsockname()[1]}"
    wait_until(lambda: f"{probed} closed before the TLS handshake" in disp.log(), 5,
               what="the probe noticed")
    assert not any(probed in w for w in warnings(disp))


@needs_openssl
def test_tls_clients_are_told_about_plain_ports_and_busy_servers(cluster, role_certs,
                                                                  threaded_servers):
    from support.cluster import ThreadedServer
    plain = threaded_servers(ThreadedServer, {"status": lambda m, p: Message("ok")})
    with pytest.raises(ProtocolError, match="does not speak TLS"):
        helpers.call((LOOPBACK, plain.port), "status",
                     security=tls_security(role_certs, "viewer-v"), timeout=3)
    # At the connection cap the refusal comes after the handshake: readable.
    cluster.start_dispatcher(*role_certs["dispatcher"], "--max-connections", "1",
                             "--read-timeout", "5")
    held: list[socket.socket] = []

    def busy():
        # An idle connection holds the one slot (the first may race the
        # start-up port probe for it: then the next one holds it).
        held.append(socket.create_connection((LOOPBACK, cluster.dispatcher_port), timeout=5))
        reply = helpers.call((LOOPBACK, cluster.dispatcher_port), "status",
                             security=tls_security(role_certs, "viewer-v"), timeout=3)
        return reply.command == "busy" and reply
    try:
        reply = wait_until(busy, 5, interval=0.1, what="a busy reply over TLS")
    finally:
        for sock in held:
            sock.close()
    assert "busy" in reply.argument


@needs_openssl
def test_tls_with_issued_keys_tests_a_commit_end_to_end(cluster, role_certs, upstream,
                                                        tmp_path):
    """README's deployment: the dispatcher with the master secret, the
    runner and the observer each with an issued key and a certificate of
    their role.  The dispatcher calls the runner signed with the runner's
    key over its own certificate, which the runner must accept."""
    master = write_secret(tmp_path / "master", MASTER)
    runner_key = write_secret(tmp_path / "r1.key", auth.format_key_file(
        "runner", "r1", MASTER).encode())
    observer_key = write_secret(tmp_path / "obs.key", auth.format_key_file(
        "observer", "obs", MASTER).encode())
    cluster.start_dispatcher(*role_certs["dispatcher"], "--secret-file", master)
    runner = cluster.start_runner(*role_certs["runner-r1"], "--secret-file", runner_key)
    cluster.start_observer(*role_certs["observer"], "--secret-file", observer_key,
                           "--no-listen", wait=False)
    result = cluster.result(git_head(upstream), 30)
    assert result["verdict"] == "passed", result
    assert "does not match" not in runner.log()
