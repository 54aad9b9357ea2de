"""Shared plumbing of the three daemons: wire protocol, authentication, the
server base class, the client call and small utilities (the result file
formats are in ``results.py``).

Everything that crosses a socket goes through ``encode_frame`` /
``decode_header`` so that framing, size limits and message authentication
are decided in one place and can be tested without sockets.

Wire format (one request and one reply per TCP connection)::

    CI1 <length> <timestamp> <nonce> <tag>[ <key id>]\\n<payload: exactly <length> bytes>

``tag`` is ``-`` when no secret is configured, else the hex HMAC-SHA256 of
the timestamp, nonce, the nonce of the request being answered (replies
only), the key id (when there is one) and the payload.  The key id names
the issued key a frame is signed with (``runner:r1``; see ``auth.py``);
without one the frame is signed with the shared secret.  The payload starts with an ASCII command line
(``name`` or ``name:argument``), optionally followed by ``\\n`` and a body
of arbitrary bytes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger(__name__)

MAGIC = b"CI1"
# A header line is short; anything longer is not our protocol.
MAX_HEADER_BYTES = 200
# Large enough for a long test log; a bigger result is truncated by the runner.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
# Message bytes all connections of a daemon may hold at once.
DEFAULT_MAX_BUFFERED = 64 * 1024 * 1024
# A peer that sends nothing for this long is dropped.
DEFAULT_READ_TIMEOUT = 10.0
# A body must arrive at least this fast, so a dribbling client is cut off.
MIN_BODY_RATE = 256 * 1024
# Enough threads for hundreds of runners, few enough to bound memory.
DEFAULT_MAX_CONNECTIONS = 256
# How far a signed message's clock may be from ours, in seconds.
DEFAULT_AUTH_WINDOW = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0

# Room for a batch of a thousand 64-hex commit ids on one command line.
MAX_COMMAND_LINE = 66 * 1024

COMMIT_RE = re.compile(r"[0-9a-f]{4,64}")
FULL_COMMIT_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
COMMAND_RE = re.compile(r"[a-z_]{1,32}")

VERDICTS = ("passed", "failed", "error", "timeout")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ProtocolError(Exception):
    """Raised for anything on the wire that is not a well-formed, authentic
    message.  The only exception framing and parsing code may raise."""


class ReadTimeout(ProtocolError):
    """The peer sent too little, too slowly: nothing more is worth reading."""


class PeerClosed(ProtocolError):
    """The peer hung up before a whole frame arrived (port probes do)."""


class Busy(ProtocolError):
    """Refused for now (too much in flight): the peer should retry later."""


class NoRequest(PeerClosed):
    """Connected and closed at once: a port probe, not a protocol error."""


class ConfigError(Exception):
    """A bad flag or path: reported as one line and a non-zero exit."""


# --------------------------------------------------------------------------
# Validation of values that come from the network or the command line.

def valid_commit(text: str) -> bool:
    return isinstance(text, str) and COMMIT_RE.fullmatch(text) is not None


def valid_full_commit(text: str) -> bool:
    return isinstance(text, str) and FULL_COMMIT_RE.fullmatch(text) is not None


def parse_address(text: str, default_host: str = "localhost") -> tuple[str, int]:
    """Parse ``host:port`` (or ``[v6]:port``); ValueError with a clear text."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise ValueError(f"invalid address {text!r}: expected host:port")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"invalid address {text!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or default_host
    if not re.fullmatch(r"[A-Za-z0-9.\-_:%]+", host):
        raise ValueError(f"invalid host in address {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in address {text!r}: expected 1-65535")
    return host, int(port)


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------
# Messages: the payload inside a frame.  Pure functions.

@dataclasses.dataclass(frozen=True)
class Message:
    command: str
    argument: str = ""
    body: bytes = b""


def encode_message(command: str, argument: str = "", body: bytes = b"") -> bytes:
    if not COMMAND_RE.fullmatch(command):
        raise ProtocolError(f"invalid command name {command!r}")
    if any(c in argument for c in "\r\n\0") or not argument.isascii():
        raise ProtocolError("argument must be one line of ASCII")
    line = command + (":" + argument if argument else "")
    return line.encode("ascii") + (b"\n" + body if body else b"")


def decode_message(payload: bytes) -> Message:
    """Split a payload into command, argument and body.

    The command line must be printable ASCII; the body is opaque bytes, so
    test output that looks like a command can never be taken for one."""
    line, _, body = payload.partition(b"\n")
    if len(line) > MAX_COMMAND_LINE:
        raise ProtocolError("command line too long")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("command line is not ASCII") from None
    if not text.isprintable():
        raise ProtocolError("command line has control characters")
    command, _, argument = text.partition(":")
    if not COMMAND_RE.fullmatch(command):
        raise ProtocolError(f"malformed command {command[:40]!r}")
    return Message(command, argument, body)


def encode_fields(fields: dict) -> bytes:
    """``key: value`` lines; values are flattened to one printable line."""
    out = []
    for key, value in fields.items():
        out.append(f"{key}: {one_line(str(value))}")
    return ("\n".join(out) + "\n").encode("utf-8")


def decode_fields(data: bytes, max_fields: int = 64) -> dict[str, str]:
    """Parse ``key: value`` lines (UTF-8); ProtocolError if malformed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("fields are not UTF-8") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition(": ")
        # Digits allowed after the first character: the observer's status
        # numbers its branches (branch_0, branch_1, ...).
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]{0,31}", key):
            raise ProtocolError(f"malformed field line {line[:60]!r}")
        if len(fields) >= max_fields:
            raise ProtocolError("too many fields")
        fields[key] = value
    return fields


def one_line(text: str, limit: int = 1000) -> str:
    """Make untrusted text safe for a one-line header value."""
    if not text.isprintable():  # the usual case skips the per-character pass
        text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text[:limit]


def ascii_line(text: str, limit: int = 300) -> str:
    """Untrusted text (often quoting the peer's input) made fit for a reply's
    ASCII command line; otherwise the reply could not be encoded at all and
    the peer would get a silently closed connection instead of the reason."""
    return one_line(text, limit).encode("ascii", "backslashreplace").decode("ascii")


# --------------------------------------------------------------------------
# Frames: length prefix plus authentication.  Pure functions.

def _mac(secret: bytes, ts: bytes, nonce: bytes, reply_to: bytes, payload: bytes,
         key_id: bytes = b"") -> str:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (MAGIC, ts, nonce, reply_to):
        mac.update(part + b"\n")
    if key_id:
        mac.update(b"key " + key_id + b"\n")
    mac.update(payload)
    return mac.hexdigest()


KEY_ID_RE = re.compile(rb"[a-z]{1,16}:[A-Za-z0-9._-]{1,64}")


def encode_frame(payload: bytes, secret: bytes | None = None, *, reply_to: str = "",
                 now: float | None = None, nonce: str | None = None,
                 key_id: str | None = None) -> bytes:
    ts = b"%.3f" % (time.time() if now is None else now)
    nonce_b = (nonce or secrets.token_hex(12)).encode("ascii")
    kid = key_id.encode("ascii") if key_id and secret else b""
    tag = _mac(secret, ts, nonce_b, reply_to.encode("ascii"), payload, kid) if secret else "-"
    header = b"%s %d %s %s %s%s\n" % (MAGIC, len(payload), ts, nonce_b, tag.encode("ascii"),
                                      b" " + kid if kid else b"")
    return header + payload


@dataclasses.dataclass(frozen=True)
class FrameHeader:
    length: int
    timestamp: str
    nonce: str
    tag: str
    key_id: str | None = None


def decode_header(line: bytes, max_message: int = DEFAULT_MAX_MESSAGE) -> FrameHeader:
    """Parse a frame's header line (without the newline)."""
    parts = line.split(b" ")
    if len(parts) not in (5, 6) or parts[0] != MAGIC:
        raise ProtocolError("not a CI1 frame")
    key_id = None
    if len(parts) == 6:
        if not KEY_ID_RE.fullmatch(parts[5]):
            raise ProtocolError("bad frame key id")
        key_id = parts.pop().decode("ascii")
    length, ts, nonce, tag = parts[1:]
    if not length.isdigit() or len(length) > 12:
        raise ProtocolError("bad frame length")
    if int(length) > max_message:
        raise ProtocolError(f"message of {int(length)} bytes exceeds the limit of {max_message}")
    if not re.fullmatch(rb"\d{1,12}(\.\d{1,6})?", ts):
        raise ProtocolError("bad frame timestamp")
    if not re.fullmatch(rb"[0-9a-f]{8,64}", nonce):
        raise ProtocolError("bad frame nonce")
    if not (tag == b"-" or re.fullmatch(rb"[0-9a-f]{64}", tag)):
        raise ProtocolError("bad frame tag")
    return FrameHeader(int(length), ts.decode(), nonce.decode(), tag.decode(), key_id)


class NonceCache:
    """Remembers nonces seen within the auth window so a captured message
    cannot be replayed.  Bounded: entries older than the window are dropped."""

    def __init__(self, window: float = DEFAULT_AUTH_WINDOW, limit: int = 200_000):
        self.window = window
        self.limit = limit
        self._lock = threading.Lock()
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, nonce: str, now: float) -> bool:
        """Record ``nonce``; False if it was already seen."""
        with self._lock:
            while self._seen:
                oldest, when = next(iter(self._seen.items()))
                if when >= now - 2 * self.window and len(self._seen) < self.limit:
                    break
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


def verify_frame(header: FrameHeader, payload: bytes, secret: bytes | None, *,
                 reply_to: str = "", nonces: NonceCache | None = None,
                 window: float = DEFAULT_AUTH_WINDOW, now: float | None = None) -> None:
    """Check a frame's tag, age and nonce; ProtocolError if any is wrong.

    Without a secret nothing is checked (the daemons then listen on loopback
    only, unless the operator said ``--insecure``)."""
    if not secret:
        return
    if header.tag == "-":
        raise ProtocolError("unsigned message refused")
    expected = _mac(secret, header.timestamp.encode(), header.nonce.encode(),
                    reply_to.encode("ascii"), payload,
                    header.key_id.encode("ascii") if header.key_id else b"")
    if not hmac.compare_digest(expected, header.tag):
        raise ProtocolError("bad signature")
    now = time.time() if now is None else now
    if abs(now - float(header.timestamp)) > window:
        raise ProtocolError("stale message (timestamp outside the window)")
    if nonces is not None and not nonces.add(header.nonce, now):
        raise ProtocolError("replayed message")


# --------------------------------------------------------------------------
# Reading a frame from a socket, with size and time limits.

# What one recv may take while looking for the header's end: usually the
# whole of a small message arrives with it.
FIRST_READ = 64 * 1024


def _recv_some(sock: socket.socket, limit: int, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ReadTimeout("timed out reading message")
    sock.settimeout(remaining)
    try:
        chunk = sock.recv(limit)
    except socket.timeout:
        raise ReadTimeout("timed out reading message") from None
    if not chunk:
        raise PeerClosed("connection closed mid-message")
    return chunk


def _recv_exact(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks = []
    while count:
        chunk = _recv_some(sock, min(count, 1 << 20), deadline)
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


class ByteBudget:
    """Caps the message bytes all connections hold at once, so that
    ``--max-connections`` x ``--max-message-size`` cannot exhaust memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> bool:
        with self._lock:
            if self.used + count > self.limit:
                return False
            self.used += count
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self.used -= count


def read_frame(sock: socket.socket, max_message: int = DEFAULT_MAX_MESSAGE,
               timeout: float = DEFAULT_READ_TIMEOUT,
               budget: ByteBudget | None = None) -> tuple[FrameHeader, bytes]:
    """Read one frame: the header line (a peer that never ends it is cut at
    ``MAX_HEADER_BYTES``), then exactly the body.

    The header is read in chunks, not byte by byte (a system call per byte
    was the dispatcher's main cost under load).  What follows the newline is
    the body's start; each side sends one frame per connection, so no later
    message can be swallowed, and bytes past the frame are dropped."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        newline = data.find(b"\n", 0, MAX_HEADER_BYTES + 1)
        if newline >= 0:
            break
        if len(data) > MAX_HEADER_BYTES:
            raise ProtocolError("header line too long: not a CI1 frame")
        if not MAGIC.startswith(data[:len(MAGIC)]):
            raise ProtocolError("not a CI1 frame")
        try:
            data += _recv_some(sock, FIRST_READ, deadline)
        except PeerClosed:
            if not data:
                raise NoRequest("closed without sending anything") from None
            raise
    parsed = decode_header(data[:newline], max_message)
    if budget is not None and not budget.take(parsed.length):
        raise Busy("server busy (too much data in flight), try later")
    try:
        body_deadline = time.monotonic() + timeout + parsed.length / MIN_BODY_RATE
        start = data[newline + 1:newline + 1 + parsed.length]
        return parsed, start + _recv_exact(sock, parsed.length - len(start), body_deadline)
    except BaseException:
        if budget is not None:
            budget.give(parsed.length)
        raise


# --------------------------------------------------------------------------
# Security settings shared by clients and servers.

@dataclasses.dataclass
class Security:
    secret: bytes | None = None
    window: float = DEFAULT_AUTH_WINDOW
    server_tls: ssl.SSLContext | None = None
    client_tls: ssl.SSLContext | None = None
    max_message: int = DEFAULT_MAX_MESSAGE
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_buffered: int = DEFAULT_MAX_BUFFERED
    nonces: NonceCache = dataclasses.field(default_factory=NonceCache)
    # The issued key's id (``runner:r1``) when ``secret`` is one; None for
    # a shared secret.
    key_id: str | None = None
    # Server side: maps a frame's key id to (key, role, name) or None; by
    # default only ``secret`` itself is accepted (see auth.py).
    keyring: object | None = None
    # TLS roles (a certificate's common name, see auth.cert_role): what a
    # server accepts as clients, and what a client expects the server to be.
    tls_client_roles: frozenset | None = None
    tls_server_role: str | None = None

    def lookup(self, key_id: str | None):
        """(key, role, name) to check a frame with; None to refuse it."""
        if self.keyring is not None:
            return self.keyring.lookup(key_id)
        if key_id is not None and key_id != self.key_id:
            return None
        if self.key_id:
            role, _, name = self.key_id.partition(":")
            return self.secret, role, name
        return self.secret, "admin", None

    def signed_as(self, secret: bytes | None, key_id: str | None) -> "Security":
        """The same settings, signing with another key (the dispatcher
        calling a runner signs with that runner's key)."""
        return dataclasses.replace(self, secret=secret, key_id=key_id)


def load_secret(path: str | None) -> bytes | None:
    """The cluster secret: ``--secret-file`` wins over ``CI_SECRET``."""
    return load_credentials(path)[0]


def load_credentials(path: str | None) -> tuple[bytes | None, str | None]:
    """(secret, key id) from ``--secret-file`` or ``CI_SECRET``: an issued
    key file (``ci-key-v1 role:name hex``) or a plain shared secret."""
    if path:
        try:
            with open(path, "rb") as handle:
                secret = handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"secret file {path} is empty")
    else:
        secret = os.environ.get("CI_SECRET", "").strip().encode()
        if not secret:
            return None, None
    if secret.startswith(b"ci-key-v1 "):
        import auth
        try:
            key_id, key = auth.parse_key_file(secret)
        except ValueError as exc:
            raise ConfigError(f"{path or 'CI_SECRET'}: {exc}") from None
        return key, key_id
    return secret, None


def make_tls_contexts(cert: str | None, key: str | None, ca: str | None):
    """Build (server, client) contexts.  With a CA, both sides verify the
    peer against it: mutual TLS, so a stranger cannot even connect."""
    if not (cert or key or ca):
        return None, None
    if not (cert and key and ca):
        raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        server.load_verify_locations(ca)
        server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_cert_chain(cert, key)
        client.load_verify_locations(ca)
        # Peers are addressed by IP or by whatever name the operator used;
        # trust comes from the private CA, not from the host name.
        client.check_hostname = False
        client.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc}") from None
    return server, client


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a wrong flag is one line (not the whole usage block)
    followed by exit status 2, like every other start-up error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_common_arguments(parser: argparse.ArgumentParser, server: bool = True) -> None:
    """Flags every process shares: logging, secret, TLS and input limits
    (the listening-side ones only where something listens)."""
    group = parser.add_argument_group("security and limits")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold for stderr (default: %(default)s)")
    group.add_argument("--secret-file", metavar="PATH",
                       help="file holding the cluster's shared secret; every message is "
                            "HMAC-signed with it (default: $CI_SECRET, else none)")
    if server:
        group.add_argument("--insecure", action="store_true",
                           help="allow binding to a non-loopback address without a secret")
    group.add_argument("--tls-cert", metavar="PEM", help="this process's TLS certificate")
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    group.add_argument("--tls-ca", metavar="PEM",
                       help="CA that signed every peer's certificate (enables mutual TLS)")
    group.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE,
                       metavar="BYTES",
                       help="largest message accepted (default: %(default)s)")
    group.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                       metavar="SECONDS",
                       help="drop a connection that sends nothing for this long "
                            "(default: %(default)s)")
    if server:
        group.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                           help="connections served at once; more are refused "
                                "(default: %(default)s)")
        group.add_argument("--max-buffered", type=int, default=DEFAULT_MAX_BUFFERED,
                           metavar="BYTES",
                           help="message bytes held at once over all connections; beyond "
                                "it senders are told to retry (default: %(default)s)")
    group.add_argument("--auth-window", type=float, default=DEFAULT_AUTH_WINDOW,
                       metavar="SECONDS",
                       help="accepted clock difference for signed messages "
                            "(default: %(default)s)")


