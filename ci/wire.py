"""The wire protocol as pure functions: frames, messages, fields, signing,
and reading a frame from a socket with size and time limits.

It is its own module, importing little, because a git hook's ``notify``
runs it in a fresh interpreter for every push: ``hook_client.py`` needs
only this (and ci/credentials.py, which reads the key it signs with),
where ``helpers.py`` brings the whole server side with it (ssl,
socketserver, logging, subprocess...).  Hashing is imported on the
first signature, not at start.

Wire format (one request and one reply per TCP connection)::

    CI1 <length> <timestamp> <nonce> <tag>[ <key id>]\\n<payload: exactly <length> bytes>

``tag`` is ``-`` when no secret is configured, else the hex HMAC-SHA256 of
the timestamp, nonce, the nonce of the request being answered (replies
only), the key id (when there is one) and the payload.  The key id names
the issued key a frame is signed with (``runner:r1``; see ``auth.py``);
without one the frame is signed with the shared secret.  The payload
starts with an ASCII command line (``name`` or ``name:argument``),
optionally followed by ``\\n`` and a body of arbitrary bytes.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

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

class LazyPattern:
    """A regular expression compiled on first use: the hook's one-shot
    process uses only a few of these, and compiling costs milliseconds."""

    def __init__(self, pattern):
        self.pattern = pattern
        self._compiled = None

    def fullmatch(self, text):
        if self._compiled is None:
            import re  # here: the hook's path never needs it
            self._compiled = re.compile(self.pattern)
        return self._compiled.fullmatch(text)


# A name: a runner's (``--name``), a key's, a label, a matrix axis's value.
# One pattern for all, so what one part accepts another never refuses.
NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
COMMIT_RE = LazyPattern(r"[0-9a-f]{4,64}")
FULL_COMMIT_RE = LazyPattern(r"[0-9a-f]{40}|[0-9a-f]{64}")
# An assignment's token (see ci/dispatch/state.py).
TOKEN_RE = LazyPattern(r"[0-9a-f]{16,64}")

# Character sets for the checks on every message's path (plain loops: the
# regular-expression module alone costs a hook several milliseconds).
_HEX = frozenset("0123456789abcdef")
_DIGITS = frozenset("0123456789")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz_")
# Command names may have a hyphen inside (``queue-state``), field keys not.
_COMMAND_CHARS = _LOWER | {"-"}
_FIELD_CHARS = _LOWER | _DIGITS
_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_:%")


def _made_of(text: str, chars: frozenset, shortest: int, longest: int) -> bool:
    return shortest <= len(text) <= longest and all(c in chars for c in text)


def valid_command(text: str) -> bool:
    return _made_of(text, _COMMAND_CHARS, 1, 32) and text[0] != "-" and text[-1] != "-"


class ProtocolError(Exception):
    """Raised for anything on the wire that is not a well-formed, authentic
    message.  The only exception framing and parsing code may raise."""


class ReadTimeout(ProtocolError):
    """The peer sent too little, too slowly: nothing more is worth reading."""


class PeerClosed(ProtocolError):
    """The peer hung up before a whole frame arrived (port probes do)."""


class Unauthentic(ProtocolError):
    """Unsigned, or signed with another key than the one expected: a reply
    that says the peer is not who we called, not that the link is slow."""


class Busy(ProtocolError):
    """Refused for now (too much in flight): the peer should retry later."""


class NoRequest(PeerClosed):
    """Connected and closed at once: a port probe, not a protocol error."""


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
    if not _made_of(host, _HOST_CHARS, 1, 300):
        raise ValueError(f"invalid host in address {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in address {text!r}: expected 1-65535")
    return host, int(port)


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Messages: the payload inside a frame.  Pure functions.

def _record(name: str, fields: str, defaults: tuple = ()) -> type:
    """A named tuple made by hand (by position or by name, the last
    fields defaulted): importing ``collections`` (for ``namedtuple``)
    cost the git hook about 5 ms of its 20 ms budget."""
    names = fields.split()
    required = len(names) - len(defaults)

    def __new__(cls, *values, **named):
        if named:
            full = {**dict(zip(names[required:], defaults)), **dict(zip(names, values))}
            if set(named) - set(names[len(values):]) or len(values) > len(names):
                raise TypeError(f"{name} has no field(s) {sorted(named)} to set by name")
            full.update(named)
            if len(full) < len(names):
                raise TypeError(f"{name} needs {', '.join(n for n in names if n not in full)}")
            values = tuple(full[n] for n in names)
        if not required <= len(values) <= len(names):
            raise TypeError(f"{name} takes {required} to {len(names)} values, "
                            f"got {len(values)}")
        return tuple.__new__(cls, values + defaults[len(values) - required:])

    def __repr__(self):
        inner = ", ".join(f"{field}={value!r}" for field, value in zip(names, self))
        return f"{name}({inner})"

    namespace = {"__slots__": (), "__new__": __new__, "__repr__": __repr__,
                 "__getnewargs__": lambda self: tuple(self), "_fields": tuple(names)}
    for index, field in enumerate(names):
        namespace[field] = property(lambda self, i=index: self[i])
    return type(name, (tuple,), namespace)


Message = _record("Message", "command argument body", defaults=("", b""))


def encode_message(command: str, argument: str = "", body: bytes = b"") -> bytes:
    if not valid_command(command):
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
    if not valid_command(command):
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
        if not sep or not (_made_of(key, _FIELD_CHARS, 1, 32) and key[0] not in _DIGITS):
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

def _sha256():
    """SHA-256 from OpenSSL when ``hashlib`` is already loaded (the daemons:
    faster on megabytes of test output), else CPython's built-in one,
    which a hook's one-shot process loads in a fraction of the time."""
    hashlib = sys.modules.get("hashlib")
    if hashlib is None:
        try:
            from _sha256 import sha256  # CPython 3.11
            return sha256
        except ImportError:
            try:
                from _sha2 import sha256  # CPython 3.12 and later
                return sha256
            except ImportError:
                import hashlib
    return hashlib.sha256


