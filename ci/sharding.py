"""Sharding one commit over several runners, as pure functions: the
``runtest`` body that names a shard, the split of a checkout's test files
into shards, the command each shard runs, the durations the dispatcher
learns from per-test records, and the merge of the shards' results.

Why the runners split and not the dispatcher: the dispatcher has no clone.
Every runner of a sharded commit gets the same durations table and has the
same checkout, so each computes the same split (a pure function of the
file list, the file sizes and the table) and runs only its own part.  A
rerun of a lost shard gets the very table the first round got, so its
part is the same too.  For a pytest command the file list is what pytest
collects, and the split is made inside the pytest process by the
``ci_shard`` plugin (ci_support/ci_shard.py, which keeps its own copy of
``split``): only pytest knows what its configuration, conftest.py files
and plugins collect.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import fnmatch
import os
import re

from ci import commands, results
from ci.files import read_inside
from ci.outcome import SHARDS_FIELD_RE, Outcome
from ci.wire import one_line

# Verdicts, worst first: the merged verdict is the worst of the shards.
VERDICT_ORDER = ("error", "timeout", "failed", "passed")
# Durations the dispatcher keeps (one per test class / module), and sends.
MAX_DURATIONS = 2000
MAX_KEY = 300
# How a runner says what its shard did, after ``i/n`` in the ``shards`` field:
#   (nothing)  ran its share of the test files
#   whole      shard 1 ran the whole suite (its split could differ: ShardRun.note)
#   skipped    another shard, nothing run: shard 1 ran everything
#   empty      no test files fell to this shard
# (outcome.SHARDS_FIELD_RE is the field's format and the one list of them.)
# unittest's default discovery pattern and what it accepts as a module.
UNITTEST_PATTERN = "test*.py"
VALID_MODULE = re.compile(r"[_a-z]\w*\.py$", re.IGNORECASE)
MAX_FILES = 5000
MAX_DEPTH = 20
PLACEHOLDER = "{tests}"


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    index: int                      # 1-based
    total: int
    durations: dict[str, float]     # test class / module -> last known seconds
    # Test ids to run first: the files that hold them go to shard 1.
    first: tuple[str, ...] = ()
    # The durations already encoded, when the sender has them so (the
    # dispatcher, once per split): ``jobspec.encode`` sends these bytes.
    table: bytes | None = None


# --------------------------------------------------------------------------
# A shard's part of the ``runtest`` body (see jobspec.py): its ``shard: i/n``
# field, and after the fields the durations table, ``<seconds> <key>`` lines.

def encode_table(durations: dict[str, float]) -> bytes:
    return "".join(f"{seconds:.3f} {key}\n" for key, seconds in durations.items()).encode()


def parse_shard(value: str, table: bytes, first: tuple[str, ...] = ()) -> ShardSpec:
    """A ``shard`` field's ``i/n`` and the durations table after it;
    ValueError if the shard is malformed (bad table lines are skipped:
    they only weigh the split)."""
    match = re.fullmatch(r"([0-9]{1,3})/([0-9]{1,3})", value)
    if not match:
        raise ValueError(f"shard must be '<i>/<n>', not {value[:40]!r}")
    index, total = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= total:
        raise ValueError(f"shard {index}/{total} does not exist")
    durations: dict[str, float] = {}
    for line in table.decode("utf-8", "replace").splitlines()[:MAX_DURATIONS]:
        seconds, _, key = line.partition(" ")
        try:
            known = float(seconds)
        except ValueError:
            continue
        if key and 0 <= known < 1e7 and key.isprintable():
            durations[key[:MAX_KEY]] = known
    return ShardSpec(index, total, durations, tuple(first))


# --------------------------------------------------------------------------
# What the dispatcher learns from results: seconds per test class / module.

class Durations:
    """Last known seconds per JUnit classname, newest kept, bounded.  Not
    thread-safe: the dispatcher holds its condition around every use."""

    def __init__(self, limit: int = MAX_DURATIONS):
        self.limit = limit
        self.table: collections.OrderedDict[str, float] = collections.OrderedDict()

    def learn(self, records: list[results.TestRecord] | None) -> None:
        if not records:
            return
        sums: dict[str, float] = {}
        for record in records:
            key = one_line(record.classname or record.name, MAX_KEY).replace(" ", "_")
            if key:
                sums[key] = sums.get(key, 0.0) + record.duration
        for key, seconds in sums.items():
            self.table[key] = round(seconds, 3)
            self.table.move_to_end(key)
        while len(self.table) > self.limit:
            self.table.popitem(last=False)


# --------------------------------------------------------------------------
# Which test files a checkout has, and the split.

def unittest_modules(repo: str, start: str = "tests",
                     package_root: bool = False) -> list[tuple[str, str]]:
    """(path relative to the clone, module name) of each module that
    ``unittest discover -s tests`` finds: ``test*.py`` files with a valid
    module name, in folders that are packages below the start folder.
    Module names are relative to the top-level folder: the clone's root
    with ``-t .`` (``package_root``), else the start folder."""
    return discovery(repo, start, package_root)[0]


def discovery(repo: str, start: str = "tests",
              package_root: bool = False) -> tuple[list[tuple[str, str]], str]:
    """``unittest_modules`` and why loading them by name would not run
    what discovery runs ("" when it would).  Discovery imports each
    package folder's ``__init__.py`` (the start folder's too, with ``-t
    .``) and runs the tests it holds; a ``load_tests`` there replaces the
    package's tests with its own (a DocTestSuite, say), an import that
    fails or skips is one test for the whole package, a class it imports
    runs once more.  A shard imports only its modules, so a package
    whose ``__init__.py`` holds more than a docstring and constants is
    not split; nor a symlinked package, which discovery follows, nor a
    tree past the walk's limits."""
    found: list[tuple[str, str]] = []
    why: list[str] = []
    base = os.path.join(repo, start)

    def walk(folder: str, parts: list[str], depth: int) -> None:
        if depth > MAX_DEPTH or len(found) >= MAX_FILES:
            why.append(f"more than {MAX_FILES} test modules or {MAX_DEPTH} levels of packages")
            return
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return
        for name in names:
            full = os.path.join(folder, name)
            if os.path.isfile(full):
                if VALID_MODULE.match(name) and fnmatch.fnmatch(name, UNITTEST_PATTERN):
                    module = ".".join([*parts, name[:-3]])
                    found.append((os.path.relpath(full, repo), module))
            elif os.path.isdir(full) and os.path.isfile(os.path.join(full, "__init__.py")):
                if os.path.islink(full):
                    why.append(f"{os.path.relpath(full, repo)} is a symlinked package")
                    continue
                if not _plain_package(full, repo):
                    why.append(f"{os.path.relpath(full, repo)}/__init__.py holds more than "
                               "constants (load_tests, imports, tests)")
                walk(full, [*parts, name], depth + 1)

    if package_root and not _plain_package(base, repo):
        why.append(f"{start}/__init__.py holds more than constants (load_tests, imports, tests)")
    walk(base, [start] if package_root else [], 0)
    if len(found) > MAX_FILES and not why:
        why.append(f"more than {MAX_FILES} test modules")
    return found[:MAX_FILES], why[0] if why else ""


