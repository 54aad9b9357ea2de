"""``repo_observer.py notify``: what a git hook runs on every push, so it
starts in milliseconds.  It imports only the wire protocol (``wire.py``,
and ``credentials.py`` to read its key) and the bare ``_socket``: no argparse, TLS, logging or server code, and
hashing only when a secret is given.  With any other flag (a TLS flag,
``--help``, a typo) it hands over to the full client in
``ci/client_cli.py``, which knows and explains every flag.

Start it with ``python -S`` (no site-packages: a ``.pth`` file there can
cost more than the whole notify).
"""

from __future__ import annotations

import _socket
import sys

from ci import credentials, wire

PROG = "repo_observer.py notify"  # what it is, whichever script started it
DESCRIPTION = ("Wake a running observer so it polls now (use in a post-receive or "
               "post-commit hook).")
DEFAULT_OBSERVER = "localhost:8887"


def full_client(argv) -> int:
    from ci import client_cli
    return client_cli.client_main(client_cli.ClientCommand(
        PROG, DESCRIPTION, "notify", "--observer", DEFAULT_OBSERVER, server_role="observer"),
        argv)


def connect(address: tuple[str, int], timeout: float):
    """``socket.create_connection`` without the socket module (whose enums
    and selectors cost the hook more than everything else it does)."""
    error: OSError | None = None
    host, port = address
    # A str host is encoded with the "idna" codec, whose import (with re,
    # stringprep and unicodedata) cost the hook about 20 ms; an ASCII name
    # or address needs none of it.
    if host.isascii():
        host = host.encode("ascii")
    for family, kind, proto, _, sockaddr in _socket.getaddrinfo(host, port, 0,
                                                                _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError(f"no address for {address[0]}")


# The flags a hook uses, read without argparse (which alone costs more
# than the rest of the hook); any other flag goes to the full client.
FAST_FLAGS = {"--observer": str, "--timeout": float, "--secret-file": str,
              "--auth-window": float, "--log-level": str}


def fast_flags(argv: list[str]) -> dict | None:
    """The flags as a dict, or None when the full client must read them."""
    found: dict = {}
    items = iter(argv)
    for arg in items:
        name, sep, value = arg.partition("=")
        if name not in FAST_FLAGS:
            return None
        if not sep:
            value = next(items, None)
            if value is None:
                return None
        try:
            found[name] = FAST_FLAGS[name](value)
        except ValueError:
            return None
        if FAST_FLAGS[name] is float and not 0 < found[name] <= 1e8:
            return None     # nan, inf, 0, negative, absurd: the full client explains
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = fast_flags(argv)
    if flags is None:  # --help, TLS flags, or anything to explain
        return full_client(argv)
    observer = flags.get("--observer", DEFAULT_OBSERVER)
    timeout = flags.get("--timeout", wire.DEFAULT_CONNECT_TIMEOUT)
    try:
        address = wire.parse_address(observer)
        # Read by ci/credentials.py, not ``helpers``: importing that pulls in ssl,
        # logging and the server code, about 0.1 s on every push.
        signed_with = credentials.read_credentials(flags.get("--secret-file"))
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = connect(address, timeout)
        try:
            reply = wire.request(sock, "notify", credentials=signed_with, limits=wire.Limits(
                timeout, window=flags.get("--auth-window", wire.DEFAULT_AUTH_WINDOW)))
        finally:
            sock.close()
    except (OSError, wire.ProtocolError) as exc:
        print(f"{PROG}: {observer} unreachable: {exc}", file=sys.stderr)
        return 1
    if reply.command != "ok":
        print(f"{PROG}: refused: {reply.command} {reply.argument}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
