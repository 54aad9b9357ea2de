"""The card's shared module: the server base class every daemon serves
with (command table, roles, connection caps, byte budget, TLS handshake)
and the client call (one connection, one request, one reply).

The protocol itself is ``ci/wire.py``; flags are ``ci/config.py``; keys,
TLS and nonces ``ci/security.py``."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import random
import signal
import socket
import socketserver
import ssl
import threading
import time

from ci.security import Security
from ci.wire import (Busy, Credentials, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    Freshness, Limits, MAGIC, Message, NoRequest, PeerClosed, ProtocolError, ReadTimeout, Reply,
    ascii_line, decode_message, encode_frame, encode_message, format_address, read_frame,
    request, verify_frame)


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Addresses and budgets.

# Where the system takes the local ports of outgoing connections (Linux).
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
# free_port looks at most this many random ports below that range.
PORT_TRIES = 50


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to right now, for a test or benchmark that
    must name the port before its daemon binds it.  Chosen at random below
    the system's ephemeral range where it can be: a port the OS picks
    (bind to 0) comes from that range, where every outgoing connection
    takes its local port too, so another process's connection could take
    it between this probe and the daemon's bind ("Address already in use",
    seen with the test suite's two workers).  run_local.py picks its
    daemons' ports here too."""
    low = _ephemeral_low()
    lowest = max(1024, low - 12000)
    if low - lowest >= 4096:                 # a range worth drawing from
        pick = random.SystemRandom()       # not the (seedable) global generator
        for _ in range(PORT_TRIES):
            port = pick.randrange(lowest, low)
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the ephemeral range; 0 where it cannot be read."""
    try:
        with open(EPHEMERAL_RANGE, encoding="ascii") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class ByteBudget:
    """Caps the message bytes all connections hold at once, so that
    ``--max-connections`` x ``--max-message-size`` cannot exhaust memory,
    and what one address (``client_key``) holds to ``per_client``, so that
    one client sending big messages slowly leaves room for the others'."""

    def __init__(self, limit: int, per_client: int | None = None):
        self.limit = limit
        self.per_client = per_client or limit
        self.used = 0
        self._by_client: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def take(self, count: int, client: str = "") -> bool:
        with self._lock:
            if self.used + count > self.limit or \
                    self._by_client[client] + count > self.per_client:
                return False
            self.used += count
            self._by_client[client] += count
            return True

    def give(self, count: int, client: str = "") -> None:
        with self._lock:
            self.used -= count
            self._by_client[client] -= count
            if self._by_client[client] <= 0:
                del self._by_client[client]

    def account(self, client: str) -> "ClientBudget":
        return ClientBudget(self, client)


@dataclasses.dataclass
class ClientBudget:
    """One connection's view of the budget: its address's share."""
    budget: ByteBudget
    client: str

    def take(self, count: int) -> bool:
        return self.budget.take(count, self.client)

    def give(self, count: int) -> None:
        self.budget.give(count, self.client)


# --------------------------------------------------------------------------
# Client side: one call = one connection, one request, one reply.

def call(address: tuple[str, int], command: str, argument: str = "", body: bytes = b"",
         security: Security | None = None,
         timeout: float | tuple[float, float | None] = DEFAULT_CONNECT_TIMEOUT) -> Message:
    """Send a request and return the verified reply.  ``timeout``: seconds
    to connect and send, or (as ``requests`` takes it) a pair: those and
    the seconds to wait for the reply (None, or a single number: the
    first, at least the security settings' read timeout).

    Raises OSError for network trouble and ProtocolError for a malformed or
    unauthentic reply; callers decide whether to retry."""
    security = security or Security()
    timeout, reply_timeout = timeout if isinstance(timeout, tuple) else (timeout, None)
    with socket.create_connection(address, timeout=timeout) as raw:
        sock = raw
        if security.client_tls:
            sock = _client_handshake(security, raw, address)
        try:
            limits = Limits(timeout, reply_timeout if reply_timeout is not None else
                            max(timeout, security.read_timeout), security.max_message,
                            security.window)
            return request(sock, command, argument, body, limits=limits,
                           credentials=Credentials(security.secret, security.key_id))
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