# The most of an ``__init__.py`` read to see that it is plain.
MAX_INIT_BYTES = 64 * 1024


def _plain_package(folder: str, repo: str) -> bool:
    """Whether importing ``folder/__init__.py`` can only bind constants:
    a docstring, ``pass``, names given literal values (``__all__``,
    ``__version__``), ``from __future__`` imports.  Anything else may
    fail, skip, define or import tests, or be ``load_tests``."""
    try:
        # Committed by whoever pushed: never a symlink out of the clone.
        source = read_inside(os.path.join(folder, "__init__.py"), repo, MAX_INIT_BYTES + 1)
        if len(source) > MAX_INIT_BYTES:
            return False
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Pass) or (isinstance(node, ast.Expr)
                                          and isinstance(node.value, ast.Constant)):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if not targets or not all(isinstance(t, ast.Name) and t.id not in ("load_tests",
                                                                          "__path__")
                                  for t in targets):
            return False
        try:
            ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return False
    return True


def prefix_seconds(durations: dict[str, float]) -> dict[str, float]:
    """Each classname's seconds added to every dotted prefix of it
    (``a.b.C`` counts for ``a``, ``a.b`` and ``a.b.C``), so a test file's
    known time is one look-up, not a pass over the table per file."""
    sums: dict[str, float] = {}
    for key, seconds in durations.items():
        parts = key.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            sums[prefix] = sums.get(prefix, 0.0) + seconds
    return sums