_PADS: dict = {}


def _hmac_sha256(secret: bytes, parts) -> str:
    """HMAC-SHA256 (RFC 2104) of the concatenated ``parts``, the same
    tag ``hmac.new(secret, msg, hashlib.sha256)`` gives."""
    sha256 = _sha256()
    pads = _PADS.get(secret)
    if pads is None:
        key = sha256(secret).digest() if len(secret) > 64 else secret
        key = key.ljust(64, b"\0")
        pads = (bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key))
        if len(_PADS) < 1024:
            _PADS[secret] = pads
    inner = sha256(pads[0])
    for part in parts:
        inner.update(part)
    outer = sha256(pads[1])
    outer.update(inner.digest())
    return outer.hexdigest()


def _mac(secret: bytes, ts: bytes, nonce: bytes, reply_to: bytes, payload: bytes,
         key_id: bytes = b"") -> str:
    parts = [MAGIC + b"\n", ts + b"\n", nonce + b"\n", reply_to + b"\n"]
    if key_id:
        parts.append(b"key " + key_id + b"\n")
    parts.append(payload)
    return _hmac_sha256(secret, parts)


KEY_ID_RE = LazyPattern(rb"[a-z]{1,16}:" + NAME_PATTERN.encode())


def encode_frame(payload: bytes, secret: bytes | None = None, *, reply_to: str = "",
                 now: float | None = None, nonce: str | None = None,
                 key_id: str | None = None) -> bytes:
    ts = b"%.3f" % (time.time() if now is None else now)
    nonce_b = (nonce or os.urandom(12).hex()).encode("ascii")
    kid = key_id.encode("ascii") if key_id and secret else b""
    tag = _mac(secret, ts, nonce_b, reply_to.encode("ascii"), payload, kid) if secret else "-"
    header = b"%s %d %s %s %s%s\n" % (MAGIC, len(payload), ts, nonce_b, tag.encode("ascii"),
                                      b" " + kid if kid else b"")
    return header + payload