def security_from_args(args: argparse.Namespace) -> Security:
    for name in ("max_message_size", "max_connections", "max_buffered"):
        if getattr(args, name, 1) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.read_timeout <= 0 or args.auth_window <= 0:
        raise ConfigError("--read-timeout and --auth-window must be positive")
    server_tls, client_tls = make_tls_contexts(args.tls_cert, args.tls_key, args.tls_ca)
    secret, key_id = load_credentials(args.secret_file)
    return Security(secret=secret, key_id=key_id, window=args.auth_window,
                    server_tls=server_tls, client_tls=client_tls,
                    max_message=args.max_message_size, read_timeout=args.read_timeout,
                    max_buffered=getattr(args, "max_buffered", DEFAULT_MAX_BUFFERED),
                    nonces=NonceCache(args.auth_window))


def check_bind_allowed(host: str, security: Security, insecure: bool) -> None:
    """Refuse to expose an unauthenticated daemon beyond this machine."""
    if not is_loopback(host) and not security.secret and not insecure:
        raise ConfigError(
            f"refusing to listen on {host} without a secret: anyone who can reach the "
            "port could post verdicts. Give --secret-file (or CI_SECRET), or --insecure.")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format=LOG_FORMAT, stream=sys.stderr)


# --------------------------------------------------------------------------
# Client side: one call = one connection, one request, one reply.

