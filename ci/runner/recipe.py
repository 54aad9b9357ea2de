"""The test recipe: how a commit is set up and tested, read from the
optional ``.ci.ini`` in the root of the commit under test.

The recipe lives in the repository so that a commit which changes how its
tests run is tested the new way.  It comes from whoever can push, so the
runner's limits cap it: a recipe may lower the runner's time limits but
never raise them past ``--max-timeout``, and may set ``rerun_failures``
only up to ``--max-rerun-failures``.  Parsing is strict on purpose: an
unknown key or a malformed line is an ``error`` verdict naming the line,
never a silent fallback to the runner's defaults.

Pure functions only: the caller reads the file and handles the result.
"""

from __future__ import annotations

import configparser
import dataclasses
import fnmatch
import math
import re
import shlex

from ci import wire

RECIPE_FILE = ".ci.ini"
SECTION = "ci"
KEYS = ("setup", "test", "timeout", "setup_timeout", "env_files", "rerun_failures",
        "quarantine")
# Files whose contents decide when an environment must be rebuilt, when the
# recipe names none: the usual places a Python project lists what it needs.
DEFAULT_ENV_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "requirements*.txt")
# A recipe is a few lines; anything far larger is not one (and is never
# read past this, by the runner nor from git by the observer).
MAX_RECIPE_BYTES = 64 * 1024
TOO_LARGE = f"{RECIPE_FILE} is larger than {MAX_RECIPE_BYTES} bytes"
MAX_ENV_FILES = 32
# Parts of one env_files path or pattern (``a/*/b`` has three), at most:
# each wildcard part lists the folders the one before it matched.
MAX_ENV_FILE_PARTS = 32
# Reruns of failing tests when neither flag nor recipe says: none, since a
# rerun lengthens every failing run and a repository opts in where its
# recipe is reviewed; and the most a recipe may ask for.
DEFAULT_RERUNS = 0
DEFAULT_MAX_RERUNS = 3
# Quarantine: test ids or fnmatch patterns, whitespace-separated.
MAX_QUARANTINE = 500
MAX_PATTERN = 500
# Keys read by the observer, not here: the build matrix (ci/matrix.py).
# The runner is told its cell in the job; it only lets these keys pass.
MATRIX_PREFIXES = ("matrix_", "labels_")


def is_matrix_key(key: str) -> bool:
    return key == "labels" or key.startswith(MATRIX_PREFIXES)


class RecipeError(Exception):
    """A recipe that cannot be used; the message names the line or key."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the runner's flags say: the defaults, and the caps."""
    setup: tuple[str, ...] | None = None
    test: tuple[str, ...] | None = None
    timeout: float = 600.0
    setup_timeout: float = 900.0
    # None: a recipe may only lower the runner's own limits.
    max_timeout: float | None = None
    # Reruns of failing tests (see ci/runner/reruns.py): the default, and
    # the most a recipe may ask for.
    rerun_failures: int = DEFAULT_RERUNS
    max_rerun_failures: int = DEFAULT_MAX_RERUNS


@dataclasses.dataclass(frozen=True)
class Recipe:
    setup: tuple[str, ...] | None
    test: tuple[str, ...] | None  # None: the runner's default unittest command
    timeout: float
    setup_timeout: float
    env_files: tuple[str, ...]
    # Notes for the result's output, e.g. a timeout that was capped.
    notes: tuple[str, ...] = ()
    from_file: bool = False
    rerun_failures: int = 0
    # Test ids or fnmatch patterns whose failures do not decide the verdict.
    quarantine: tuple[str, ...] = ()


def from_limits(limits: Limits) -> Recipe:
    """The recipe when the repository has none (or it is ignored)."""
    return Recipe(limits.setup, limits.test, limits.timeout, limits.setup_timeout,
                  DEFAULT_ENV_FILES, rerun_failures=limits.rerun_failures)


