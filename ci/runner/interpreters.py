"""The Pythons a runner can test with, and the labels it advertises.

A matrix cell names the interpreter it needs (``python: 3.12`` in the
``runtest`` job); the runner knows which ones it has from ``--python``:

* ``--python 3.12=/opt/py312/bin/python3``: that file;
* ``--python 3.12``: ``python3.12`` as found on the runner's PATH;
* ``--python auto``: every ``python3.X`` found on the PATH that resolves;
* no ``--python``: the runner's own interpreter only (as before matrices).

Each is resolved once, at start, to a real interpreter: it is run
(``-I -c``, in an empty folder) and asked for its ``sys.executable``,
version and pip, and the job uses what it reports, never the name given.
A version shim (pyenv's, asdf's: a script that picks an interpreter each
time it runs) is not an interpreter: at job time it would follow the
``.python-version`` a commit carries, so the commit would choose what it
runs on.  A shim is resolved in the empty folder to the interpreter it
stands for (the runner says so), or refused when it does not resolve.

A job that names no interpreter runs with the runner's own, as always.
Each interpreter is advertised in ``register`` as the label ``python3.X``,
beside the ``--label`` names.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile

from ci.config import ConfigError
from ci.matrix import LABEL_RE
from ci.wire import one_line

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"[0-9]\.[0-9]{1,2}")
# Labels that stand for an interpreter: only --python gives them.
PYTHON_LABEL_RE = re.compile(r"python[0-9]+\.[0-9]+")
PATH_NAME_RE = re.compile(r"python3\.[0-9]{1,2}")
AUTO = "auto"
MAX_LABELS = 32
# Starting an interpreter takes well under a second; a shim or a slow disk more.
PROBE_TIMEOUT = 30.0
# Asked of each interpreter (isolated, so no file in its folder is imported).
PROBE = ("import importlib.util, json, sys\n"
         "spec = importlib.util.find_spec('pip')\n"
         "print(json.dumps({'executable': sys.executable, 'version': list(sys.version_info[:2]),"
         " 'full': sys.version, 'pip': spec.origin if spec and spec.origin else None}))")


@dataclasses.dataclass(frozen=True)
class Interpreter:
    """A real interpreter: ``executable`` as it reports itself,
    ``version`` (``3.12``), ``full_version`` (``sys.version``, part of an
    environment's key) and its pip package's folder (copied into new
    environments; None: none)."""
    version: str
    executable: str
    full_version: str
    pip: str | None = None

    @property
    def label(self) -> str:
        return f"python{self.version}"


@dataclasses.dataclass(frozen=True)
class PythonFlag:
    """One ``--python``: a version and its path (None: look the version
    up on PATH), or ``auto`` (version None)."""
    version: str | None
    path: str | None = None


def python_flag(text: str) -> PythonFlag:
    """argparse ``type=`` of ``--python``: ``3.12=PATH``, ``3.12`` or ``auto``."""
    if text == AUTO:
        return PythonFlag(None)
    version, sep, path = text.partition("=")
    if not VERSION_RE.fullmatch(version):
        raise argparse.ArgumentTypeError(
            f"expected VERSION=PATH, VERSION or {AUTO} with a version such as 3.12, "
            f"not {text[:80]!r}")
    if sep and not path:
        raise argparse.ArgumentTypeError(f"no path after {version}=")
    return PythonFlag(version, path or None)


def runner_label(text: str) -> str:
    """argparse ``type=`` of ``--label``: letters, digits, '.', '_', '-'
    (1 to 64); a ``python3.X`` label is an interpreter's, given by --python."""
    if not LABEL_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid label {text[:80]!r}: 1 to 64 letters, digits, '.', '_' or '-'")
    if PYTHON_LABEL_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"label {text} names an interpreter: give it with --python {text[6:]}=PATH")
    return text


def own() -> Interpreter:
    """The runner's own interpreter, known without running anything."""
    spec = importlib.util.find_spec("pip")
    return Interpreter(f"{sys.version_info[0]}.{sys.version_info[1]}", sys.executable,
                       sys.version, pip_folder(spec.origin if spec else None))


def pip_folder(origin: str | None) -> str | None:
    return os.path.dirname(origin) if origin else None


def is_script(path: str) -> bool:
    """A ``#!`` script (a shim or wrapper), not an interpreter binary."""
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"#!"
    except OSError:
        return False


