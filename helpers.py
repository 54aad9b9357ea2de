"""Shared plumbing of the daemons: the server base class (command table,
roles, connection cap, byte budget, TLS), the client call, security
settings from flags, files, git and small utilities.

The wire protocol itself (frames, messages, signing) is in ``wire.py``,
pure functions importing little, re-exported here so the daemons have one
place to import from.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import ipaddress
import logging
import os
import secrets
import signal
import socket
import socketserver
import stat
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from ci.wire import (  # noqa: F401 - the protocol, re-exported for the daemons
    Busy, COMMAND_RE, DEFAULT_AUTH_WINDOW, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MESSAGE, DEFAULT_READ_TIMEOUT, MAGIC,
    MAX_HEADER_BYTES, TOKEN_RE, FrameHeader, Message, NoRequest, PeerClosed, ProtocolError,
    ReadTimeout, ascii_line, decode_fields, decode_header, decode_message, encode_fields,
    encode_frame, encode_message, format_address, one_line, parse_address, read_credentials,
    read_frame, read_secret_file, request, valid_commit, valid_full_commit, verify_frame)

log = logging.getLogger(__name__)

VERDICTS = ("passed", "failed", "error", "timeout")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ConfigError(Exception):
    """A bad flag or path: reported as one line and a non-zero exit."""


# --------------------------------------------------------------------------
# Validation of values that come from the network or the command line.

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
# A nonce file is rewritten with only its live entries once it holds this
# many lines and at least twice as many as are live (~40 bytes a line).
NONCE_COMPACT_LINES = 50_000


class NonceCache:
    """Remembers nonces seen within the auth window so a captured message
    cannot be replayed.  Bounded: entries older than the window are dropped.

    With ``persist(path)`` the nonces also outlive the process: each is
    appended to the file before ``add`` returns (so before the command it
    came with takes effect) and loaded at the next start, so a frame
    captured before a restart is still refused after it."""

    def __init__(self, window: float = DEFAULT_AUTH_WINDOW, limit: int = 200_000):
        self.window = window
        self.limit = limit
        self._lock = threading.Lock()
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._fd: int | None = None
        self._path: str | None = None
        self._boot: str | None = None
        self._lines = 0  # lines in the file
        self._failed_logged = 0.0
        # After a machine restart: frames sent before ``_started`` are
        # refused until ``_guard_until`` (see persist).
        self._started = self._guard_until = 0.0

    def add(self, nonce: str, now: float, sent: float | None = None) -> bool:
        """Record ``nonce`` (of a frame stamped ``sent``); False if it was
        already seen.  Busy (the sender retries) if it cannot be written to
        the file, or may have been lost in a machine crash: accepting it
        unrecorded would let it be replayed after a restart."""
        if sent is not None and sent < self._started and now < self._guard_until:
            raise Busy("sent before this machine restarted; send it again")
        with self._lock:
            while self._seen:
                oldest, when = next(iter(self._seen.items()))
                if when >= now - 2 * self.window and len(self._seen) < self.limit:
                    break
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            if self._fd is not None:
                self._append(nonce, now)
            self._seen[nonce] = now
            return True

    def persist(self, path: str) -> None:
        """Load what an earlier run saw (still within two windows: older
        frames are refused as stale anyway) from ``path``, rewrite the file
        with just that, and append every new nonce to it from now on.
        ConfigError if the file cannot be written."""
        now = time.time()
        loaded, boot = _read_nonce_file(path, now - 2 * self.window)
        self._boot = boot_id()
        if boot is not None and boot != self._boot:
            # The machine restarted since the file was last written: its
            # last nonces may never have reached the disk (no fsync), so
            # for one window nothing sent before this start is accepted.
            # An honest client whose clock lags by d is told busy for the
            # first d seconds only.
            self._started, self._guard_until = now, now + self.window
            log.warning("the machine restarted since %s was written: messages stamped "
                        "before now are refused for %.0fs", path, self.window)
        with self._lock:
            for nonce, when in sorted(loaded.items(), key=lambda item: item[1])[-self.limit:]:
                self._seen[nonce] = when
                self._seen.move_to_end(nonce)
            self._path = path
            try:
                self._compact()
            except OSError as exc:
                raise ConfigError(f"cannot write the nonce file {path}: "
                                  f"{exc.strerror or exc}") from None
        log.debug("%d nonce(s) of the last %.0fs loaded from %s", len(loaded),
                  2 * self.window, path)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _append(self, nonce: str, now: float) -> None:
        """One write() per nonce, no fsync: cheap, and it survives the
        process being killed (the kernel holds it), not a machine crash."""
        try:
            os.write(self._fd, b"%.3f %s\n" % (now, nonce.encode("ascii")))
            self._lines += 1
            if self._lines >= NONCE_COMPACT_LINES and self._lines >= 2 * len(self._seen):
                self._compact()
        except OSError as exc:
            if time.monotonic() - self._failed_logged >= 10:
                self._failed_logged = time.monotonic()
                log.error("cannot record a nonce in %s (%s): refusing signed messages "
                          "until it can", self._path, exc.strerror or exc)
            raise Busy("cannot record the message's nonce, try later") from None

    def _compact(self) -> None:
        """Rewrite the file with the live entries and reopen it to append."""
        data = b"".join([b"boot %s\n" % (self._boot or "-").encode("ascii")] +
                        [b"%.3f %s\n" % (when, nonce.encode("ascii"))
                         for nonce, when in self._seen.items()])
        atomic_write(self._path, data)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._lines = fd, len(self._seen)


def boot_id() -> str | None:
    """This boot's id (Linux), which a machine restart changes; None elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip() or None
    except (OSError, ValueError):
        return None