def known_seconds(path: str, module: str, sums: dict[str, float]) -> float | None:
    """The last known duration of one test file: the sum over the classnames
    that belong to it (``module`` or ``module.Class``, by its own module
    name or by its dotted path from the clone's root); ``sums`` from
    ``prefix_seconds``."""
    dotted = path[:-3].replace(os.sep, ".").replace("/", ".") if path.endswith(".py") else path
    for name in (module, dotted):
        if name in sums:
            return sums[name]
    return None


def split(items: list[tuple[str, int, float | None]], total: int,
          pinned: frozenset[str] = frozenset()) -> list[list[str]]:
    """Split ``(path, size in bytes, known seconds or None)`` into ``total``
    shards: the ``pinned`` paths (those holding the tests to run first)
    into shard 1, the first to start; then longest first into the
    emptiest shard (ties: the lower shard; equal weights: by path).  A
    file without a known duration weighs its size times the known files'
    seconds per byte, or just its size when nothing is known.  Each
    shard's paths come sorted."""
    known = [(size, seconds) for _, size, seconds in items if seconds is not None]
    if known:
        per_byte = sum(s for _, s in known) / max(sum(max(b, 1) for b, _ in known), 1)
        weights = [(seconds if seconds is not None else max(size, 1) * per_byte, path)
                   for path, size, seconds in items]
    else:
        weights = [(float(max(size, 1)), path) for path, size, _ in items]
    shards: list[list[str]] = [[] for _ in range(total)]
    loads = [0.0] * total
    for weight, path in weights:
        if path in pinned:
            shards[0].append(path)
            loads[0] += weight
    for weight, path in sorted(weights, key=lambda w: (-w[0], w[1])):
        if path in pinned:
            continue
        emptiest = min(range(total), key=lambda i: (loads[i], i))
        shards[emptiest].append(path)
        loads[emptiest] += weight
    return [sorted(shard) for shard in shards]


def _size(repo: str, path: str) -> int:
    try:
        return os.path.getsize(os.path.join(repo, path))
    except OSError:
        return 0


def my_share(repo: str, files: list[tuple[str, str]], spec: ShardSpec) -> list[str]:
    """The paths of ``spec``'s shard; ``files`` as (path, module)."""
    sums = prefix_seconds(spec.durations)
    items = [(path, _size(repo, path), known_seconds(path, module, sums))
             for path, module in files]
    return split(items, spec.total, holding(files, spec.first))[spec.index - 1]


def holding(files: list[tuple[str, str]], test_ids: tuple[str, ...]) -> frozenset[str]:
    """The paths of ``files`` (path, module) that hold one of ``test_ids``
    (``module.Class.test``, by its module name or its dotted path)."""
    if not test_ids:
        return frozenset()
    prefixes = set()
    for test_id in test_ids:
        parts = test_id.split(" ", 1)[0].split(".")
        prefixes.update(".".join(parts[:end]) for end in range(1, len(parts)))
    found = set()
    for path, module in files:
        dotted = path[:-3].replace(os.sep, ".").replace("/", ".") if path.endswith(".py") \
            else path
        if module in prefixes or dotted in prefixes:
            found.add(path)
    return frozenset(found)


# --------------------------------------------------------------------------
# The command a shard runs.

@dataclasses.dataclass
class ShardRun:
    command: list[str] | None   # None: run nothing (skipped or empty)
    label: str                  # "", whole, skipped or empty (see above)
    path_first: str | None = None   # folder to put first on sys.path (unittest)
    note: str = ""              # why a command that could be split runs whole
    # A pytest run: the command whole, its share kept by ci_support/ci_shard.py.
    in_pytest: bool = False


def whole_run(command: list[str], index: int, note: str = "") -> ShardRun:
    """A run that cannot be split: shard 1 runs it whole, the others
    nothing (``note`` says why)."""
    return ShardRun(command if index == 1 else None, "whole" if index == 1 else "skipped",
                    note=note)