FrameHeader = _record("FrameHeader", "length timestamp nonce tag key_id", defaults=(None,))


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
    whole, dot, fraction = ts.decode("latin-1").partition(".")
    if not (_made_of(whole, _DIGITS, 1, 12) and
            (not dot or _made_of(fraction, _DIGITS, 1, 6))):
        raise ProtocolError("bad frame timestamp")
    if not _made_of(nonce.decode("latin-1"), _HEX, 8, 64):
        raise ProtocolError("bad frame nonce")
    if not (tag == b"-" or _made_of(tag.decode("latin-1"), _HEX, 64, 64)):
        raise ProtocolError("bad frame tag")
    return FrameHeader(int(length), ts.decode(), nonce.decode(), tag.decode(), key_id)


# What makes a signed frame fresh: its timestamp within ``window`` seconds
# of ``now`` (None: the clock's), and its nonce new to ``nonces`` (a
# NonceCache; None: not checked, as for a reply bound to our request).
Freshness = _record("Freshness", "window nonces now", defaults=(DEFAULT_AUTH_WINDOW, None, None))


def verify_frame(header: FrameHeader, payload: bytes, secret: bytes | None, *,
                 reply_to: str = "", fresh: Freshness = Freshness()) -> None:
    """Check a frame's tag, age and nonce; ProtocolError if any is wrong.

    Without a secret nothing is checked (the daemons then listen on loopback
    only, unless the operator said ``--insecure``)."""
    if not secret:
        return
    if header.tag == "-":
        raise Unauthentic("unsigned message refused")
    expected = _mac(secret, header.timestamp.encode(), header.nonce.encode(),
                    reply_to.encode("ascii"), payload,
                    header.key_id.encode("ascii") if header.key_id else b"")
    from _operator import _compare_digest  # hmac.compare_digest, without hmac
    if not _compare_digest(expected, header.tag):
        raise Unauthentic("bad signature")
    now = time.time() if fresh.now is None else fresh.now
    if abs(now - float(header.timestamp)) > fresh.window:
        raise ProtocolError("stale message (timestamp outside the window)")
    if fresh.nonces is not None and \
            not fresh.nonces.add(header.nonce, now, float(header.timestamp)):
        raise ProtocolError("replayed message")


# --------------------------------------------------------------------------
# Reading a frame from a socket, with size and time limits.

# What one recv may take while looking for the header's end: usually the
# whole of a small message arrives with it.
FIRST_READ = 64 * 1024


