"""One shard of a pytest run: the part that runs inside the tested commit's
test process, as a pytest plugin (``-p ci_shard --ci-shard=FILE``, its
folder on PYTHONPATH).

Why pytest picks the shard's tests, not the runner: which tests a pytest
command runs is pytest's to say (an ini file's ``addopts``,
``norecursedirs`` or ``python_files``, a conftest.py's ``collect_ignore``
or ``pytest_collect_file``, a plugin installed in the environment, the
folders pytest skips by default), and test files passed by name bypass
half of it.  So every shard runs the command unchanged, and once pytest
has collected the tests (and every other plugin has selected and ordered
them) this plugin keeps the shard's share: whole files, split as the
runner splits a unittest suite (ci/sharding.py ``split``: longest first
into the emptiest shard by last known seconds, a file never timed
weighing its size at the known files' seconds per byte, the files that
hold the tests to run first in shard 1).  Every shard collects the same
tests, so every shard computes the same split, whatever their order.

FILE (the runner's, in the run's private order folder) holds lines:

    shard I/N
    first TEST_ID               the tests to run first, any number
    seconds SECONDS CLASSNAME   the durations table, any number

What else keeps the shards adding up to the whole run:

* a collection report that did not pass (a module that fails to import,
  or skips itself) is shard 1's alone: the others hide it, and when one
  failed they run nothing, as pytest runs no test after a collection
  error (unless ``--continue-on-collection-errors``);
* a run that stops at its first failures (``-x``, ``--maxfail``,
  ``--stepwise``), runs what its own cache names (``--lf``) or measures
  coverage (pytest-cov: ``--cov-fail-under`` judges every test) is not
  split: shard 1 runs every test, the others none;
* a shard whose share is empty, while the run collected tests, exits 0
  rather than pytest's 5 ("no tests collected").

Each shard says what it runs under pytest's "collected" line.

Standard library only, no annotations or f-strings: it runs under
whatever Python the test command names, as the recorder does.
"""

import os

import pytest


# ---- the split (ci/sharding.py ``split``, which the tests compare) --------

def split(items, total, pinned=frozenset()):
    """``(path, size in bytes, known seconds or None)`` into ``total``
    lists of paths, each sorted."""
    known = [(size, seconds) for _, size, seconds in items if seconds is not None]
    if known:
        per_byte = sum(s for _, s in known) / max(sum(max(b, 1) for b, _ in known), 1)
        weights = [(seconds if seconds is not None else max(size, 1) * per_byte, path)
                   for path, size, seconds in items]
    else:
        weights = [(float(max(size, 1)), path) for path, size, _ in items]
    shards = [[] for _ in range(total)]
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


def dotted(path):
    """The classname prefix pytest's JUnit report gives a file's tests."""
    name = path.replace(os.sep, "/").replace("/", ".")
    return name[:-3] if name.endswith(".py") else name


class Spec(object):
    """What FILE says: this shard, the tests to run first, the durations
    (each classname's seconds added to each of its dotted prefixes)."""

    def __init__(self, index, total, first, sums):
        self.index, self.total, self.first, self.sums = index, total, first, sums

    @classmethod
    def read(cls, path):
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
        index = total = None
        first, sums = [], {}
        for line in text.split("\n"):
            kind, _, rest = line.partition(" ")
            if kind == "shard":
                index, _, total = rest.partition("/")
                index, total = int(index), int(total)
            elif kind == "first" and rest:
                first.append(rest)
            elif kind == "seconds":
                seconds, _, key = rest.partition(" ")
                parts = key.split(".")
                for end in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:end])
                    sums[prefix] = sums.get(prefix, 0.0) + float(seconds)
        if index is None or not 1 <= index <= total:
            raise ValueError("no 'shard I/N' line in %s" % path)
        return cls(index, total, first, sums)

    def pinned(self, paths):
        """The paths that hold one of the tests to run first."""
        prefixes = set()
        for test_id in self.first:
            parts = test_id.split(" ", 1)[0].split(".")
            prefixes.update(".".join(parts[:end]) for end in range(1, len(parts)))
        return frozenset(p for p in paths if dotted(p) in prefixes)

    def share(self, paths, root):
        """This shard's paths of ``paths`` (relative to ``root``)."""
        items = []
        for path in sorted(set(paths)):
            try:
                size = os.path.getsize(os.path.join(root, path))
            except OSError:
                size = 0
            items.append((path, size, self.sums.get(dotted(path))))
        return split(items, self.total, self.pinned(paths))[self.index - 1]