def resolve(text: str | None, limits: Limits) -> Recipe:
    """The recipe for one commit: ``text`` is the content of its
    ``.ci.ini`` (None when it has none).  RecipeError if unusable."""
    if text is None:
        return from_limits(limits)
    values = parse(text)
    notes: list[str] = []
    setup, test = limits.setup, limits.test
    if "setup" in values:
        # An empty setup turns off a setup the runner's flags would run.
        setup = _command(values["setup"], "setup", text, allow_empty=True)
    if "test" in values:
        test = _command(values["test"], "test", text, allow_empty=False)
    timeout = _capped(values, "timeout", limits.timeout, limits.max_timeout, text, notes)
    setup_timeout = _capped(values, "setup_timeout", limits.setup_timeout,
                            limits.max_timeout, text, notes)
    env_files = DEFAULT_ENV_FILES
    if "env_files" in values:
        env_files = _env_files(values["env_files"], text)
    reruns = _reruns(values, limits, text, notes)
    quarantine = _quarantine(values.get("quarantine", ""), text)
    return Recipe(setup, test, timeout, setup_timeout, env_files, tuple(notes), True,
                  reruns, quarantine)


def parse(text: str) -> dict[str, str]:
    """The ``[ci]`` section's values; RecipeError for anything else."""
    if len(text.encode("utf-8", "surrogateescape")) > MAX_RECIPE_BYTES:
        raise RecipeError(TOO_LARGE)
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       default_section="\0no default section\0")
    try:
        parser.read_string(text, source=RECIPE_FILE)
    except configparser.MissingSectionHeaderError as exc:
        raise RecipeError(f"{RECIPE_FILE} line {exc.lineno}: expected the [{SECTION}] "
                          f"section header, found {_quote(_line(text, exc.lineno))}") from None
    except configparser.ParsingError as exc:
        lineno = exc.errors[0][0]
        raise RecipeError(f"{RECIPE_FILE} line {lineno}: cannot parse "
                          f"{_quote(_line(text, lineno))} (expected key = value)") from None
    except configparser.DuplicateSectionError as exc:
        raise RecipeError(f"{RECIPE_FILE} line {exc.lineno}: section [{exc.section}] "
                          "appears twice") from None
    except configparser.DuplicateOptionError as exc:
        raise RecipeError(f"{RECIPE_FILE} line {exc.lineno}: key {exc.option!r} "
                          "appears twice") from None
    except configparser.Error as exc:
        raise RecipeError(f"{RECIPE_FILE}: {wire.one_line(str(exc), 80)}") from None
    sections = parser.sections()
    extra = [s for s in sections if s != SECTION]
    if extra:
        raise RecipeError(f"{RECIPE_FILE} line {_line_of_section(text, extra[0])}: unknown "
                          f"section [{wire.one_line(extra[0], 80)}] (only [{SECTION}] is read)")
    if SECTION not in sections:
        raise RecipeError(f"{RECIPE_FILE} has no [{SECTION}] section")
    values = dict(parser.items(SECTION))
    for key in values:
        if key not in KEYS and not is_matrix_key(key):
            raise RecipeError(f"{RECIPE_FILE} line {_line_of_key(text, key)}: unknown key "
                              f"{wire.one_line(key, 80)!r} (known: {', '.join(KEYS)})")
    return values


def _command(value: str, key: str, text: str, allow_empty: bool) -> tuple[str, ...] | None:
    try:
        words = shlex.split(value, comments=True)
    except ValueError as exc:
        raise RecipeError(f"{RECIPE_FILE} line {_line_of_key(text, key)}: key {key!r}: "
                          f"{exc}") from None
    if not words:
        if allow_empty:
            return None
        raise RecipeError(f"{RECIPE_FILE} line {_line_of_key(text, key)}: key {key!r} "
                          "is empty")
    return tuple(words)


def _capped(values: dict, key: str, default: float, cap: float | None, text: str,
            notes: list[str]) -> float:
    if key not in values:
        return default
    try:
        seconds = float(values[key])
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise RecipeError(f"{RECIPE_FILE} line {_line_of_key(text, key)}: key {key!r} "
                          f"must be a positive number of seconds, not "
                          f"{_quote(values[key])}")
    limit = default if cap is None else cap
    if seconds > limit:
        flag = "--max-timeout" if cap is not None else f"--{key.replace('_', '-')}"
        notes.append(f"{key} {seconds:g}s in {RECIPE_FILE} capped at {limit:g}s "
                     f"by the runner's {flag}")
        return limit
    return seconds


