"""Where the observer pushes, and keeping its credentials out of every log
line and command line.

The push URL is ``--push-url URL``, or ``--push-url-file FILE`` (a URL
with credentials, e.g. ``https://ci:TOKEN@git.example/proj.git``, in a
file only its owner can read), or by default the clone's own ``origin``
(its ``pushurl`` if it has one).  A URL read from a file is never shown
at all: logs and errors name it ``<push URL from FILE>``; any other is
shown without its user information.  ``PushUrl.redact`` applies that to
any text (git's own error output included) before it is logged.

Nor is an http(s) URL's user information ever on a command line, where
any local user reads it (``/proc/<pid>/cmdline``, ``ps``): git is given
the URL without it (``PushUrl.argument``) and the credentials as an
``Authorization`` header in its environment (``PushUrl.git_config``,
``http.<url>.extraHeader`` through ``GIT_CONFIG_*``), which only the
observer's user and root can read; the helpers git starts inherit both.
Other URLs (a path, ``file://``, ssh) reach git as given: ssh's user is
a login name, not a secret."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import urllib.parse
from typing import NamedTuple

from ci.config import ConfigError

# ``scheme://user:password@`` anywhere in a text.
USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")
MAX_URL_FILE = 64 * 1024


# Schemes whose user information git sends as HTTP Basic authentication.
HTTP_SCHEMES = ("http", "https")


class PushUrl(NamedTuple):
    url: str              # as given, credentials and all: never a git argument
    shown: str            # how logs and errors name it
    secrets: tuple = ()   # strings never to appear in a log (the URL, its password)

    def redact(self, text: str) -> str:
        return redact(text, self)

    @property
    def argument(self) -> str:
        """What git's command line names: the URL without an http(s)
        user information."""
        return split_credentials(self.url)[0]

    @property
    def git_config(self) -> tuple[tuple[str, str], ...]:
        """The configuration that gives git the credentials ``argument``
        lacks (for the environment, never the command line)."""
        bare, header = split_credentials(self.url)
        return ((f"http.{bare}.extraHeader", header),) if header else ()


def split_credentials(url: str) -> tuple[str, str | None]:
    """(``url`` without its user information, the ``Authorization`` header
    git would have made of it) for an http(s) URL that has one; else
    (``url``, None).  The header is Basic, sent with the first request
    (git itself sends it once a 401 asks for it): what a token needs."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in HTTP_SCHEMES:
        return url, None
    end = len(rest)
    for stop in "/?#":
        if stop in rest:
            end = min(end, rest.index(stop))
    userinfo, at, host = rest[:end].rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    header = "Authorization: Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return f"{scheme}://{host}{rest[end:]}", header


def strip_userinfo(url: str) -> str:
    return USERINFO_RE.sub(r"\1***@", url)


def redact(text: str, push_url: PushUrl | None) -> str:
    """``text`` with the push URL replaced by how it is shown, and any
    ``scheme://user:password@`` made ``scheme://***@``."""
    if push_url is not None:
        for secret in sorted(push_url.secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, push_url.shown)
    return USERINFO_RE.sub(r"\1***@", text)


def secrets_of(url: str) -> tuple[str, ...]:
    """The URL and the parts of it that are credentials (user information,
    as given and decoded), to be replaced wherever they appear; and the URL
    as git is given it (without them), which git's messages quote."""
    found = [url, split_credentials(url)[0]]
    parts = urllib.parse.urlsplit(url) if "://" in url else None
    if parts is not None and "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found.append(userinfo)
        user, _, password = userinfo.partition(":")
        for part in (password, urllib.parse.unquote(password)):
            if len(part) >= 4:   # a short one would blank out ordinary words
                found.append(part)
    return tuple(dict.fromkeys(found))


def from_flag(url: str) -> PushUrl:
    check_url(url, "--push-url")
    return PushUrl(url, strip_userinfo(url), secrets_of(url))


def from_file(path: str) -> PushUrl:
    """The URL in ``path``: a regular file that neither group nor others
    can read or write (ConfigError otherwise, the content never quoted)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read --push-url-file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"--push-url-file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"--push-url-file {path} can be read or written by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):03o}); it holds credentials: chmod 600 it")
        data = os.read(fd, MAX_URL_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_URL_FILE:
        raise ConfigError(f"--push-url-file {path} is too big for a URL")
    try:
        url = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--push-url-file {path} is not UTF-8 text") from None
    check_url(url, f"--push-url-file {path}", quote=False)
    return PushUrl(url, f"<push URL from {path}>", secrets_of(url))


def check_url(url: str, what: str, quote: bool = True) -> None:
    if not url or not url.isprintable() or any(c.isspace() for c in url) \
            or url.startswith("-"):
        shown = f" {strip_userinfo(url)!r}" if quote else ""
        raise ConfigError(f"{what}: not a usable URL{shown} (one line, no spaces, "
                          "not starting with '-')")


def default(clone: str) -> PushUrl:
    """The clone's ``remote.origin.pushurl``, else its ``url``, read from its
    config file as data (``git config --file``: no include, no command);
    a clone without an origin is the upstream itself."""
    config = os.path.join(os.path.abspath(clone), ".git", "config")
    for key in ("remote.origin.pushurl", "remote.origin.url"):
        try:
            proc = subprocess.run(["git", "config", "--file", config, "--get", key],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=60, env={"PATH": os.environ.get("PATH", os.defpath),
                                                   "GIT_CONFIG_NOSYSTEM": "1"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"cannot read {config}: {exc}") from None
        url = proc.stdout.strip()
        if proc.returncode == 0 and url:
            return from_flag(absolute(url, clone))
    return from_flag(os.path.abspath(clone))


def absolute(url: str, base: str) -> str:
    """A relative local path as the clone's git would read it."""
    if "://" in url or os.path.isabs(url) or re.match(r"^[^/]+:", url):
        return url
    return os.path.normpath(os.path.join(os.path.abspath(base), url))
