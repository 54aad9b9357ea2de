"""Who may talk to a daemon, and how: the security settings built from
the flags (secret or issued key, TLS contexts and roles, limits), and
the nonce cache that refuses a replayed frame, also across restarts
(the nonces are kept in the daemon's state folder)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import ipaddress
import logging
import os
import ssl
import threading
import time

from ci.config import ConfigError, check_per_client
from ci.files import atomic_write
from ci.credentials import read_credentials
from ci.wire import (DEFAULT_AUTH_WINDOW, DEFAULT_MAX_BUFFERED, DEFAULT_MAX_MESSAGE,
                     DEFAULT_READ_TIMEOUT, Busy)

log = logging.getLogger(__name__)


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


def security_from_args(args: argparse.Namespace) -> Security:
    """The keys, TLS contexts and limits the common flags ask for (their
    sizes and durations are checked positive as they are parsed)."""
    if hasattr(args, "max_connections"):
        check_per_client(args)
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


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