def call(address: tuple[str, int], command: str, argument: str = "", body: bytes = b"",
         security: Security | None = None, timeout: float = DEFAULT_CONNECT_TIMEOUT,
         reply_timeout: float | None = None) -> Message:
    """Send a request and return the verified reply.

    Raises OSError for network trouble and ProtocolError for a malformed or
    unauthentic reply; callers decide whether to retry."""
    security = security or Security()
    payload = encode_message(command, argument, body)
    nonce = secrets.token_hex(12)
    frame = encode_frame(payload, security.secret, nonce=nonce, key_id=security.key_id)
    with socket.create_connection(address, timeout=timeout) as raw:
        sock = raw
        if security.client_tls:
            sock = _client_handshake(security, raw, address)
        try:
            sock.settimeout(timeout + len(frame) / MIN_BODY_RATE)
            sock.sendall(frame)
            header, reply = read_frame(sock, security.max_message,
                                       reply_timeout if reply_timeout is not None else
                                       max(timeout, security.read_timeout))
        finally:
            if sock is not raw:
                sock.close()
    try:
        verify_frame(header, reply, security.secret, reply_to=nonce, window=security.window)
    except ProtocolError as exc:
        # A connection-limit refusal is sent before the request is read, so
        # it cannot be bound to it; quote what the peer said so the operator
        # sees why.  It is only shown, never acted on.
        said = ascii_line(reply[:120].decode("ascii", "replace"), 120)
        raise ProtocolError(f"{exc}; unauthenticated reply {said!r}") from None
    return decode_message(reply)


