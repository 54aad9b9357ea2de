"""Failing tests first, and each failure told as it happens: the part that
runs inside the tested commit's test process.

Two users, one file:

* pytest loads it as a plugin (``-p ci_order --ci-order-dir=DIR``, its
  folder on PYTHONPATH): ``pytest_collection_modifyitems`` reorders the
  collected items, ``pytest_runtest_logreport`` notes each failure;
* the unittest recorder (unittest_recorder.py, beside this file) loads it
  by path and calls ``reorder`` and ``Folder`` itself.

The folder DIR (the runner's, private, removed after the run) holds:

* ``first``   the test ids to run first, one a line, most important first
              (written by the runner);
* ``status``  one line, written here: ``reordered N`` (N of those tests
              found and moved first), ``none found`` or ``not reordered:
              WHY``;
* ``events``  one line per failing test, as it fails:
              ``<time.time()>\\t<test id>``;
* ``stopped`` one line, written here when the run ended before its last
              test (failfast, ``-x``, ``--maxfail``, an interruption): the
              tests it did not reach cannot pass for run.

A test id is what the JUnit report names a test (``module.Class.test``;
pytest's ``tests.test_x.test_y[param]``), so the ids the history keeps are
the ids found here.  The order only moves tests, whole modules at a time
(then whole classes, then the tests themselves): nothing runs twice,
nothing is left out, and a module's or class's fixtures still run once.

Standard library only, no annotations or f-strings: it runs under
whatever Python the test command names, as the recorder does.
"""

import os
import sys
import time

# Failures written to ``events`` at most (the runner reads the first).
MAX_EVENTS = 100


class Folder(object):
    """The run's order folder: what to run first, and where to tell."""

    def __init__(self, path):
        self.path = path
        self.events = 0

    def first(self):
        """The ids to run first ([] if the runner named none)."""
        try:
            with open(os.path.join(self.path, "first"), "rb") as handle:
                text = handle.read().decode("utf-8", "replace")
        except (IOError, OSError):
            return []
        return [line for line in text.split("\n") if line]

    def status(self, text):
        self._write("status", text + "\n", "w")

    def stopped(self, why):
        self._write("stopped", " ".join(str(why).splitlines()) + "\n", "w")

    def failed(self, test_id):
        """A test failed just now: one line, flushed at once."""
        if self.events >= MAX_EVENTS:
            return
        self.events += 1
        line = "%.6f\t%s\n" % (time.time(), " ".join(str(test_id).splitlines()))
        self._write("events", line, "a")

    def _write(self, name, text, mode):
        try:
            with open(os.path.join(self.path, name), mode + "b") as handle:
                handle.write(text.encode("utf-8", "replace"))
        except (IOError, OSError):
            pass  # telling is best effort; the run's result matters more


def reorder(items, keys, first):
    """(``items`` with the ``first`` tests' modules first, within them
    their classes first, within those the tests first; how many of
    ``first`` were found).  ``keys(item)`` gives (module, class, test id).
    A subtest's id (``id (i=2)``) counts for its test.  The order of
    everything else is kept; nothing is added or dropped."""
    rank = {}
    for position, test_id in enumerate(first):
        rank.setdefault(test_id, position)
        rank.setdefault(test_id.split(" ", 1)[0], position)
    last = len(first)
    keyed = []
    best_module, best_class = {}, {}
    found = set()
    for item in items:
        module, cls, test_id = keys(item)
        position = rank.get(test_id, last)
        if position < last:
            found.add(test_id)
        keyed.append((module, cls, position))
        best_module[module] = min(best_module.get(module, last), position)
        best_class[cls] = min(best_class.get(cls, last), position)
    if not found:
        return list(items), 0
    order = sorted(range(len(keyed)), key=lambda i: (
        best_module[keyed[i][0]], best_class[keyed[i][1]], keyed[i][2], i))
    return [items[i] for i in order], len(found)


# ---- the pytest plugin ------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--ci-order-dir", default=None,
                     help="the CI runner's folder: tests to run first, failures told")


def _folder(config):
    path = config.getoption("--ci-order-dir", default=None)
    return Folder(path) if path else None


def junit_id_of(nodeid):
    """The id pytest's JUnit report gives ``nodeid`` (classname.name)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = names[0].replace("/", ".")
    if names[0].endswith(".py"):
        names[0] = names[0][:-3]
    names[-1] += bracket + params
    return ".".join(names)


def _pytest_keys(item):
    path = item.nodeid.partition("[")[0]
    return path.split("::")[0], path.rpartition("::")[0], junit_id_of(item.nodeid)


def pytest_configure(config):
    folder = _folder(config)
    if folder is not None:
        config._ci_order = folder


def _last(function):
    """Marked to run after other plugins' hooks when pytest loaded this
    plugin (it is imported then).  Loaded by the unittest recorder, pytest
    is not imported: that would cost a run about 60 ms, and a project
    without pytest nothing but the import attempt."""
    pytest = sys.modules.get("pytest")
    if pytest is None:
        return function
    return pytest.hookimpl(trylast=True)(function)


# Last, so another plugin's own reordering does not undo ours.
@_last
def pytest_collection_modifyitems(session, config, items):
    folder = getattr(config, "_ci_order", None)
    if folder is None:
        return
    first = folder.first()
    if not first:
        return
    try:
        ordered, found = reorder(items, _pytest_keys, first)
    except Exception as exc:  # never cost the run
        folder.status("not reordered: %s" % exc)
        return
    items[:] = ordered
    folder.status("reordered %d" % found if found else "none found")



def pytest_runtest_logreport(report):
    if report.failed and _ACTIVE[0] is not None:
        _ACTIVE[0].failed(junit_id_of(report.nodeid))


# The folder of this process's run (a report carries no config).
_ACTIVE = [None]


def pytest_sessionstart(session):
    _ACTIVE[0] = getattr(session.config, "_ci_order", None)


def pytest_sessionfinish(session, exitstatus):
    folder = getattr(session.config, "_ci_order", None)
    why = session.shouldfail or session.shouldstop
    if folder is not None and (why or exitstatus == 2):
        folder.stopped(why or "interrupted (exit status 2)")
