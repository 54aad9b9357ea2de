"""Credentials: what ``--secret-file`` or ``CI_SECRET`` holds, read into
the ``wire.Credentials`` a request is signed with, and the other secret
files the daemons read (a webhook's secret, the dashboard's token).

Beside ci/wire.py, and as light: a git hook's ``notify`` reads its key
here on every push (hashing is imported only for an issued key)."""

from __future__ import annotations

import os

from ci.wire import Credentials


def read_secret_file(path: str, what: str = "secret file", shortest: int = 1) -> bytes:
    """A secret or token file's content, surrounding white space stripped;
    ValueError naming ``what`` if it cannot be read or is too short."""
    try:
        with open(path, "rb") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"{what} {path} is empty")
    if len(secret) < shortest:
        raise ValueError(f"{what} {path} must hold at least {shortest} characters")
    return secret


def read_credentials(path: str | None) -> Credentials:
    """(secret, key id): an issued key file (``ci-key-v1 role:name hex``,
    see auth.py) or a plain shared secret; (None, None) without either.
    ValueError with the reason for an unreadable or malformed one."""
    if path:
        secret = read_secret_file(path)
    else:
        secret = os.environ.get("CI_SECRET", "").strip().encode()
        if not secret:
            return Credentials()
    if secret.startswith(b"ci-key-v1 "):
        from ci import auth  # (hashing comes with it: for an issued key only)
        try:
            key_id, key = auth.parse_key_file(secret)
        except ValueError as exc:
            raise ValueError(f"{path or 'CI_SECRET'}: {exc}") from None
        return Credentials(key, key_id)
    return Credentials(secret)