def _read_nonce_file(path: str, oldest: float) -> tuple[dict[str, float], str | None]:
    """(nonce -> when it was seen, for entries seen at ``oldest`` or
    later; the boot id the file was written in).  A missing file is empty;
    a torn or foreign line is skipped (a killed process may leave its last
    line half written)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        raise ConfigError(f"cannot read the nonce file {path}: {exc.strerror}") from None
    seen: dict[str, float] = {}
    lines = data.split(b"\n")
    boot = None
    if lines[0].startswith(b"boot "):
        boot = lines[0][5:].decode("ascii", "replace")
        boot = None if boot == "-" else boot
    for line in lines:
        parts = line.split(b" ")
        if len(parts) != 2 or not 8 <= len(parts[1]) <= 64:
            continue
        try:
            when = float(parts[0])
            nonce = parts[1].decode("ascii")
        except (ValueError, UnicodeDecodeError):
            continue
        if when >= oldest and all(c in "0123456789abcdef" for c in nonce):
            seen[nonce] = when
    return seen, boot


def persist_nonces(security: "Security", state_dir: str, daemon: str) -> None:
    """Keep a daemon's nonces in its state folder across restarts (only
    when messages are signed: without a secret nothing is checked).  The
    file is named after the daemon, so that daemons given one folder do
    not share it."""
    if security.secret:
        security.nonces.persist(os.path.join(state_dir, f"{daemon}-nonces"))


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
    # Server side: connections at once from one address (None: half of
    # the connection cap, see ConnectionCap).
    max_per_client: int | None = None
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
    try:
        return read_credentials(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


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
        add_per_client_argument(group, "connections")
        group.add_argument("--max-buffered", type=int, default=DEFAULT_MAX_BUFFERED,
                           metavar="BYTES",
                           help="message bytes held at once over all connections; beyond "
                                "it senders are told to retry (default: %(default)s)")
    group.add_argument("--auth-window", type=float, default=DEFAULT_AUTH_WINDOW,
                       metavar="SECONDS",
                       help="accepted clock difference for signed messages "
                            "(default: %(default)s)")


def add_per_client_argument(parser, what: str) -> None:
    """``--max-per-client``, shared by the daemons and the dashboard."""
    parser.add_argument("--max-per-client", type=int, default=None, metavar="N",
                        help=f"{what} served at once from one client address (an IPv6 "
                             "client's whole /64 counts as one); more are refused, so one "
                             "client cannot take every slot. Behind a proxy, whose address "
                             "every client then has, set it to --max-connections "
                             "(default: half of --max-connections)")


def check_per_client(args: argparse.Namespace) -> None:
    """ConfigError unless ``--max-per-client`` (if given) is 1..--max-connections."""
    value = getattr(args, "max_per_client", None)
    if value is not None and not 1 <= value <= args.max_connections:
        raise ConfigError("--max-per-client must be between 1 and --max-connections")


def security_from_args(args: argparse.Namespace) -> Security:
    for name in ("max_message_size", "max_connections", "max_buffered"):
        if getattr(args, name, 1) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if hasattr(args, "max_connections"):
        check_per_client(args)
    if args.read_timeout <= 0 or args.auth_window <= 0:
        raise ConfigError("--read-timeout and --auth-window must be positive")
    server_tls, client_tls = make_tls_contexts(args.tls_cert, args.tls_key, args.tls_ca)
    secret, key_id = load_credentials(args.secret_file)
    return Security(secret=secret, key_id=key_id, window=args.auth_window,
                    server_tls=server_tls, client_tls=client_tls,
                    max_message=args.max_message_size, read_timeout=args.read_timeout,
                    max_buffered=getattr(args, "max_buffered", DEFAULT_MAX_BUFFERED),
                    max_per_client=getattr(args, "max_per_client", None),
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
    with socket.create_connection(address, timeout=timeout) as raw:
        sock = raw
        if security.client_tls:
            sock = _client_handshake(security, raw, address)
        try:
            return request(sock, command, argument, body, secret=security.secret,
                           key_id=security.key_id, timeout=timeout,
                           reply_timeout=reply_timeout if reply_timeout is not None else
                           max(timeout, security.read_timeout),
                           max_message=security.max_message, window=security.window)
        finally:
            if sock is not raw:
                sock.close()


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
        from ci import auth
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
        reply_key = sec.secret
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
                # The certificate names the role too; with a key, both must
                # agree.  A frame signed with this server's own issued key is
                # the exception: its one other holder is the dispatcher, which
                # derives it to call us, and the certificate says which it is.
                own_key = sec.keyring is None and sec.key_id is not None
                if role not in ("admin", cert_role) and not own_key:
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
        from ci import auth
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


def default_per_client(max_connections: int) -> int:
    """The per-address limit when none is given: half the connection cap,
    so one address (a flood, or a proxy) can never take every slot, while
    runners sharing one address (a launcher on 127.0.0.1) keep plenty."""
    return max(1, max_connections // 2)


def client_key(client_address) -> str:
    """What a per-client limit counts by: the IPv4 address, or for IPv6
    the /64 (one host is usually given a whole /64, so counting single
    addresses would let it open as many connections as it likes)."""
    host = str(client_address[0]) if client_address else "?"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ConnectionCap:
    """Mix-in for a threading server: at most ``max_connections`` served
    at once, and at most ``max_per_client`` of them from one address (see
    ``client_key``), so that one client holding slow, half-sent requests
    cannot take every slot.  Beyond either, ``refuse`` answers (briefly,
    without a thread of its own unless it takes the request over and
    returns True)."""

    def init_cap(self, max_connections: int, max_per_client: int | None = None) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_per_client = max_per_client or default_per_client(max_connections)
        self._per_client: collections.Counter = collections.Counter()
        self._per_client_lock = threading.Lock()
        self._refusal_logged = 0.0

    def refuse(self, request, client_address) -> bool:
        raise NotImplementedError

    def _take_client_slot(self, key: str) -> bool:
        with self._per_client_lock:
            if self._per_client[key] >= self.max_per_client:
                return False
            self._per_client[key] += 1
            return True

    def _give_client_slot(self, key: str) -> None:
        with self._per_client_lock:
            self._per_client[key] -= 1
            if self._per_client[key] <= 0:
                del self._per_client[key]

    def _log_refusal(self, why: str, client_address) -> None:
        """A warning at most once a second: a flood would otherwise write
        one line per refused connection."""
        now = time.monotonic()
        level = logging.WARNING if now - self._refusal_logged >= 1.0 else logging.DEBUG
        if level == logging.WARNING:
            self._refusal_logged = now
        log.log(level, "%s; refusing %s", why, format_address(client_address[:2]))

    def process_request(self, request, client_address):
        key = client_key(client_address)
        if not self._take_client_slot(key):
            self._log_refusal(f"per-client limit ({self.max_per_client}) reached for {key}",
                              client_address)
            if not self.refuse(request, client_address):
                self.shutdown_request(request)
            return
        if not self._slots.acquire(blocking=False):
            self._give_client_slot(key)
            self._log_refusal("connection limit reached", client_address)
            if not self.refuse(request, client_address):
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            self._give_client_slot(key)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
            self._give_client_slot(client_key(client_address))


class MessageServer(ConnectionCap, socketserver.ThreadingTCPServer):
    """A threaded server with a command table, a connection cap and
    immediate port reuse after a crash or restart."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address, commands: dict, security: Security,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 permissions: dict | None = None, max_per_client: int | None = None):
        self.commands = commands
        self.security = security
        # Command -> roles allowed (see auth.py); a command not listed is
        # open to every authenticated peer.
        self.permissions = permissions or {}
        self.init_cap(max_connections, max_per_client or security.max_per_client)
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

    def refuse(self, request, client_address) -> bool:
        if self.security.server_tls and self._spare.acquire(blocking=False):
            threading.Thread(target=self._spare_thread, args=(request, client_address),
                             daemon=True).start()
            return True
        try:
            request.setblocking(False)
            request.send(encode_frame(encode_message("busy", "server busy, try later"),
                                      self.security.secret))
        except OSError:
            pass
        return False

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


def open_inside(path: str, inside: str) -> int:
    """A read-only descriptor of a regular file that lies, symlinks
    resolved, under the folder ``inside``.  For files a tested commit
    wrote or committed: a symlink to a secret or to /dev/zero, or a FIFO
    that never ends, raises OSError instead of being opened."""
    folder = os.path.realpath(inside)
    real = os.path.realpath(path)
    if os.path.commonpath([real, folder]) != folder:
        raise OSError(f"{path} leads outside {inside}")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def read_inside(path: str, inside: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a file ``open_inside`` opens."""
    fd = open_inside(path, inside)
    try:
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
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


def run_git(repo: str, *args: str, timeout: float = 120, env: dict | None = None) -> str:
    cmd = ["git", "-C", repo, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env)
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