def _client_handshake(security: Security, raw: socket.socket, address) -> socket.socket:
    """TLS with the errors a person can act on: a plain port, or a server
    whose certificate was made for another role."""
    try:
        sock = security.client_tls.wrap_socket(raw, server_hostname=address[0])
    except ssl.SSLError as exc:
        if "WRONG_VERSION_NUMBER" in str(exc) or "record layer failure" in str(exc):
            raise ProtocolError(f"{format_address(address)} does not speak TLS (a plain "
                                "port? give the same TLS flags to every process)") from None
        raise
    expected = security.tls_server_role
    if expected:
        import auth
        role = auth.cert_role(sock.getpeercert())
        if role != expected:
            sock.close()
            raise ProtocolError(f"{format_address(address)} presented a certificate for "
                                f"role {role!r}, not {expected!r}")
    return sock


def client_main(prog: str, description: str, command: str, flag: str, default: str,
                argv, positional: str | None = None, server_role: str = "dispatcher") -> int:
    """A one-shot command-line client: send ``command`` (with the values of
    ``positional``, if named, as its argument) to the daemon at ``flag``
    and print the reply (for hooks and scripts)."""
    parser = ArgumentParser(prog=prog, description=description)
    if positional:
        parser.add_argument("values", nargs="+", metavar=positional,
                            help=f"one or more {positional.lower()} values")
    parser.add_argument(flag, default=default, metavar="HOST:PORT", dest="target",
                        help="the daemon's address (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                        metavar="SECONDS", help="give up after this long (default: %(default)s)")
    add_common_arguments(parser, server=False)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        address = parse_address(args.target)
        security = security_from_args(args)
        security.tls_server_role = server_role if security.client_tls else None
        argument = " ".join(args.values) if positional else ""
        reply = call(address, command, argument, security=security, timeout=args.timeout)
    except (ValueError, ConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ProtocolError) as exc:
        print(f"{prog}: {args.target} unreachable: {exc}", file=sys.stderr)
        return 1
    if reply.command != "ok":
        print(f"{prog}: refused: {reply.command} {reply.argument}", file=sys.stderr)
        return 1
    sys.stdout.write(reply.body.decode("utf-8", "replace") or
                     (reply.argument + "\n" if reply.argument else ""))
    return 0


# --------------------------------------------------------------------------
# Server side.

class Reply(Exception):
    """Raised by a handler to answer with an error and close."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = ascii_line(text)


class Peer(str):
    """Who sent a request: the address as text (what handlers log), plus
    the role and name its key or certificate proves."""

    role: str = "admin"
    name: str | None = None

    def __new__(cls, address: str, role: str = "admin", name: str | None = None):
        peer = super().__new__(cls, address)
        peer.role, peer.name = role, name
        return peer


class MessageHandler(socketserver.BaseRequestHandler):
    """Reads one frame, checks it, runs the command's handler, replies.

    Whatever the peer sends, the reply is a frame (``ok``, ``busy``, ``error:``
    ...) or a closed connection; no exception escapes to the server loop."""

    def handle(self) -> None:
        server: MessageServer = self.server  # type: ignore[assignment]
        sec = server.security
        peer = format_address(self.client_address[:2]) if self.client_address else "?"
        sock = self.request
        nonce = ""
        unread = False
        reply_key, reply_key_id = sec.secret, None
        try:
            cert_role = None
            if sec.server_tls:
                sock, cert_role = _server_handshake(sec, sock, peer)
                if sock is None:
                    return
            if server.over_capacity:
                raise Busy("server busy, try later")
            header, payload = read_frame(sock, sec.max_message, sec.read_timeout,
                                         server.budget)
            self.held = header.length  # given back to the budget in finish()
            nonce = header.nonce
            role, name = "admin", None
            if sec.secret:
                found = sec.lookup(header.key_id)
                if found is None:
                    raise ProtocolError(f"unknown or revoked key {header.key_id!r}")
                reply_key, role, name = found
            verify_frame(header, payload, reply_key, nonces=sec.nonces, window=sec.window)
            if cert_role is not None:
                # The certificate names the role too; with a key, both must agree.
                if role not in ("admin", cert_role):
                    raise Reply(f"key role {role} does not match certificate role "
                                f"{cert_role}")
                role = cert_role
            message = decode_message(payload)
            method = server.commands.get(message.command)
            if method is None:
                raise Reply(f"unknown command {message.command!r}")
            allowed = server.permissions.get(message.command)
            if allowed is not None and role != "admin" and role not in allowed:
                raise Reply(f"{message.command} is not allowed for role {role}")
            answer = method(message, Peer(peer, role, name))
        except Reply as exc:
            log.warning("refused request from %s: %s", peer, exc.text)
            answer = Message("error", exc.text)
        except Busy as exc:
            log.warning("refused request from %s: %s", peer, exc)
            answer = Message("busy", str(exc))
            unread = True
        except ProtocolError as exc:
            # A hang-up before a whole frame is what port probes do: not
            # worth a warning, but a half-closed peer still gets the reason.
            level = (logging.DEBUG if isinstance(exc, NoRequest) else
                     logging.INFO if isinstance(exc, PeerClosed) else logging.WARNING)
            log.log(level, "bad message from %s: %s", peer, exc)
            answer = Message("error", ascii_line(str(exc)))
            # A slow peer has had its time; anyone else may still be
            # sending, and must read our reply before the close resets it.
            unread = not isinstance(exc, (ReadTimeout, PeerClosed))
        except OSError as exc:
            log.info("connection from %s failed: %s", peer, exc)
            return
        except Exception:
            log.exception("internal error serving %s", peer)
            answer = Message("error", "internal error")
        try:
            frame = encode_frame(encode_message(answer.command, answer.argument, answer.body),
                                 reply_key, reply_to=nonce)
            sock.settimeout(sec.read_timeout)
            sock.sendall(frame)
            if unread:
                _drain(sock)
        except (OSError, ssl.SSLError, ProtocolError) as exc:
            log.info("could not reply to %s: %s", peer, exc)
        finally:
            if sock is not self.request:
                try:
                    sock.close()
                except OSError:
                    pass


    held = 0

    def finish(self) -> None:
        if self.held:
            self.server.budget.give(self.held)
            self.held = 0


def _server_handshake(sec: Security, sock: socket.socket, peer: str):
    """TLS server side: (TLS socket, the client's certificate role), or
    (None, None) when the handshake failed (logged: quietly for a port
    probe, at WARNING for a refused certificate or a plain-text client,
    which is also told in plain text why)."""
    sock.settimeout(sec.read_timeout)
    try:
        first = sock.recv(3, socket.MSG_PEEK)
    except OSError:
        first = b""
    if not first:
        log.debug("connection from %s closed before the TLS handshake", peer)
        return None, None
    if first == MAGIC:
        log.warning("plain-text request on the TLS port from %s refused", peer)
        try:
            sock.sendall(encode_frame(encode_message(
                "error", "this port speaks TLS: give the TLS flags")))
            _drain(sock)
        except OSError:
            pass
        return None, None
    try:
        tls = sec.server_tls.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        quiet = isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, socket.timeout))
        log.log(logging.INFO if quiet else logging.WARNING,
                "TLS handshake with %s refused: %s", peer, exc)
        return None, None
    role = None
    if sec.tls_client_roles is not None:
        import auth
        role = auth.cert_role(tls.getpeercert())
        if role not in sec.tls_client_roles:
            log.warning("TLS peer %s has a certificate for role %r; refused", peer, role)
            try:
                tls.sendall(encode_frame(encode_message(
                    "error", f"certificate role {role!r} not accepted here")))
                # Its request is unread: without draining, the close resets
                # the connection and the reason may never reach the peer.
                _drain(tls)
                tls.close()
            except OSError:
                pass
            return None, None
    return tls, role


def _drain(sock, limit: int = 64 * 1024, timeout: float = 1.0) -> None:
    """Read and drop what a refused peer still sends, briefly: closing a
    socket with unread input makes the kernel send a reset, which can
    destroy the error reply before the peer has read it."""
    deadline = time.monotonic() + timeout
    try:
        while limit > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            chunk = sock.recv(min(limit, 65536))
            if not chunk:
                return
            limit -= len(chunk)
    except (OSError, ssl.SSLError):
        pass


class MessageServer(socketserver.ThreadingTCPServer):
    """A threaded server with a command table, a connection cap and
    immediate port reuse after a crash or restart."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address, commands: dict, security: Security,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 permissions: dict | None = None):
        self.commands = commands
        self.security = security
        # Command -> roles allowed (see auth.py); a command not listed is
        # open to every authenticated peer.
        self.permissions = permissions or {}
        self._slots = threading.BoundedSemaphore(max_connections)
        # Over the cap, a TLS peer is still served a ``busy`` after its
        # handshake (it could not read one sent before), by a few spare
        # threads; beyond those the connection is just closed.
        self._spare = threading.BoundedSemaphore(16)
        self._local = threading.local()
        # Room for a few maximal messages at once; a bigger load waits its turn.
        self.budget = ByteBudget(max(security.max_buffered, security.max_message))
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, MessageHandler)

    @property
    def over_capacity(self) -> bool:
        return getattr(self._local, "spare", False)

    def _spare_thread(self, request, client_address):
        self._local.spare = True
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._spare.release()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.warning("connection limit reached; refusing %s",
                        format_address(client_address[:2]))
            if self.security.server_tls and self._spare.acquire(blocking=False):
                threading.Thread(target=self._spare_thread, args=(request, client_address),
                                 daemon=True).start()
                return
            try:
                request.setblocking(False)
                request.send(encode_frame(encode_message("busy", "server busy, try later"),
                                          self.security.secret))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        log.exception("error serving %s", client_address)


def serve_until_signalled(server: MessageServer, on_stop=None,
                          stop: threading.Event | None = None) -> None:
    """Serve in a thread; SIGINT/SIGTERM (or ``stop`` being set by the
    daemon itself) stops the server cleanly with ``server.shutdown()``,
    then ``on_stop`` flushes the daemon's work."""
    stop = stop or threading.Event()

    def _signalled(signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _signalled)
    signal.signal(signal.SIGTERM, _signalled)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="serve", daemon=True)
    thread.start()
    while not stop.wait(0.5):
        if not thread.is_alive():
            break
    server.shutdown()
    thread.join(5)
    if on_stop:
        on_stop()
    server.server_close()