def not_splittable(config):
    """Why this run's tests cannot be split ("" if they can)."""
    option = config.option
    if getattr(option, "maxfail", 0):
        return "-x/--maxfail: the run stops at its first failures"
    if getattr(option, "stepwise", False) or getattr(option, "stepwise_skip", False):
        return "--stepwise: the run stops at its first failure"
    if getattr(option, "lf", False):
        return "--last-failed: each runner's cache names other tests"
    if getattr(option, "cov_source", None):
        return "pytest-cov: coverage is measured over every test"
    return ""


# ---- the plugin ---------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--ci-shard", default=None,
                     help="the CI runner's shard file: run only this shard's test files")


class Shard(object):
    """One shard's state in its pytest process."""

    def __init__(self, spec, why_whole):
        self.spec = spec
        self.why_whole = why_whole
        self.hidden = 0          # collection reports shard 1 makes, not this one
        self.hidden_failed = 0
        self.collected = 0       # tests before the split
        self.line = ""

    @property
    def first(self):
        return self.spec.index == 1

    def keep(self, config, items):
        """The items to run, in their order."""
        self.collected = len(items)
        spec = self.spec
        if self.hidden_failed and not config.getoption("continue_on_collection_errors"):
            self.line = ("ci_shard: shard %d/%d runs nothing: shard 1 reports the collection "
                         "errors" % (spec.index, spec.total))
            return []
        if self.why_whole:
            self.line = "ci_shard: not split (%s): shard %d/%d runs %s" % (
                self.why_whole, spec.index, spec.total,
                "every test" if self.first else "nothing")
            return list(items) if self.first else []
        paths = [item.nodeid.split("::", 1)[0] for item in items]
        root = str(getattr(config, "rootpath", None) or config.rootdir)
        mine = set(spec.share(paths, root))
        kept = [item for item, path in zip(items, paths) if path in mine]
        self.line = "ci_shard: shard %d/%d runs %d of %d test files (%d of %d tests)" % (
            spec.index, spec.total, len(mine), len(set(paths)), len(kept), len(items))
        return kept


def pytest_configure(config):
    path = config.getoption("--ci-shard", default=None)
    if path:
        config._ci_shard = Shard(Spec.read(path), not_splittable(config))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    shard = getattr(collector.config, "_ci_shard", None)
    report = outcome.get_result()
    if shard is None or shard.first or report.passed:
        return
    # Shard 1 reports it; here it would count once more.
    shard.hidden += 1
    shard.hidden_failed += report.failed
    outcome.force_result(type(report)(report.nodeid, "passed", None, []))


# Last: every other plugin has selected and ordered the tests first.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    shard = getattr(config, "_ci_shard", None)
    if shard is None:
        return
    kept = shard.keep(config, items)
    if len(kept) < len(items):
        kept_ids = set(id(item) for item in kept)
        config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept_ids])
        items[:] = kept


def pytest_report_collectionfinish(config):
    shard = getattr(config, "_ci_shard", None)
    return shard.line if shard is not None and shard.line else None


def pytest_sessionfinish(session, exitstatus):
    shard = getattr(session.config, "_ci_shard", None)
    if shard is not None and int(exitstatus) == 5 and (shard.collected or shard.hidden_failed):
        # The run had tests; this shard's share of them is empty.
        session.exitstatus = 0