def _reruns(values: dict, limits: Limits, text: str, notes: list[str]) -> int:
    """``rerun_failures``: a whole number from 0, capped by the runner's
    ``--max-rerun-failures`` as a timeout is by ``--max-timeout``."""
    if "rerun_failures" not in values:
        return min(limits.rerun_failures, limits.max_rerun_failures)
    value = values["rerun_failures"].strip()
    if not re.fullmatch(r"[0-9]{1,4}", value):
        raise RecipeError(f"{RECIPE_FILE} line {_line_of_key(text, 'rerun_failures')}: key "
                          f"'rerun_failures' must be a whole number from 0, not {_quote(value)}")
    if int(value) > limits.max_rerun_failures:
        notes.append(f"rerun_failures {int(value)} in {RECIPE_FILE} capped at "
                     f"{limits.max_rerun_failures} by the runner's --max-rerun-failures")
        return limits.max_rerun_failures
    return int(value)


def _quarantine(value: str, text: str) -> tuple[str, ...]:
    """Test ids (as results name them, ``module.Class.test``) or fnmatch
    patterns of them, separated by white space (one per line reads best)."""
    line = _line_of_key(text, "quarantine")
    patterns = tuple(dict.fromkeys(value.split()))
    if len(patterns) > MAX_QUARANTINE:
        raise RecipeError(f"{RECIPE_FILE} line {line}: key 'quarantine' lists more than "
                          f"{MAX_QUARANTINE} tests")
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN or not pattern.isprintable():
            raise RecipeError(f"{RECIPE_FILE} line {line}: key 'quarantine': "
                              f"{_quote(pattern)} is not a test id or pattern (printable, "
                              f"at most {MAX_PATTERN} characters)")
    return patterns


class QuarantineMatcher:
    """Which of a recipe's ``quarantine`` entries a test id is or matches.
    An entry with ``*`` or ``?`` is an fnmatch pattern (where ``[...]`` is
    a set of characters); any other is an exact id, so that a pytest id's
    ``[param]`` means itself.  One compiled expression answers "any?" for
    the many ids that match no pattern."""

    def __init__(self, patterns: tuple[str, ...]):
        self.exact = set(patterns)
        self.globs = [p for p in patterns if "*" in p or "?" in p]
        self.any = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.globs),
                              re.S) if self.globs else None

    def matches(self, ids: tuple[str, ...]) -> list[str]:
        """The entries any of ``ids`` is or matches ([] for none)."""
        found = [i for i in ids if i in self.exact]
        if self.any is not None and any(self.any.match(i) for i in ids):
            found += [p for p in self.globs
                      if any(fnmatch.fnmatchcase(i, p) for i in ids)]
        return found


def _env_files(value: str, text: str) -> tuple[str, ...]:
    """Relative paths or glob patterns inside the repository."""
    line = _line_of_key(text, "env_files")
    names = value.split()
    if len(names) > MAX_ENV_FILES:
        raise RecipeError(f"{RECIPE_FILE} line {line}: key 'env_files' lists more than "
                          f"{MAX_ENV_FILES} names")
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or ".." in parts or not name.isprintable():
            raise RecipeError(f"{RECIPE_FILE} line {line}: key 'env_files': {_quote(name)} "
                              "must be a path inside the repository")
        if len(parts) > MAX_ENV_FILE_PARTS or len(name) > MAX_PATTERN:
            raise RecipeError(f"{RECIPE_FILE} line {line}: key 'env_files': {_quote(name)} "
                              f"has more than {MAX_ENV_FILE_PARTS} parts or "
                              f"{MAX_PATTERN} characters")
    return tuple(names)


def _line(text: str, number: int) -> str:
    lines = text.split("\n")
    return lines[number - 1] if 0 < number <= len(lines) else ""


def _line_of_key(text: str, key: str) -> int | str:
    """The line a key is on (configparser does not keep it)."""
    pattern = re.compile(r"\s*" + re.escape(key) + r"\s*[=:]", re.I)
    for number, line in enumerate(text.split("\n"), 1):
        if pattern.match(line):
            return number
    return "?"


def _line_of_section(text: str, section: str) -> int | str:
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip() == f"[{section}]":
            return number
    return "?"


def _quote(text: str) -> str:
    return repr(wire.one_line(text.strip(), 80))