# --------------------------------------------------------------------------
# Files.

def atomic_write(path: str, data: bytes, fsync: bool = True) -> None:
    """Write a file so that readers see either nothing or all of it."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str, what: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    return path


# --------------------------------------------------------------------------
# Git, through one helper.

class GitError(Exception):
    def __init__(self, args, cwd, code, stderr):
        self.args_ = args
        self.cwd = cwd
        self.code = code
        self.stderr = stderr.strip()
        super().__init__(f"git {' '.join(args)} in {cwd} exited {code}: {self.stderr[-500:]}")


def run_git(repo: str, *args: str, timeout: float = 120) -> str:
    cmd = ["git", "-C", repo, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GitError(list(args), repo, -1, "timed out") from None
    if proc.returncode:
        raise GitError(list(args), repo, proc.returncode, proc.stderr)
    return proc.stdout


def script_path(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


class Backoff:
    """Exponential backoff with jitter, for retries after failures."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap = first, cap
        self.current = first

    def next(self) -> float:
        delay = self.current
        self.current = min(self.cap, self.current * 2)
        # Jitter spreads many clients' retries; never past the cap.
        return min(self.cap, delay * (0.8 + 0.4 * secrets.randbelow(1000) / 1000))

    def reset(self) -> None:
        self.current = self.first
