"""--test-user: at start, make sure the test user can run and read what
the runner will hand it, and refuse to start, in one line, when it cannot.

A runner whose test user cannot execute its Python (one installed in
root's home, say) or read the clone would otherwise start and give every
commit the verdict ``error`` ("cannot start test command: Permission
denied"): a deployment mistake that reads as a broken branch and notifies
people.  Each check is asked as the user, never guessed from modes: a
forked child switches to it and calls ``os.access``, and an interpreter is
really started as the user with ``-c pass`` (which also loads its shared
libraries and standard library).

The unittest recorder is provided rather than only checked: the runner's
own code may lie where only the runner's user can go (a clone in root's
home), so a copy goes into the state folder, which the test user passes
through (mode 711) as it does to reach the environments.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys

from ci import sharding
from ci.runner import junit_capture, ordering
from ci.config import ConfigError
from ci.files import atomic_write
from ci.wire import one_line

log = logging.getLogger(__name__)

# Starting a Python takes well under a second; a slow disk gets room.
PROBE_TIMEOUT = 30.0
# What the child may answer with (a path and a reason).
ANSWER_LIMIT = 4096
PYTHON_NAME = re.compile(r"python[0-9.]*")
# Names an environment's bin folder provides (its Python and pip).
ENV_NAME = re.compile(r"(python|pip)[0-9.]*")
RUNNER_PYTHON = "the runner's Python, which its environments and default test command use"


def provide_recorder(state_dir: str) -> str:
    """Copy the recorder, the ordering plugin (ci_order.py, which the
    recorder loads from beside itself) and the pytest shard plugin
    (ci_shard.py, which pytest loads from the same folder) into
    ``<state_dir>/ci_support``
    (the runner's, readable by all, so the tests can run them but not
    change them for the next commit) and have the test command use those
    copies."""
    folder = os.path.join(state_dir, "ci_support")
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o755)
    plugins = [os.path.join(ordering.SUPPORT, name + ".py")
               for name in (ordering.PLUGIN, sharding.PYTEST_PLUGIN)]
    target = ""
    for path in (junit_capture.RECORDER, *plugins):
        with open(path, "rb") as handle:
            data = handle.read()
        target = os.path.join(folder, os.path.basename(path))
        if os.path.abspath(target) != os.path.abspath(path):
            atomic_write(target, data, fsync=False)
            os.chmod(target, 0o644)
    recorder = os.path.join(folder, os.path.basename(junit_capture.RECORDER))
    junit_capture.use_recorder(recorder)
    ordering.use_support(folder)
    return recorder


def check_test_user(user, repo: str, preparer, test_command: list[str] | None,
                    env: dict) -> None:
    """ConfigError, naming what and why, unless the test user can reach
    the clone, read the recorder, pass through the environment folder and
    execute every interpreter and program the runner will start as it.
    ``env`` is the environment the tests get (its PATH decides what a
    bare command name is)."""
    needs = [(repo, os.R_OK | os.W_OK | os.X_OK, "enter and change", "the clone")]
    needs.append((junit_capture.RECORDER, os.R_OK, "read", "the unittest recorder"))
    if preparer.cache is not None:
        needs.append((preparer.cache.folder, os.X_OK, "pass through",
                      "the environment folder"))
    for path, mode, verb, role in needs:
        why = ask_as(user, why_not, path, mode)
        if why:
            raise ConfigError(f"test user {user.name} cannot {verb} {path} ({role}): "
                                      f"{why}")
    if test_command is None or preparer.cache is not None:
        for python in runner_pythons():
            check_python(user, python, RUNNER_PYTHON, repo, env)
    if test_command:
        check_program(user, test_command[0], "the test command", repo, env,
                      preparer.cache is not None)
    if preparer.limits.setup:
        check_program(user, preparer.limits.setup[0], "the setup command", repo, env, True)


def check_interpreters(user, interpreters: dict, repo: str, env: dict) -> None:
    """Each ``--python`` interpreter started as the user, as named and
    resolved (a cell's environment links to it), so that a cell is never
    given an interpreter its tests cannot run."""
    for version, interpreter in sorted(interpreters.items()):
        role = f"--python {version}, for matrix cells"
        for path in dict.fromkeys((interpreter.executable,
                                   os.path.realpath(interpreter.executable))):
            check_python(user, path, role, repo, env)


def runner_pythons() -> list[str]:
    """The interpreter the default test command runs and the one a new
    environment's ``bin/python`` links to (venv uses the base one), each
    as named (a link the user cannot reach fails though its target would
    not) and resolved."""
    named = [sys.executable, getattr(sys, "_base_executable", None) or sys.executable]
    return list(dict.fromkeys(named + [os.path.realpath(path) for path in named]))


def check_python(user, python: str, role: str, repo: str, env: dict) -> None:
    """Start ``python -c pass`` as the user, in the clone, as a test would."""
    why = run_as(user, [python, "-c", "pass"], repo, env)
    if why:
        raise ConfigError(f"test user {user.name} cannot execute {python} ({role}): "
                                  f"{explain(user, python, env) or why}")


def check_program(user, name: str, role: str, repo: str, env: dict,
                  has_env: bool) -> None:
    """A command's program: a Python is started, anything else must be
    executable by the user, and so must its ``#!`` interpreter.  A path
    relative to the clone is the commit's; a name an environment provides
    (``has_env``) or that nobody finds (it may come from one) is left to
    the run."""
    if "/" in name and not os.path.isabs(name):
        return
    if has_env and "/" not in name and ENV_NAME.fullmatch(name):
        return
    if PYTHON_NAME.fullmatch(os.path.basename(name)):
        check_python(user, name, role, repo, env)
        return
    found = ask_as(user, which, name, env.get("PATH", os.defpath))
    if not found:
        if "/" in name or shutil.which(name, path=env.get("PATH", os.defpath)):
            raise ConfigError(f"test user {user.name} cannot execute {name} ({role}): "
                                      f"{explain(user, name, env) or 'permission denied'}")
        log.info("%s %s is not on the test user's PATH (an environment may provide it)",
                 role, name)
        return
    interpreter = shebang(found)
    if interpreter:
        check_program(user, interpreter, f"the interpreter of {found}, {role}", repo, env,
                      False)


def shebang(path: str) -> str | None:
    """The program a script's ``#!`` line names (``env NAME``: NAME)."""
    try:
        with open(path, "rb") as handle:
            line = handle.readline(256)
    except OSError:
        return None
    if not line.startswith(b"#!"):
        return None
    words = line[2:].decode("utf-8", "replace").split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
    return words[0] if words else None


def run_as(user, argv: list[str], cwd: str, env: dict) -> str:
    """'' when ``argv`` runs as the user and exits 0; otherwise why not."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=PROBE_TIMEOUT, user=user.uid, group=user.gid,
                              extra_groups=[])
    except subprocess.TimeoutExpired:
        return f"it did not finish within {PROBE_TIMEOUT:g}s"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    if proc.returncode == 0:
        return ""
    lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    return one_line(lines[-1], 300) if lines else f"it exited {proc.returncode}"


def explain(user, name: str, env: dict) -> str:
    """Why the user cannot execute ``name``: the first folder on the way
    it may not pass, or the file's mode; '' if none is found."""
    path = name
    if "/" not in name:
        path = shutil.which(name, path=env.get("PATH", os.defpath)) or ""
        if not path:
            return f"{name} is not on the PATH"
    for candidate in dict.fromkeys((path, os.path.realpath(path))):
        why = ask_as(user, why_not, candidate, os.X_OK)
        if why:
            return why
    return ""


# --------------------------------------------------------------------------
# Asked of the kernel as the user, in a forked child.

def ask_as(user, question, *args) -> str:
    """``question(*args)`` answered in a child switched to the user (its
    str answer, at most ANSWER_LIMIT bytes).  Called at start-up, before
    the runner starts any thread."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            answer = question(*args).encode("utf-8", "replace")[:ANSWER_LIMIT]
            os.write(write_end, answer)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        answer = handle.read(ANSWER_LIMIT + 1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise ConfigError(f"--test-user {user.name}: cannot check what that user "
                                  f"may reach ({question.__name__} {args[0]})")
    return answer.decode("utf-8", "replace")


def why_not(path: str, mode: int) -> str:
    """(As the user.)  '' when ``path`` allows ``mode`` and every folder
    above it may be passed; else the first that stops the user."""
    current = os.sep
    for part in [p for p in os.path.abspath(path).split(os.sep) if p][:-1]:
        current = os.path.join(current, part)
        if not os.access(current, os.X_OK):
            return described(current)
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, mode):
        return described(path)
    return ""


def described(path: str) -> str:
    """``/root is mode 700 (owner root)``."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    return f"{path} is mode {stat.S_IMODE(info.st_mode):o} (owner {owner})"


def which(name: str, search_path: str) -> str:
    """(As the user.)  The file ``name`` runs as, '' if none it may run."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and os.path.isfile(name) else ""
    return shutil.which(name, path=search_path) or ""