def _recv_some(sock, limit: int, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ReadTimeout("timed out reading message")
    sock.settimeout(remaining)
    try:
        chunk = sock.recv(limit)
    except (TimeoutError, _socket.timeout):  # the same class from Python 3.10 on
        raise ReadTimeout("timed out reading message") from None
    if not chunk:
        raise PeerClosed("connection closed mid-message")
    return chunk


def _recv_body(sock, start: bytes, count: int, idle: float, deadline: float,
               hold) -> bytes:
    """``count`` more bytes after ``start``: each ``recv`` waits at most
    ``idle`` (a peer that stops sending is cut then, not at the body's
    whole ``deadline``), and ``hold`` is told of every chunk as it comes."""
    chunks = [start]
    hold(len(start))
    while count:
        chunk = _recv_some(sock, min(count, 1 << 20), min(time.monotonic() + idle, deadline))
        hold(len(chunk))
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def read_frame(sock, max_message: int = DEFAULT_MAX_MESSAGE,
               timeout: float = DEFAULT_READ_TIMEOUT,
               budget=None, on_header=None) -> tuple[FrameHeader, bytes]:
    """Read one frame: the header line (a peer that never ends it is cut at
    ``MAX_HEADER_BYTES``), then exactly the body.

    The header is read in chunks, not byte by byte (a system call per byte
    was the dispatcher's main cost under load).  What follows the newline is
    the body's start; each side sends one frame per connection, so no later
    message can be swallowed, and bytes past the frame are dropped.

    ``on_header(header)`` may refuse the frame before its body is read (an
    unknown key).  The ``budget`` is taken as the body's bytes arrive, not
    for the length the header claims: a header is a stranger's word, and
    four unsigned headers claiming 16 MiB each, then silence, had every
    later request of everyone refused ``busy`` for over a minute."""
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
    if on_header is not None:
        on_header(parsed)
    held = 0

    def hold(count: int) -> None:
        nonlocal held
        if budget is not None:
            if not budget.take(count):
                raise Busy("server busy (too much data in flight), try later")
            held += count
    try:
        body_deadline = time.monotonic() + timeout + parsed.length / MIN_BODY_RATE
        start = data[newline + 1:newline + 1 + parsed.length]
        return parsed, _recv_body(sock, start, parsed.length - len(start), timeout,
                                  body_deadline, hold)
    except BaseException:
        if held:
            budget.give(held)
        raise


# --------------------------------------------------------------------------
# One request and its reply over a connected socket (plain or TLS).

# The key a request is signed with: a shared secret (no key id), an issued
# key (its id, ``runner:r1``), or none (unsigned).
Credentials = _record("Credentials", "secret key_id", defaults=(None, None))
# A call's limits: ``timeout`` to send, ``reply_timeout`` for the reply
# (None: ``timeout``, at least DEFAULT_READ_TIMEOUT), the largest reply,
# and how far its signed timestamp may be from our clock.
Limits = _record("Limits", "timeout reply_timeout max_message window",
                 defaults=(DEFAULT_CONNECT_TIMEOUT, None, DEFAULT_MAX_MESSAGE,
                           DEFAULT_AUTH_WINDOW))


def request(sock, command: str, argument: str = "", body: bytes = b"", *,
            credentials: Credentials = Credentials(), limits: Limits = Limits()) -> Message:
    """Send a request and return the verified reply.  ProtocolError for a
    malformed or unauthentic reply, OSError for network trouble."""
    payload = encode_message(command, argument, body)
    nonce = os.urandom(12).hex()
    secret = credentials.secret
    frame = encode_frame(payload, secret, nonce=nonce, key_id=credentials.key_id)
    sock.settimeout(limits.timeout + len(frame) / MIN_BODY_RATE)
    sock.sendall(frame)
    header, reply = read_frame(sock, limits.max_message,
                               limits.reply_timeout if limits.reply_timeout is not None else
                               max(limits.timeout, DEFAULT_READ_TIMEOUT))
    try:
        verify_frame(header, reply, secret, reply_to=nonce, fresh=Freshness(limits.window))
    except ProtocolError as exc:
        # A connection-limit refusal is sent before the request is read, so
        # it cannot be bound to it; quote what the peer said so the operator
        # sees why.  It is only shown, never acted on: a ``busy`` one says
        # at most that the peer is loaded (a miss, as a timeout is), any
        # other that it is not who we called (Unauthentic).
        kind = type(exc)
        if kind is Unauthentic and _says_busy(reply):
            kind = ProtocolError
        said = ascii_line(reply[:120].decode("ascii", "replace"), 120)
        raise kind(f"{exc}; unauthenticated reply {said!r}") from None
    return decode_message(reply)


def _says_busy(payload: bytes) -> bool:
    """Whether a reply that could not be verified is a ``busy`` refusal:
    the connection limit's, unsigned.  Anyone can send one, so it may
    only ever make a peer look slow, never gone."""
    try:
        return decode_message(payload).command == "busy"
    except ProtocolError:
        return False


class Reply(Exception):
    """Raised by a handler to answer with an error and close."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = ascii_line(text)