# --------------------------------------------------------------------------
# Server side.


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

    held = 0  # message bytes taken from the server's budget, given back in finish()
    account = None  # this connection's share of the budget (its address's)
    claim = None    # (nonce, key) the frame's header names, before it is verified

    def handle(self) -> None:
        """Serve one request: every outcome but a broken connection (or a
        refused TLS handshake, answered by ``_server_handshake``) gets a
        reply frame, signed with the key the request was signed with."""
        sec = self.server.security
        self.peer = format_address(self.client_address[:2]) if self.client_address else "?"
        self.sock, self.nonce, self.reply_key = self.request, "", sec.secret
        unread = False
        try:
            cert_role = None
            if sec.server_tls:
                self.sock, cert_role = _server_handshake(sec, self.sock, self.peer)
                if self.sock is None:
                    return
            answer = self._serve(cert_role)
        except (Reply, ProtocolError) as exc:
            answer, unread = self._refusal(exc)
        except OSError as exc:
            log.info("connection from %s failed: %s", self.peer, exc)
            return
        except Exception:
            log.exception("internal error serving %s", self.peer)
            answer = Message("error", "internal error")
        self._reply(answer, unread)

    def _serve(self, cert_role: str | None) -> Message:
        """Read, authenticate, check the role and run the command's
        handler: its reply.  Raises what ``handle`` turns into a refusal."""
        server: MessageServer = self.server  # type: ignore[assignment]
        sec = server.security
        if server.over_capacity:
            raise Busy("server busy, try later")
        self.account = server.budget.account(client_key(self.client_address))
        header, payload = read_frame(self.sock, sec.max_message, sec.read_timeout,
                                     self.account, on_header=self._claimed)
        self.held = header.length  # given back to the budget in finish()
        self.nonce = header.nonce
        role, name = self._authenticate(header, payload, cert_role)
        message = decode_message(payload)
        method = server.commands.get(message.command)
        if method is None:
            raise Reply(f"unknown command {message.command!r}")
        allowed = server.permissions.get(message.command)
        if allowed is not None and role != "admin" and role not in allowed:
            raise Reply(f"{message.command} is not allowed for role {role}")
        return method(message, Peer(self.peer, role, name))

    def _claimed(self, header) -> None:
        """Before the body: a key we do not know is refused unread, and a
        ``busy`` refusal (the budget) is answered to the request's nonce
        with the key it names, so a client can tell it from a stranger's
        word (a runner's ``busy`` to a ping is not a missed ping).  The
        signature is not checked yet: only ``busy`` is bound so."""
        sec = self.server.security
        key = sec.secret
        if sec.secret:
            found = sec.lookup(header.key_id)
            if found is None:
                raise ProtocolError(f"unknown or revoked key {header.key_id!r}")
            key = found[0]
        self.claim = (header.nonce, key)

    def _authenticate(self, header, payload: bytes, cert_role: str | None):
        """(role, name) the frame's key (and TLS certificate) proves; the
        reply is then signed with that key.  Raises ProtocolError for an
        unknown key or a bad signature, Reply when key and certificate
        disagree."""
        sec = self.server.security
        role, name = "admin", None
        if sec.secret:
            found = sec.lookup(header.key_id)
            if found is None:
                raise ProtocolError(f"unknown or revoked key {header.key_id!r}")
            self.reply_key, role, name = found
        verify_frame(header, payload, self.reply_key, fresh=Freshness(sec.window, sec.nonces))
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
        return role, name

    def _refusal(self, exc: Exception) -> tuple[Message, bool]:
        """The reply to a refused request, logged, and whether the peer may
        still be sending (then its input is drained after the reply)."""
        if isinstance(exc, Reply):
            log.warning("refused request from %s: %s", self.peer, exc.text)
            return Message("error", exc.text), False
        if isinstance(exc, Busy):
            log.warning("refused request from %s: %s", self.peer, exc)
            if self.claim is not None:
                self.nonce, self.reply_key = self.claim
            return Message("busy", str(exc)), True
        # A hang-up before a whole frame is what port probes do: not
        # worth a warning, but a half-closed peer still gets the reason.
        level = (logging.DEBUG if isinstance(exc, NoRequest) else
                 logging.INFO if isinstance(exc, PeerClosed) else logging.WARNING)
        log.log(level, "bad message from %s: %s", self.peer, exc)
        # A slow peer has had its time; anyone else may still be
        # sending, and must read our reply before the close resets it.
        return (Message("error", ascii_line(str(exc))),
                not isinstance(exc, (ReadTimeout, PeerClosed)))

    def _reply(self, answer: Message, unread: bool) -> None:
        """Send ``answer`` (draining the peer's unread input after it when
        asked), then close the TLS layer if there is one."""
        try:
            # Bound to no request (refused before its frame was read or its
            # key known): unsigned.  Signed with the master key and an empty
            # reply_to, it had a master-signed request's very shape, handed
            # to any stranger; the client only ever quotes such a refusal.
            frame = encode_frame(encode_message(answer.command, answer.argument, answer.body),
                                 self.reply_key if self.nonce else None, reply_to=self.nonce)
            self.sock.settimeout(self.server.security.read_timeout)
            self.sock.sendall(frame)
            if unread:
                _drain(self.sock)
        except (OSError, ssl.SSLError, ProtocolError) as exc:
            log.info("could not reply to %s: %s", self.peer, exc)
        finally:
            if self.sock is not self.request:
                try:
                    self.sock.close()
                except OSError:
                    pass

    def finish(self) -> None:
        if self.held:
            self.account.give(self.held)
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
        # One address holds half of it at most (a whole message always).
        limit = max(security.max_buffered, security.max_message)
        self.budget = ByteBudget(limit, max(limit // 2, security.max_message))
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
            request.send(encode_frame(encode_message("busy", "server busy, try later")))
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