def shard_run(repo: str, custom: list[str] | None, command: list[str],
              spec: ShardSpec, default: bool) -> ShardRun:
    """What shard ``spec`` runs in this checkout.

    * the default unittest command: ``python -m unittest <modules>`` with
      the start folder first on ``sys.path`` as discovery would put it,
      unless discovery would run more than those modules (``discovery``:
      then it runs whole, ``note`` says why);
    * a pytest command: the command as it is, with the ``ci_shard``
      plugin, which keeps the shard's share of the tests pytest collects
      (``command_line`` adds it);
    * a custom command with a ``{tests}`` argument: the files put there;
    * anything else cannot be split: shard 1 runs it whole, the others
      nothing."""
    def whole(note: str = "") -> ShardRun:
        return whole_run(command, spec.index, note)

    if default:
        package = os.path.exists(os.path.join(repo, "tests", "__init__.py"))
        files, why = discovery(repo, "tests", package)
        if why:
            return whole(why)
        if not files:
            # Discovery says what a suite without test files is (its error).
            return whole("no test modules")
        share = set(my_share(repo, files, spec))
        modules = [module for path, module in files if path in share]
        if not modules:
            return ShardRun(None, "empty")
        return ShardRun([*command[:3], *modules], "", None if package else "tests")
    if custom and PLACEHOLDER in custom:
        spot = custom.index(PLACEHOLDER)
        files = unittest_modules(repo, "tests", True)
        if not files:
            # The command without files, as the unsharded run gets it.
            run = whole("no test files")
            return dataclasses.replace(run, command=expand_placeholder(repo, custom)
                                       if run.command else None)
        share = my_share(repo, files, spec)
        if not share:
            return ShardRun(None, "empty")
        return ShardRun([*custom[:spot], *share, *custom[spot + 1:]], "")
    if commands.pytest_position(command) is not None:
        # pytest itself keeps the shard's share of what it collects.
        return ShardRun(command, "", in_pytest=True)
    return whole("the test command is neither unittest's default run, a pytest run nor "
                 "a {tests} command")


# The pytest plugin that keeps a shard's share (ci_support/ci_shard.py).
PYTEST_PLUGIN = "ci_shard"


def plugin_file(spec: ShardSpec) -> bytes:
    """What the ``ci_shard`` plugin reads: the shard, the tests to run
    first and the durations table, a line each."""
    lines = [f"shard {spec.index}/{spec.total}"]
    lines += [f"first {one_line(test_id, 1000)}" for test_id in spec.first]
    lines += [f"seconds {seconds:.3f} {key}" for key, seconds in spec.durations.items()]
    return "".join(f"{line}\n" for line in lines).encode()


def expand_placeholder(repo: str, command: list[str]) -> list[str]:
    """An unsharded run of a ``{tests}`` command gets every test file."""
    if PLACEHOLDER not in command:
        return command
    files = [p for p, _ in unittest_modules(repo, "tests", True)]
    spot = command.index(PLACEHOLDER)
    return [*command[:spot], *files, *command[spot + 1:]]


# --------------------------------------------------------------------------
# The merge.

def parse_shards_field(value: str | None) -> tuple[int, int, str] | None:
    match = SHARDS_FIELD_RE.fullmatch(value or "")
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3) or ""


def worst(verdicts: list[str]) -> str:
    ranked = [v if v in VERDICT_ORDER else "error" for v in verdicts]
    return min(ranked, key=VERDICT_ORDER.index) if ranked else "passed"


COUNTS = ("tests", "failures", "errors", "skipped")