def probe(path: str) -> Interpreter:
    """Run ``path`` and ask what it is; ConfigError with the reason."""
    with tempfile.TemporaryDirectory(prefix="ci-python-probe-") as empty:
        # An empty folder: no .python-version a shim could follow.
        try:
            proc = subprocess.run([path, "-I", "-c", PROBE], cwd=empty,
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{path} did not answer within {PROBE_TIMEOUT:g}s") from None
        except OSError as exc:
            raise ConfigError(f"cannot run {path}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ConfigError(f"{path} exited {proc.returncode}"
                          + (f": {one_line(lines[0], 200)}" if lines else ""))
    try:
        answer = json.loads(proc.stdout.decode("utf-8").strip().splitlines()[-1])
        version = "%d.%d" % tuple(answer["version"])
        return Interpreter(version, str(answer["executable"]), str(answer["full"]),
                           pip_folder(answer["pip"]))
    except (ValueError, IndexError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a Python interpreter (its answer: "
                          f"{one_line(proc.stdout.decode('utf-8', 'replace'), 120)!r})"
                          ) from None


def resolve(path: str, version: str | None = None) -> Interpreter:
    """The real interpreter ``path`` is (or, a shim, stands for);
    ConfigError unless it is one, of ``version`` if given."""
    shim = is_script(path)
    try:
        found = probe(path)
    except ConfigError as exc:
        if shim:
            raise ConfigError(f"{path} is a version shim (a script, not an interpreter) "
                              f"and does not resolve here ({exc}); give the interpreter "
                              "itself") from None
        raise
    if not found.executable or not os.path.isfile(found.executable) \
            or is_script(found.executable):
        raise ConfigError(f"{path} is not an interpreter: it reports sys.executable "
                          f"{found.executable!r}")
    if version is not None and found.version != version:
        raise ConfigError(f"{path} is Python {found.version}, not {version}")
    if shim:
        log.info("%s is a version shim; using the interpreter it resolves to, %s",
                 path, found.executable)
    return found


def on_path(name: str, search_path: str) -> list[str]:
    """Every ``name`` on ``search_path``, in order."""
    found = []
    for folder in search_path.split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            found.append(candidate)
    return found


def discover(search_path: str) -> dict[str, Interpreter]:
    """``--python auto``: the first ``python3.X`` on the PATH of each
    version that resolves; shims that do not are left out, with a note."""
    names = set()
    for folder in search_path.split(os.pathsep):
        try:
            names.update(n for n in os.listdir(folder or ".") if PATH_NAME_RE.fullmatch(n))
        except OSError:
            continue
    found: dict[str, Interpreter] = {}
    for name in sorted(names, key=lambda n: int(n.split(".")[1])):
        for candidate in on_path(name, search_path):
            try:
                found[name[6:]] = resolve(candidate, name[6:])
                break
            except ConfigError as exc:
                log.info("--python auto: leaving out %s: %s", candidate, exc)
    return found


def from_flags(flags: list[PythonFlag] | None,
               search_path: str | None = None) -> dict[str, Interpreter]:
    """The interpreters the ``--python`` flags give, by version (none
    given: the runner's own); ConfigError naming the flag that fails."""
    if not flags:
        mine = own()
        return {mine.version: mine}
    search_path = os.environ.get("PATH", os.defpath) if search_path is None else search_path
    found: dict[str, Interpreter] = {}
    for flag in flags:
        if flag.version is None:
            for version, interpreter in discover(search_path).items():
                found.setdefault(version, interpreter)
            continue
        path = flag.path
        if path is None:
            candidates = on_path(f"python{flag.version}", search_path)
            if not candidates:
                raise ConfigError(f"--python {flag.version}: no python{flag.version} on PATH")
            path = candidates[0]
        try:
            found[flag.version] = resolve(path, flag.version)
        except ConfigError as exc:
            raise ConfigError(f"--python {flag.version}: {exc}") from None
    if not found:
        raise ConfigError("--python auto: no python3.X on PATH resolves to an interpreter")
    return found


def advertised(labels: list[str] | None, interpreters: dict[str, Interpreter]) -> list[str]:
    """What ``register`` says this runner has: its ``--label`` names, then
    one ``python3.X`` per interpreter; ConfigError if too many."""
    names = list(dict.fromkeys(labels or []))
    names += [interpreters[v].label for v in sorted(interpreters, key=version_key)]
    if len(names) > MAX_LABELS:
        raise ConfigError(f"too many labels ({len(names)}; at most {MAX_LABELS} with one per "
                          "interpreter)")
    return names


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclasses.dataclass(frozen=True)
class JobCell:
    """What a job's matrix cell asks of this runner: its ``name`` (for the
    result header; "" for a commit without a matrix), the interpreter it
    runs with and the ``CI_<AXIS>`` variables its setup and tests get.
    Both go into the key of the environment it builds."""
    name: str
    python: Interpreter
    env: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def plain(cls) -> "JobCell":
        """A commit without a matrix: the runner's own Python, no variables."""
        return cls("", own())

