"""Issued keys and roles: who may say what to the dispatcher.

The dispatcher holds one master secret.  Every other process gets a key
of its own, derived from the master with HMAC (so the dispatcher stores
nothing per key and can recompute any key from its id)::

    key = HMAC-SHA256(master, "ci-key-v1\\n<role>\\n<name>")

A key file holds one line, ``ci-key-v1 <role>:<name> <hex key>``; a frame
signed with it carries the key id ``<role>:<name>`` so the dispatcher
knows which key to check it with.  A runner's key lets it act only as
that runner: register itself and report on the jobs it was given.  Tests
run on the runner, so a test that steals its runner's key gains exactly
that and nothing more (no ``dispatch``, no ``retest``, no other runner's
verdicts: those also need the job's token, which only the assignee got).

A plain shared secret (any other file content) still works, as the
master: whoever holds it may do everything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time

from ci import wire

KEY_MAGIC = "ci-key-v1"
ROLES = ("runner", "observer", "operator", "viewer")
NAME_RE = re.compile(wire.NAME_PATTERN)
KEY_ID_RE = re.compile(f"({'|'.join(ROLES)}):{wire.NAME_PATTERN}")
# The role of a frame signed with the master (or a plain shared secret).
ADMIN = "admin"

# What each role may ask the dispatcher.  ``admin`` may ask anything.
DISPATCHER_PERMISSIONS = {
    "register": {"runner"},
    "results": {"runner"},
    "release": {"runner"},
    "progress": {"runner"},
    "failing": {"runner"},
    "dispatch": {"observer", "operator"},
    "prefetch": {"observer", "operator"},
    "retest": {"observer", "operator"},
    "status": {"observer", "operator", "viewer"},
    "state": {"observer", "operator", "viewer"},
    "log": {"observer", "operator", "viewer"},
    # The land queue's question (issue 22): read-only, like ``status``.
    "verdicts": {"observer", "operator", "viewer"},
    # The land queue (issue 22): the observer owns it and tells its
    # snapshot and events; anyone who may look may read the snapshot.
    "queue-state": {"observer"},
    "queue-event": {"observer"},
    "queue": {"observer", "operator", "viewer"},
}

# What each role may ask the observer (``notify`` and ``status`` stay open
# to every authenticated peer).  Landing moves a protected branch: operators.
OBSERVER_PERMISSIONS = {
    "land": {"operator"},
    "unland": {"operator"},
    "queue": {"observer", "operator", "viewer"},
}


class KeyError_(ValueError):
    """A key file or key id that is not well formed."""


def derive_key(master: bytes, role: str, name: str) -> bytes:
    if role not in ROLES or not NAME_RE.fullmatch(name):
        raise KeyError_(f"invalid key id {role}:{name}")
    digest = hmac.new(master, f"{KEY_MAGIC}\n{role}\n{name}".encode(), hashlib.sha256)
    return digest.hexdigest().encode("ascii")


def format_key_file(role: str, name: str, master: bytes) -> str:
    return f"{KEY_MAGIC} {role}:{name} {derive_key(master, role, name).decode()}\n"


def parse_key_file(data: bytes) -> tuple[str, bytes] | None:
    """(key id, key) for an issued key file; None for a plain secret."""
    text = data.strip()
    if not text.startswith(KEY_MAGIC.encode() + b" "):
        return None
    parts = text.decode("ascii", "replace").split()
    if len(parts) != 3 or not KEY_ID_RE.fullmatch(parts[1]) or \
            not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
        raise KeyError_("malformed key file: expected 'ci-key-v1 <role>:<name> <64 hex>'")
    return parts[1], parts[2].encode("ascii")


def split_key_id(key_id: str) -> tuple[str, str]:
    role, _, name = key_id.partition(":")
    return role, name


class Revocations:
    """Names whose keys no longer count, from a file the operator edits
    with ``dispatcher.py revoke-key`` (re-read when it changes, at most
    once a second, so revoking needs no restart)."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        self._names: frozenset = frozenset()
        self._stamp = None
        self._checked = 0.0

    def revoked(self, key_id: str) -> bool:
        if not self.path:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= 1.0:
                self._checked = now
                self._reload()
            names = self._names
        return key_id in names or split_key_id(key_id)[1] in names

    def _reload(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._names, self._stamp = frozenset(), None
            return
        except OSError:
            return  # keep what we had
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().split()
        except OSError:
            return
        self._names, self._stamp = frozenset(lines), stamp


def add_revocation(path: str, entry: str) -> None:
    if not (KEY_ID_RE.fullmatch(entry) or NAME_RE.fullmatch(entry)):
        raise KeyError_(f"invalid key name {entry!r}: NAME or ROLE:NAME")
    with open(path, "a+b") as handle:
        # A last line without its newline (a torn write, or the operator's
        # own editing) would be glued to this entry, which would revoke
        # nothing; it is kept (cut, a hand-written entry would be lost).
        size = handle.seek(0, os.SEEK_END)
        lead = b"\n" if size and os.pread(handle.fileno(), 1, size - 1) != b"\n" else b""
        handle.write(lead + entry.encode("ascii") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


class MasterKeyring:
    """The dispatcher's side: any issued key id maps to its derived key,
    unless revoked; frames without a key id are checked with the master."""

    def __init__(self, master: bytes, revocations: Revocations | None = None):
        self.master = master
        self.revocations = revocations or Revocations(None)

    def lookup(self, key_id: str | None) -> tuple[bytes, str, str | None] | None:
        """(key, role, name) for a key id; None if unknown or revoked."""
        if not key_id:
            return self.master, ADMIN, None
        if not KEY_ID_RE.fullmatch(key_id) or self.revocations.revoked(key_id):
            return None
        role, name = split_key_id(key_id)
        return derive_key(self.master, role, name), role, name

    def key_for(self, role: str, name: str | None) -> tuple[bytes, str | None]:
        """What the dispatcher signs with when it calls a runner."""
        if name is None:
            return self.master, None
        return derive_key(self.master, role, name), f"{role}:{name}"


# --------------------------------------------------------------------------
# TLS certificates carry the role in their common name: "dispatcher",
# "observer", "runner-<name>", "operator-<name>", "viewer-<name>".

CERT_ROLES = ("dispatcher", "observer", "runner", "operator", "viewer")


def cert_role(peercert: dict | None) -> str | None:
    """The role a peer certificate was made for, from its common name."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for field, value in rdn:
            if field == "commonName":
                role = value.split("-", 1)[0]
                return role if role in CERT_ROLES else None
    return None