def merge(total: int, parts: dict[int, Outcome]) -> Outcome:
    """One outcome from every shard's, shards 1..total.

    Nothing of a shard that ran nothing counts.  If shard 1 ran the whole
    suite, its result is the commit's.  A shard that says it ran nothing
    while shard 1 did not run everything means the runners split
    differently: verdict ``error``, never a count that misses tests.  Nor
    does a commit pass whose shards, all passing, ran no test at all: the
    unsharded run's ``no tests ran``."""
    labels = {i: (parse_shards_field(o.header.get("shards")) or (0, 0, ""))[2]
              for i, o in parts.items()}
    if labels.get(1) == "whole":
        return parts[1].with_header(shards=f"{total} (not split: shard 1 ran everything; "
                                           "its output says why)")
    ran = [i for i in sorted(parts) if labels[i] not in ("empty", "skipped")]
    heads = {i: o.header for i, o in parts.items()}
    fields: dict = {"shards": str(total)}
    for name in COUNTS:
        fields[name] = sum(int(heads[i].get(name) or 0) for i in ran)
    for name in results.EXTRA_COUNTS:
        total_extra = sum(int(heads[i].get(name) or 0) for i in ran)
        if total_extra:
            fields[name] = total_extra
    verdicts = [heads[i].get("verdict", "error") for i in ran]
    fields["verdict"] = worst(verdicts)
    reasons = [f"shard {i}/{total}: {heads[i]['reason']}" for i in ran
               if heads[i].get("reason")]
    if any(labels[i] == "skipped" for i in parts):
        fields["verdict"] = "error"
        reasons.insert(0, "shards disagree: a runner could not split this commit's tests "
                          "(runners configured differently?)")
    if reasons:
        fields["reason"] = one_line("; ".join(reasons), 1000)
    runners = [heads[i].get("runner", "?") for i in sorted(parts)]
    fields["runner"] = one_line(", ".join(dict.fromkeys(runners)), 300)
    starts = sorted(heads[i]["started"] for i in parts if heads[i].get("started"))
    if starts:
        fields["started"] = starts[0]
    fields["duration"] = f"{max(float(heads[i].get('duration') or 0) for i in parts):.3f}"
    worst_codes = [heads[i].get("exit_code") for i in ran
                   if heads[i].get("verdict") == fields["verdict"]]
    fields["exit_code"] = next((c for c in worst_codes if c not in (None, 0, "0")),
                               0 if fields["verdict"] == "passed" else -1)
    afters = [float(heads[i]["first_failure_after"]) for i in ran
               if heads[i].get("first_failure_after")]
    if afters:
        # The earliest any shard saw a test fail (each from its own start).
        fields["first_failure_after"] = f"{min(afters):.3f}"
    for name in ("subject", "author", "committed", "setup", "setup_scope", "setup_duration",
                 "failing_first"):
        value = next((heads[i][name] for i in sorted(parts) if heads[i].get(name)), None)
        if value is not None:
            fields[name] = value
    records = _merged_records(fields, [parts[i] for i in ran])
    if fields["verdict"] == "passed" and (not ran or records == ()):
        # What the unsharded run says of the commit (pipeline.py): its
        # per-test report holds no test, though every part of it passed.
        fields["verdict"] = "error"
        fields["reason"] = one_line("; ".join(["no tests ran", *reasons]), 1000)
    return Outcome(fields, _merged_output(total, parts, labels), records)


def _merged_records(fields: dict, ran: list[Outcome]) -> tuple | None:
    """The shards' records, whose counts then are the commit's, when every
    shard that ran has them; else None, with a ``junit`` note in
    ``fields`` (the first shard's, or ``partial`` when only some had
    records)."""
    records = [o.records for o in ran]
    if ran and all(r is not None for r in records):
        merged = results.merge_records(records)
        for name in results.EXTRA_COUNTS:
            fields.pop(name, None)
        fields.update(results.record_fields(merged))
        return tuple(merged)
    note = next((o.header.get("junit") for o in ran if o.header.get("junit")), "")
    if any(r is not None for r in records):
        note = note or "partial"
    if note:
        fields["junit"] = note
    return None


def _merged_output(total: int, parts: dict[int, Outcome], labels: dict[int, str]) -> bytes:
    """Every shard's output under a line that says what it ran."""
    chunks = []
    for i in sorted(parts):
        f, output = parts[i].header, parts[i].output
        what = labels[i] or f.get("verdict", "?")
        head = (f"===== shard {i}/{total} on {one_line(str(f.get('runner', '?')), 100)}"
                f": {what} ({f.get('tests', 0)} tests, {f.get('failures', 0)} failures, "
                f"{f.get('errors', 0)} errors, {f.get('skipped', 0)} skipped) =====\n")
        chunks.append(head.encode() + output + (b"" if output.endswith(b"\n") or not output
                                                else b"\n"))
    return b"".join(chunks)
