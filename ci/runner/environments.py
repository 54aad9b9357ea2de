"""Cached virtual environments for the tests of a commit, and ``prepare``:
the one step between checkout and test run that reads the recipe and
makes the environment ready.

An environment is keyed by what decides its contents: the setup command,
the Python that runs it (a matrix cell's own, ``<python> -m venv``), the
cell's axis values, and the contents of the recipe's ``env_files``.
The next commit with the same key reuses it at the cost of a few ``stat``
calls (an editable install sees the new code without reinstalling); a
changed key builds a new one, and the least recently used beyond
``--keep-envs`` are deleted.

Environments are scoped, as CI caches are, because a setup runs the
commit's own code (``python -m pip`` in the clone's root imports a
``./pip`` package from the tree; a build backend or ``setup.py`` is the
commit's): an environment holds whatever the commit that built it put
there.  The scope is part of the key.  A trusted branch's commit (the
dispatcher's ``--trusted-branch``) builds and reuses only in the trusted
scope; another branch's commit reuses its own branch's environments or a
trusted one, and builds only into its branch's scope; a job whose branch
the runner was not told gets a scope of its own (its commit's).  So no
commit ever runs with what another, untrusted branch built.  The trusted
and the untrusted environments are pruned apart (``--keep-envs`` each),
so no branch can evict the trusted ones either.

An environment is used only once its build finished: a marker file is
written atomically after the setup command succeeded, and a folder without
it (a runner killed mid-setup) is deleted and built afresh.  The marker
takes the place of building in a temporary folder and renaming it: a venv
is not relocatable (pip writes the environment's absolute path into every
console script it installs), so it is built where it will be used.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import time

from ci.runner import recipe, venvs
from ci.runner.interpreters import JobCell
from ci.runner.sandbox.ownership import Owner, chown_tree
from ci.config import ConfigError
from ci.files import atomic_write, ensure_dir, open_inside, read_inside
from ci.wire import one_line

log = logging.getLogger(__name__)

DEFAULT_KEEP = 3
# A first build of a big project's dependencies can take minutes.
DEFAULT_SETUP_TIMEOUT = 900.0
# Changing how environments are built changes every key: old ones are not
# reused after an upgrade of the runner, and age out.
FORMAT = 1
MARKER = ".ci-env.json"
LOCK = ".lock"
KEY_LENGTH = 16
# The pools environments are pruned in: a key starts with its pool's name.
TRUSTED, UNTRUSTED = "trusted", "untrusted"
# Files and folders that matching the env_files patterns may look at, at
# most (each entry of a folder listed for a wildcard, each name looked up):
# far more than a project's lock files need, a fraction of a second.
MAX_ENV_FILE_ENTRIES = 100_000
_MAGIC = re.compile(r"[*?[]")   # what makes a part of a pattern a wildcard, as in glob


@dataclasses.dataclass(frozen=True)
class Scope:
    """Which environments a job may reuse and where it builds: ``name``
    goes into the key; ``label`` is what the result header says
    (``setup_scope``: trusted, branch or commit)."""
    name: str
    label: str

    @property
    def trusted(self) -> bool:
        return self.label == TRUSTED

    @property
    def reads(self) -> tuple["Scope", ...]:
        """Its own scope first, then (untrusted) the trusted one."""
        return (self,) if self.trusted else (self, TRUSTED_SCOPE)


TRUSTED_SCOPE = Scope(TRUSTED, TRUSTED)


def job_scope(branch: str | None, trusted: bool, commit: str) -> Scope:
    """The scope of a job: the trusted one for a trusted branch's commit,
    the branch's own for another branch's, the commit's own when no
    branch was said (an older dispatcher, a commit dispatched without
    metadata): never trusted then."""
    if branch is None:
        return Scope(f"commit:{commit}", "commit")
    return TRUSTED_SCOPE if trusted else Scope(f"branch:{branch}", "branch")


def pool_of(key: str) -> str:
    """The pruning pool of an environment folder: an unscoped one (from
    before scopes) ages out with the untrusted ones."""
    return TRUSTED if key.startswith(TRUSTED + "-") else UNTRUSTED


@dataclasses.dataclass
class Prepared:
    """What ``prepare`` hands back to the runner."""
    command: list[str] | None  # None: the runner's default test command
    python: str                # the interpreter for that default command
    env: dict
    timeout: float
    fields: dict               # setup, setup_duration; verdict/reason if failed
    failed: bool = False
    rerun_failures: int = 0    # reruns of failing tests (ci/runner/reruns.py)
    quarantine: tuple[str, ...] = ()   # test ids or patterns that decide nothing


class EnvironmentCache:
    """The environments of one runner, in one folder it alone uses
    (an exclusive lock on ``.lock`` for the runner's lifetime)."""

    def __init__(self, folder: str, keep: int = DEFAULT_KEEP):
        self.folder = ensure_dir(folder, "environment folder")
        self.keep = keep
        self._lock_fd = os.open(os.path.join(self.folder, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise ConfigError(f"environment folder {folder} is in use by another runner "
                             "(give each runner its own --env-dir)") from None
        self.remove_unfinished()

    def close(self) -> None:
        os.close(self._lock_fd)

    # ---- keys -----------------------------------------------------------
    def keys(self, setup: tuple[str, ...], repo: str, env_files: tuple[str, ...],
             scopes: tuple[Scope, ...], cell: JobCell | None = None) -> list[str]:
        """The key of the environment for ``setup`` in each scope (the
        env files are hashed once): ``<pool>-<hash>``.  ``cell``: the
        matrix cell's interpreter and axis values (None: the runner's own
        Python; a commit without a matrix keeps the keys it always had)."""
        cell = cell or JobCell.plain()
        contents = {
            "format": FORMAT, "setup": list(setup), "python": cell.python.full_version,
            "executable": os.path.realpath(cell.python.executable),
            "files": [[name, _file_digest(path, repo)]
                      for name, path in env_file_paths(repo, env_files)],
        }
        if cell.env:
            contents["axes"] = cell.env
        found = []
        for scope in scopes:
            digest = hashlib.sha256(json.dumps(dict(contents, scope=scope.name),
                                               sort_keys=True).encode())
            pool = TRUSTED if scope.trusted else UNTRUSTED
            found.append(f"{pool}-{digest.hexdigest()[:KEY_LENGTH]}")
        return found

    def key(self, setup: tuple[str, ...], repo: str, env_files: tuple[str, ...],
            scope: Scope, cell: JobCell | None = None) -> str:
        return self.keys(setup, repo, env_files, (scope,), cell)[0]

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key)

    # ---- use ------------------------------------------------------------
    def lookup(self, key: str) -> str | None:
        """The finished environment for ``key``, marked as just used."""
        marker = os.path.join(self.path(key), MARKER)
        try:
            os.utime(marker)
        except FileNotFoundError:
            return None
        return self.path(key)

    def activate(self, key: str, base_env: dict) -> dict:
        """The environment variables that put ``key``'s env first."""
        env = dict(base_env)
        env.pop("PYTHONHOME", None)
        env["VIRTUAL_ENV"] = self.path(key)
        bin_dir = os.path.join(self.path(key), "bin")
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", os.defpath)
        return env

    def python_of(self, key: str) -> str:
        return os.path.join(self.path(key), "bin", "python")

    # ---- building -------------------------------------------------------
    def build(self, key: str, setup: tuple[str, ...], run: SetupRun,
              timeout: float) -> tuple[bool, str]:
        """Make a fresh venv for ``key`` with the cell's interpreter and
        run ``setup`` in it (in the clone's root; an empty setup: a bare
        environment); (succeeded, reason).  Output goes to ``run.out``;
        with ``run.user``, the setup installs as that user, and the built
        environment is then taken back from it."""
        repo, slot, out, user = run.repo, run.slot, run.out, run.user
        python = (run.cell or JobCell.plain()).python
        path = self.path(key)
        # The one clearing of an old build (marker first, see _remove), so
        # the venv is not asked to clear it again.
        self._remove(path)
        started = time.monotonic()
        try:
            venvs.create(path, python, timeout)
            has_pip = venvs.provide_pip(path, python)
        except OSError as exc:
            self._remove(path)
            return False, f"cannot create the environment: {exc}"
        env = self.activate(key, run.env)
        env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        if user is not None:
            # The setup runs as the test user (--test-user) and installs here.
            chown_tree(path, Owner(user.uid, user.gid))
        if not has_pip:
            # The interpreter has no pip to lend: install the bundled one.
            code, timed_out = slot.run([self.python_of(key), "-m", "ensurepip", "--default-pip"],
                                       repo, timeout, out, env)
            if code != 0:
                self._remove(path)
                return False, "ensurepip failed" + (" (timed out)" if timed_out else "")
        remaining = max(timeout - (time.monotonic() - started), 1.0)
        try:
            code, timed_out = slot.run(list(setup), repo, remaining, out, env) if setup \
                else (0, False)
        except OSError as exc:
            self._remove(path)
            out.write(f"cannot start setup command {list(setup)!r}: {exc}\n".encode())
            return False, f"cannot start the setup command: {exc.strerror or exc}"
        if timed_out or code != 0:
            self._remove(path)
            return False, (f"timed out after {timeout:g}s" if timed_out else f"exited {code}")
        if user is not None:
            # Built: the runner's again, read-only to others and without
            # set-id bits, so that no later test (of another commit) can
            # change what it runs with.
            try:
                chown_tree(path, Owner(os.getuid(), os.getgid(), strip=0o6022, copy_links=True))
            except OSError as exc:
                self._remove(path)
                return False, f"cannot take the built environment back: {exc}"
        atomic_write(os.path.join(path, MARKER), json.dumps({
            "key": key, "setup": list(setup), "python": python.full_version,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - started, 3)}, indent=1).encode())
        self.prune(keep_also=key)
        return True, ""

    def finished(self) -> list[tuple[float, str]]:
        """(last use, key) of every finished environment, newest first."""
        found = []
        for name in os.listdir(self.folder):
            try:
                found.append((os.stat(os.path.join(self.folder, name, MARKER)).st_mtime, name))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return sorted(found, reverse=True)

    def prune(self, keep_also: str | None = None) -> None:
        """Delete the least recently used finished environments beyond
        ``keep`` in each pool: the untrusted builds of every branch never
        push a trusted environment out."""
        pools: dict[str, list[str]] = {}
        for _, key in self.finished():
            if key != keep_also:
                pools.setdefault(pool_of(key), []).append(key)
        for pool, ordered in pools.items():
            keep = self.keep - (1 if keep_also and pool_of(keep_also) == pool else 0)
            for key in ordered[max(keep, 0):]:
                log.info("removing environment %s (least recently used)", key)
                self._remove(self.path(key))

    def remove_unfinished(self) -> None:
        """Folders without a marker: builds a killed runner left behind."""
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            if not os.path.exists(os.path.join(path, MARKER)):
                log.warning("removing unfinished environment %s", name)
                self._remove(path)

    @staticmethod
    def _remove(path: str) -> None:
        # The marker first: a removal cut short must not leave a folder
        # that still looks finished.
        try:
            os.unlink(os.path.join(path, MARKER))
        except (FileNotFoundError, NotADirectoryError):
            pass
        shutil.rmtree(path, ignore_errors=True)


def env_file_paths(repo: str, patterns: tuple[str, ...],
                   limit: int | None = None) -> list[tuple[str, str]]:
    """(name, path) of the existing regular files the patterns name inside
    ``repo``, sorted; files resolving outside the clone are left out.

    A pattern matches as ``glob`` does (``*`` skips names starting with a
    dot, ``**`` is ``*``), except that a symlink to a folder is a leaf, as
    it is in git: followed, two links to ``.`` made ``*/*/.../x`` visit
    2**depth paths, and a 40-level pattern hung the runner before any
    setup ran.  A symlink to a file inside the clone still names it.
    RecipeError once more than ``limit`` (MAX_ENV_FILE_ENTRIES) files and
    folders were looked at: the patterns of a tree that big are no key."""
    limit = MAX_ENV_FILE_ENTRIES if limit is None else limit
    root = os.path.realpath(repo)
    walk = _EnvFileWalk(repo, root, limit)
    found = set()
    for pattern in patterns:
        found.update(walk.matches(pattern))
    return sorted(found)


class _EnvFileWalk:
    """The matching of one commit's patterns, with one count of what it
    looked at for them all."""

    def __init__(self, repo: str, root: str, limit: int):
        self.repo, self.root, self.limit = repo, root, limit
        self.looked = 0

    def matches(self, pattern: str) -> set[tuple[str, str]]:
        parts = [p for p in pattern.split("/") if p not in ("", ".")]
        folders = [("", self.repo)] if parts else []
        found = set()
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            deeper = []
            for name, folder in folders:
                for child in self._children(folder, part):
                    path = os.path.join(folder, child)
                    shown = f"{name}/{child}" if name else child
                    if last:
                        real = os.path.realpath(path)
                        if os.path.isfile(real) and real.startswith(self.root + os.sep):
                            found.add((shown, path))
                    elif _is_folder(path):
                        deeper.append((shown, path))
            folders = deeper
        return found

    def _children(self, folder: str, part: str) -> list[str]:
        """The names in ``folder`` that ``part`` matches (a name without
        wildcards is looked up, not listed)."""
        if not _MAGIC.search(part):
            self._count()
            return [part] if os.path.lexists(os.path.join(folder, part)) else []
        names = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    self._count()
                    if entry.name.startswith(".") and not part.startswith("."):
                        continue
                    if fnmatch.fnmatchcase(entry.name, part):
                        names.append(entry.name)
        except OSError:
            return []
        return names

    def _count(self) -> None:
        self.looked += 1
        if self.looked > self.limit:
            raise recipe.RecipeError(
                f"{recipe.RECIPE_FILE}: matching env_files looked at more than "
                f"{self.limit} files and folders (name fewer, or more precise, patterns)")


def _is_folder(path: str) -> bool:
    """A folder that is no symlink (see env_file_paths)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _file_digest(path: str, repo: str) -> str:
    """The file's hash, read as a stream (a regular file ends, so any size
    is keyed by its content); the file is the tested commit's, so one that
    leads out of the clone (a symlink to a key, to /dev/zero) is not read."""
    try:
        with open(open_inside(path, repo), "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


# --------------------------------------------------------------------------
# The step between checkout and tests.

@dataclasses.dataclass
class SetupRun:
    """Where a job's setup runs: the clone, the slot that runs its
    commands (a stop kills them), their base environment, the file their
    output goes to, and the test user who runs them (``--test-user``;
    None: the runner's own user).  The user is named here, not found in
    the slot: the environment it builds must first be given to it.
    ``cell``: the job's matrix cell (None: the runner's own Python)."""
    repo: str
    slot: object
    env: dict
    out: object
    user: object = None
    cell: JobCell | None = None


class Preparer:
    """Reads a commit's recipe and readies its environment."""

    def __init__(self, limits: recipe.Limits, cache: EnvironmentCache | None = None,
                 read_recipe: bool = True):
        self.limits = limits
        self.cache = cache
        self.read_recipe = read_recipe

    def prepare(self, run: SetupRun, scope: Scope) -> Prepared:
        """The command, environment and time limit for the tests of the
        commit checked out in ``run.repo``, with the setup fields.  Recipe
        notes and the setup's output are written to ``run.out``.
        ``scope``: which environments the commit may reuse, and where it
        builds."""
        repo, base_env, out = run.repo, run.env, run.out
        started = time.monotonic()
        cell = run.cell or JobCell.plain()
        result = Prepared(None, cell.python.executable, base_env, self.limits.timeout,
                          {"setup": "none"}, rerun_failures=self.limits.rerun_failures)
        try:
            text = read_recipe_file(repo) if self.read_recipe else None
            plan = recipe.resolve(text, self.limits)
        except recipe.RecipeError as exc:
            return _failed(result, one_line(str(exc), 300), out)
        for note in plan.notes:
            out.write(f"[ci] {note}\n".encode())
        result.command = list(plan.test) if plan.test else None
        result.timeout = plan.timeout
        result.rerun_failures, result.quarantine = plan.rerun_failures, plan.quarantine
        setup = plan.setup
        if setup is None and (not own_python(cell) or (cell.name and self.cache)):
            # No setup, but ``python`` in the commands must be the cell's:
            # even the runner's own, left to PATH, could be a version shim
            # that follows the .python-version the commit carries.
            setup = ()
        if setup is None:
            return result
        if self.cache is None:
            return _failed(result, "setup failed: this runner has no environment folder", out)
        try:
            key, used, found = self._reusable(setup, plan, run, scope)
        except recipe.RecipeError as exc:   # env_files past MAX_ENV_FILE_ENTRIES
            return _failed(result, one_line(str(exc), 300), out)
        result.fields["setup_scope"] = used.label
        if found:
            result.fields["setup"] = "reused"
        else:
            log.info("building environment %s (%s): %s", key, scope.name, _shown(setup))
            out.write(f"[ci] setup: building environment {key} ({scope.label} scope"
                      f"{', ' + cell.python.label if cell.name else ''}): "
                      f"{_shown(setup) or '(no setup command)'}\n".encode())
            out.flush()
            ok, why = self.cache.build(key, setup, run, plan.setup_timeout)
            result.fields["setup"] = "built" if ok else "failed"
        # Reused, built or failed: the time it took is worth showing.
        result.fields["setup_duration"] = f"{time.monotonic() - started:.3f}"
        if result.fields["setup"] == "failed":
            return _failed(result, f"setup failed: {why}", out)
        if result.fields["setup"] == "built":
            out.write(b"[ci] setup: done\n")
        result.env = self.cache.activate(key, base_env)
        result.python = self.cache.python_of(key)
        return result

    def _reusable(self, setup: tuple[str, ...], plan: recipe.Recipe, run: SetupRun,
                  scope: Scope) -> tuple[str, Scope, bool]:
        """(key, its scope, True) of a finished environment ``scope`` may
        reuse (its own first); else (the key to build, ``scope``, False):
        a build goes into the job's own scope only."""
        keys = self.cache.keys(setup, run.repo, plan.env_files, scope.reads, run.cell)
        for key, where in zip(keys, scope.reads):
            if self.cache.lookup(key):
                return key, where, True
        return keys[0], scope, False


def own_python(cell: JobCell) -> bool:
    """Whether the cell runs with the runner's own interpreter (which
    needs no environment of its own when there is no setup)."""
    return os.path.realpath(cell.python.executable) == os.path.realpath(sys.executable)


def read_recipe_file(repo: str) -> str | None:
    """The recipe's text, None if the commit has none.  Only a regular
    file is read: a symlink could point anywhere on the runner."""
    path = os.path.join(repo, recipe.RECIPE_FILE)
    try:
        data = read_inside(path, repo, recipe.MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise recipe.RecipeError(f"{recipe.RECIPE_FILE} cannot be read: "
                                 f"{exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise recipe.RecipeError(f"{recipe.RECIPE_FILE} is not UTF-8 "
                                 f"(byte {exc.start})") from None


def _failed(result: Prepared, reason: str, out) -> Prepared:
    result.failed = True
    result.fields.update(verdict="error", reason=reason)
    out.write(f"\n[ci] {reason}\n".encode())
    return result


def _shown(command: tuple[str, ...]) -> str:
    return one_line(" ".join(command), 500)
