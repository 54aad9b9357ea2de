"""The private bare repository the observer merges in, and the
environment of every git process that works on it.

Nothing a commit holds may steer a merge: a ``.gitattributes`` could ask
for ``merge=union`` (a conflict silently "resolved" by keeping both
sides), a filter, an encoding; a hook would run code.  So the merges are
made in ``<state>/merge.git``, not in the observer's clone: a bare
repository without an index or a work tree (git 2.39 then reads no
``.gitattributes`` from any tree), whose ``info/attributes`` unsets every
attribute that changes a merge or a blob, whose ``core.attributesFile``
is ``/dev/null`` and whose ``core.hooksPath`` is an empty folder.  Its
objects are the clone's (``objects/info/alternates``), so a fetch of the
clone is all it needs; what it writes (trees, merge commits) stays in
its own store.

The machine's configuration is kept out too: ``GIT_CONFIG_NOSYSTEM``, a
``HOME`` and ``XDG_CONFIG_HOME`` that hold nothing, and an environment
built from scratch (a ``GIT_DIR`` or ``GIT_CONFIG_*`` of the observer's
own environment is not passed on).  ssh still finds the observer's keys
(it reads them from the account's home, not from ``$HOME``) and its
agent (``SSH_AUTH_SOCK``); no credential helper is ever asked: a URL
needing a password carries it (``--push-url-file``), and git never
prompts (``GIT_TERMINAL_PROMPT=0``).  An http(s) URL's password reaches
git as configuration in its environment (``added_config``), not on its
command line (see ``url``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from ci.config import ConfigError

log = logging.getLogger(__name__)

REPO_FOLDER = "merge.git"
HOOKS_FOLDER = "merge-hooks"      # core.hooksPath: always empty
HOME_FOLDER = "merge-home"        # HOME and XDG_CONFIG_HOME: always empty

# Every attribute that could change how two trees merge or what a blob
# becomes, unset for every path ("!attr": unspecified, git's default).
NEUTRAL_ATTRIBUTES = ("* !merge !text !eol !crlf !filter !diff !working-tree-encoding !ident "
                      "!conflict-marker-size !whitespace !encoding !delta !binary "
                      "!export-ignore !export-subst\n")

# The repository's own configuration, written on every start.
SETTINGS = (
    ("core.bare", "true"),
    ("core.attributesFile", "/dev/null"),
    ("core.autocrlf", "false"),
    ("core.fsmonitor", "false"),
    ("core.logAllRefUpdates", "false"),
    ("gc.auto", "0"),
    ("merge.renormalize", "false"),
    ("commit.gpgSign", "false"),
    ("push.gpgSign", "false"),
    ("push.followTags", "false"),
    ("push.recurseSubmodules", "no"),
    ("submodule.recurse", "false"),
    ("fetch.recurseSubmodules", "false"),
)

# What the observer's environment may pass on to git: how to reach the
# upstream (ssh, proxies, CA certificates), nothing that changes git.
PASSED_ON = ("PATH", "TMPDIR", "SSH_AUTH_SOCK", "GIT_SSH", "GIT_SSH_COMMAND",
             "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "SSL_CERT_FILE", "SSL_CERT_DIR",
             "http_proxy", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")

SETUP_TIMEOUT = 60


def git_env(git_dir: str, home: str, hooks: str, extra: dict | None = None) -> dict:
    """The whole environment of a merge repository's git process."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(
        GIT_DIR=git_dir,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_ATTR_NOSYSTEM="1",
        GIT_NO_REPLACE_OBJECTS="1",
        GIT_TERMINAL_PROMPT="0",
        GIT_OPTIONAL_LOCKS="0",
        HOME=home,
        XDG_CONFIG_HOME=home,
        # Messages parsed (porcelain reasons, "unrelated histories") are English.
        LC_ALL="C",
        LANG="C",
        # Even the repository's own hooks folder is never searched: belt and braces.
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0="core.hooksPath",
        GIT_CONFIG_VALUE_0=hooks,
    )
    env.update(extra or {})
    return env


def added_config(env: dict, entries: tuple[tuple[str, str], ...]) -> dict:
    """The variables that give git ``entries`` as configuration beside the
    ``GIT_CONFIG_*`` ones ``env`` already holds: in the environment, which
    only the observer's user and root can read, unlike a command line."""
    count = int(env.get("GIT_CONFIG_COUNT", "0"))
    added = {"GIT_CONFIG_COUNT": str(count + len(entries))}
    for index, (key, value) in enumerate(entries, count):
        added[f"GIT_CONFIG_KEY_{index}"] = key
        added[f"GIT_CONFIG_VALUE_{index}"] = value
    return added


def empty_dir(path: str) -> str:
    """``path`` as an empty folder of ours (whatever was there is removed)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path, mode=0o700)
    return path


def objects_of(clone: str) -> str:
    return os.path.join(os.path.abspath(clone), ".git", "objects")


def prepare(clone: str, state_dir: str) -> tuple[str, str, str]:
    """Make (or bring up to date) ``<state>/merge.git`` and its empty
    hooks and home folders; (repository, home, hooks).  A repository
    half made by a killed observer is made again."""
    state_dir = os.path.abspath(state_dir)
    path = os.path.join(state_dir, REPO_FOLDER)
    home = empty_dir(os.path.join(state_dir, HOME_FOLDER))
    hooks = empty_dir(os.path.join(state_dir, HOOKS_FOLDER))
    objects = objects_of(clone)
    if not os.path.isdir(objects):
        raise ConfigError(f"{clone} has no object store at {objects}")
    if not os.path.isfile(os.path.join(path, "config")):
        building = path + ".new"
        shutil.rmtree(building, ignore_errors=True)
        _git(["init", "--quiet", "--bare", "--template=", building], home, hooks, state_dir)
        os.replace(building, path)
        log.info("made the merge repository %s", path)
    for key, value in SETTINGS + (("core.hooksPath", hooks),):
        _git(["config", "--file", os.path.join(path, "config"), key, value], home, hooks,
             state_dir)
    _write(os.path.join(path, "objects", "info", "alternates"), objects + "\n")
    _write(os.path.join(path, "info", "attributes"), NEUTRAL_ATTRIBUTES)
    # A hooks folder of the repository's own is never used; none is kept.
    shutil.rmtree(os.path.join(path, "hooks"), ignore_errors=True)
    return path, home, hooks


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _git(args: list[str], home: str, hooks: str, cwd: str) -> None:
    env = git_env("", home, hooks)
    del env["GIT_DIR"]
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, env=env,
                              cwd=cwd, stdin=subprocess.DEVNULL, timeout=SETUP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot make the merge repository: git {args[0]}: {exc}") from None
    if proc.returncode:
        raise ConfigError(f"cannot make the merge repository: git {args[0]} exited "
                          f"{proc.returncode}: {proc.stderr.strip()[-300:]}")
