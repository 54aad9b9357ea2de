"""``repo_observer.py notify``: what a git hook runs on every push, so it
starts in milliseconds.  It imports only the wire protocol (``wire.py``),
argparse and socket: no TLS, logging or server code, and hashing only
when a secret is given.  With a TLS flag (or ``--help``) it hands over to
the full client in ``helpers``, which knows every flag.

Start it with ``python -S`` (no site-packages: a ``.pth`` file there can
cost more than the whole notify).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import wire

PROG = "repo_observer.py notify"
DESCRIPTION = ("Wake a running observer so it polls now (use in a post-receive or "
               "post-commit hook).")
DEFAULT_OBSERVER = "localhost:8887"


def full_client(argv) -> int:
    import helpers
    return helpers.client_main(PROG, DESCRIPTION, "notify", "--observer", DEFAULT_OBSERVER,
                               argv, server_role="observer")


def read_secret(path: str | None) -> tuple[bytes | None, str | None]:
    """The secret or issued key, as ``helpers.load_credentials`` reads it,
    but without importing ``helpers``: that pulls in ssl, logging and the
    server code, about 0.1 s on every push of a deployment with a secret.
    ValueError with the reason for an unreadable or malformed one."""
    if path:
        try:
            with open(path, "rb") as handle:
                secret = handle.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
        if not secret:
            raise ValueError(f"secret file {path} is empty")
    else:
        secret = os.environ.get("CI_SECRET", "").strip().encode()
        if not secret:
            return None, None
    if secret.startswith(b"ci-key-v1 "):
        import auth  # hashing only
        try:
            key_id, key = auth.parse_key_file(secret)
        except ValueError as exc:
            raise ValueError(f"{path or 'CI_SECRET'}: {exc}") from None
        return key, key_id
    return secret, None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.startswith("--tls") or a in ("-h", "--help") for a in argv):
        return full_client(argv)
    # The flags a hook uses; every other flag of the full client is
    # accepted too, and handed over to it.
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    parser.add_argument("--observer", default=DEFAULT_OBSERVER)
    parser.add_argument("--timeout", type=float, default=wire.DEFAULT_CONNECT_TIMEOUT)
    parser.add_argument("--secret-file")
    parser.add_argument("--auth-window", type=float, default=wire.DEFAULT_AUTH_WINDOW)
    parser.add_argument("--log-level", default="INFO")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        return full_client(argv)
    try:
        address = wire.parse_address(args.observer)
        secret, key_id = read_secret(args.secret_file)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        with socket.create_connection(address, timeout=args.timeout) as sock:
            reply = wire.request(sock, "notify", secret=secret, key_id=key_id,
                                 timeout=args.timeout, window=args.auth_window)
    except (OSError, wire.ProtocolError) as exc:
        print(f"{PROG}: {args.observer} unreachable: {exc}", file=sys.stderr)
        return 1
    if reply.command != "ok":
        print(f"{PROG}: refused: {reply.command} {reply.argument}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
