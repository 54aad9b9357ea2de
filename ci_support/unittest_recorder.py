"""Runs unittest exactly as ``python -m unittest ARGS`` would, and also
writes each test's outcome to a JUnit XML file for the CI runner.

Usage: ``python unittest_recorder.py OUTPUT.xml [--order DIR] [--shard] [--path-first DIR] [unittest arguments...]``
(the options in this order, each optional on its own).

``--order DIR``: the runner's order folder (see ci_order.py, beside this
file): the tests it names run first, and each failure is told there as it
happens.  ``--shard``: the arguments are module names a shard runs, loaded
as discovery would load them; ``--path-first DIR``: DIR goes first on
sys.path, where discovery puts its top folder (a shard's modules and a
rerun's test ids are named from it).

It writes OUTPUT.xml, JUnit XML within junit-10.xsd (the schema of Jenkins'
xunit plugin), and OUTPUT.xml.records, every record in the CI's own format
(one JSON array a line), with what JUnit has no word for: a subtest or a
fixture (setUpClass...) as unittest counts it.

The runner ships this file and starts it by path, from the tested clone's
root.  Run as a script, Python puts this file's folder first on sys.path;
it is replaced by the current folder at once, before anything else is
imported, so the tested project's own modules (a ``helpers.py``, say) are
found first exactly as under ``python -m unittest``, and nothing of the CI
can be imported by the tests.  Standard library only: it runs under
whatever Python the test command names.

The output (dots, tracebacks, the "Ran N tests" summary) and the exit
status are unittest's own, so counts and verdicts are what they always were.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and sys.path[0] and os.path.abspath(sys.path[0]) == HERE:
    sys.path[0] = os.getcwd()

import time  # noqa: E402
import unittest  # noqa: E402

# A traceback longer than this keeps its end (the CI caps it again anyway).
TRACEBACK_LIMIT = 8000


def _split_id(test_id):
    classname, _, name = test_id.rpartition(".")
    return classname, name


class RecordingResult(unittest.TextTestResult):
    """unittest's own text result, plus one record per outcome."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.order_folder = RecordingRunner.order_folder
        self.records = []
        self._started = {}
        self._seen = set()

    def startTest(self, test):
        self._started[test.id()] = time.perf_counter()
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        self._started.pop(test.id(), None)
        self._seen.discard(test.id())

    def _record(self, test, outcome, err=None, message=""):
        kind, subtest = "", ""
        parent = getattr(test, "test_case", None)
        if isinstance(parent, unittest.TestCase):  # a subtest
            kind = "subtest"
            subtest = test._subDescription() if hasattr(test, "_subDescription") else str(test)
        elif isinstance(test, unittest.TestCase):
            parent = test
            if test.id() in self._seen:
                # A second outcome of one test (a tearDown error after a
                # failure): unittest runs and counts the test once.
                kind, subtest = "subtest", "(another outcome)"
        else:
            # setUpClass, setUpModule...: counted by unittest, not run as a test.
            kind = "fixture"
        if parent is not None:
            test_id = parent.id()
            classname, name = _split_id(test_id)
            if kind == "":
                self._seen.add(test_id)
        else:
            test_id = getattr(test, "description", None) or str(test)
            classname, name = "", test_id
        started = self._started.get(test_id)
        duration = time.perf_counter() - started if started is not None else 0.0
        traceback = ""
        if err is not None:
            try:
                traceback = self._exc_info_to_string(err, parent or test)
            except Exception:  # a hostile exception must not stop the run
                traceback = repr(err[1])
            if not message:
                try:
                    message = "%s: %s" % (err[0].__name__, err[1])
                except Exception:
                    message = err[0].__name__
        if outcome in ("failed", "error", "xpass") and self.order_folder is not None:
            self.order_folder.failed(test_id)
        self.records.append({
            "classname": classname, "name": name, "outcome": outcome,
            "duration": duration, "message": str(message)[:2000],
            "traceback": traceback[-TRACEBACK_LIMIT:], "kind": kind, "subtest": subtest})

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "failed", err)

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "error", err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skipped", message=reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, "xfail", err)

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, "xpass", message="unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(subtest, "failed" if failed else "error", err)


class RecordingRunner(unittest.TextTestRunner):
    resultclass = RecordingResult
    last_result = None
    order_folder = None   # a ci_order.Folder, with --order

    def _makeResult(self):
        result = super()._makeResult()
        RecordingRunner.last_result = result
        return result


# The pattern of the default command's discovery (``discover -s tests``).
DISCOVERY_PATTERN = "test*.py"


class DiscoveryLikeLoader(unittest.TestLoader):
    """Loads a module by name the way discovery loads a file it finds: a
    module that cannot be imported (for any reason, not only ImportError)
    is one failed test named after it, a SkipTest raised on import one
    skipped test, instead of ending the whole run; and the module's
    ``load_tests`` gets discovery's pattern (by name it gets None)."""

    def loadTestsFromName(self, name, module=None):
        if module is None:
            try:
                __import__(name)
            except unittest.SkipTest as exc:
                return unittest.loader._make_skipped_test(name, exc, self.suiteClass)
            except (Exception, SystemExit):   # sys.exit(0) at import ended the shard
                error_case, error_message = unittest.loader._make_failed_import_test(
                    name, self.suiteClass)
                self.errors.append(error_message)
                return error_case
            found = sys.modules.get(name)
            if found is not None:
                return self.loadTestsFromModule(found, pattern=DISCOVERY_PATTERN)
        return super().loadTestsFromName(name, module)


def load_order_module():
    """ci_order.py from beside this file, by path (sys.path no longer
    has this folder: the tested project's modules come first)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ci_order", os.path.join(HERE, "ci_order.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flatten(suite, out):
    """The tests of ``suite`` in run order into ``out``; False if a suite
    of its own kind (its own ``run``) is in it: reordering would skip it."""
    if isinstance(suite, unittest.TestCase):
        out.append(suite)
        return True
    if not isinstance(suite, unittest.TestSuite) or type(suite).run is not unittest.TestSuite.run:
        return False
    return all(flatten(test, out) for test in suite)


def _case_keys(test):
    test_id = test.id()
    return type(test).__module__, test_id.rpartition(".")[0], test_id


def ordered_suite(suite, order, folder):
    """``suite`` with the runner's failing tests first (see ci_order.py),
    as one flat suite (unittest runs class and module fixtures by change
    of class and module, so they still run once each); unchanged, with
    the reason in the status, when it cannot be reordered."""
    first = folder.first()
    if not first:
        return suite
    tests = []
    if not flatten(suite, tests):
        folder.status("not reordered: a test suite class of its own runs the tests")
        return suite
    tests, found = order.reorder(tests, _case_keys, first)
    if not found:
        folder.status("none found")
        return suite
    folder.status("reordered %d" % found)
    return unittest.TestSuite(tests)


class OrderedProgram(unittest.TestProgram):
    """unittest's own main program; with --order, the loaded suite is
    reordered before it runs."""
    order = None

    def runTests(self):
        if self.order is not None and RecordingRunner.order_folder is not None:
            try:
                self.test = ordered_suite(self.test, self.order, RecordingRunner.order_folder)
            except Exception as exc:  # never cost the run
                RecordingRunner.order_folder.status("not reordered: %r" % (exc,))
        return super().runTests()


# Characters XML 1.0 cannot hold at all (control characters, lone surrogates).
# Characters XML 1.0 cannot hold: controls but tab, newline and return, and
# U+FFFE/U+FFFF; lone surrogates go in _clean.  (A regular expression of
# the allowed ranges took 16 ms to compile, on every commit.)
_XML_BAD = {c: "?" for c in range(32) if c not in (9, 10, 13)}
_XML_BAD.update({0xFFFE: "?", 0xFFFF: "?"})


def _clean(text):
    return str(text).translate(_XML_BAD).encode("utf-8", "replace").decode("utf-8")


# Each outcome as junit-10.xsd (Jenkins' xunit plugin's schema) says it: a
# child and its type.  An expected failure is a skip of type xfail, as
# pytest writes it; the record's kind is in the records file only.
_CHILD = {"failed": ("failure", ""), "xpass": ("failure", "unexpected success"),
          "error": ("error", ""), "skipped": ("skipped", ""), "xfail": ("skipped", "xfail")}


def _attr(text):
    """Text made safe for an XML attribute or element (written by hand:
    importing ElementTree costs about a quarter of a small suite's run,
    on every commit)."""
    return (_clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("\n", "&#10;").replace("\r", "&#13;")
            .replace("\t", "&#9;"))


def _element(tag, attrs, text=None):
    head = "<%s%s" % (tag, "".join(' %s="%s"' % (k, _attr(v)) for k, v in attrs))
    if text is None:
        return head + " />"
    body = (_clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#13;"))
    return "%s>%s</%s>" % (head, body, tag)


def write_junit(path, records):
    """The records as JUnit XML within junit-10.xsd, for whoever runs this
    script by hand (the CI reads the records file, ``write_records``)."""
    lines = ["<?xml version='1.0' encoding='utf-8'?>", "<testsuites>",
             '<testsuite name="unittest" tests="%d" failures="%d" errors="%d">' % (
                 len(records), sum(r["outcome"] in ("failed", "xpass") for r in records),
                 sum(r["outcome"] == "error" for r in records))]
    for record in records:
        name = record["name"]
        if record["subtest"]:
            name = "%s %s" % (name, record["subtest"])
        attrs = [("classname", record["classname"]), ("name", name),
                 ("time", "%.6f" % record["duration"])]
        tag, kind = _CHILD.get(record["outcome"], ("", ""))
        if not tag:
            lines.append(_element("testcase", attrs))
            continue
        child_attrs = [("message", record["message"])] + ([("type", kind)] if kind else [])
        child = _element(tag, child_attrs, record["traceback"])
        lines.append(_element("testcase", attrs)[:-3] + ">" + child + "</testcase>")
    lines += ["</testsuite>", "</testsuites>", ""]
    with open(path, "wb") as handle:
        handle.write("\n".join(lines).encode("utf-8"))


# The CI's own format (ci/results.py, format_records): one JSON array a
# line, these fields in this order; the runner reads it from OUTPUT.records.
RECORD_FIELDS = ("classname", "name", "outcome", "duration", "message", "traceback",
                 "kind", "subtest")
RECORDS_SUFFIX = ".records"


_JSON_ESCAPES = {c: "\\u%04x" % c for c in range(32)}
_JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})


def _json_value(value):
    """One field as JSON, written by hand: ``import json`` here would
    find a project's own json.py first (its folder leads sys.path)."""
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else "0"
    return '"%s"' % _clean(value).translate(_JSON_ESCAPES)


def write_records(path, records):
    """Every record with all it knows (kinds, subtests, xfail), for the CI."""
    with open(path, "wb") as handle:
        for record in records:
            values = ",".join(_json_value(record[field]) for field in RECORD_FIELDS)
            handle.write(("[%s]\n" % values).encode("utf-8"))


def main(argv):
    if not argv:
        sys.stderr.write(__doc__)
        return 2
    output, args = argv[0], argv[1:]
    loader = unittest.defaultTestLoader
    if args[:1] == ["--order"] and len(args) >= 2:
        try:
            OrderedProgram.order = load_order_module()
            RecordingRunner.order_folder = OrderedProgram.order.Folder(args[1])
        except Exception as exc:  # the tests run as they would have
            sys.stderr.write("unittest_recorder: no test order: %s\n" % (exc,))
        args = args[2:]
    if args[:1] == ["--shard"]:
        # A shard of ``discover -s DIR`` run by module names: load them as
        # discovery would.
        loader = DiscoveryLikeLoader()
        args = args[1:]
    if args[:1] == ["--path-first"] and len(args) >= 2:
        # DIR first on sys.path, where discovery puts it.
        sys.path.insert(0, os.path.abspath(args[1]))
        args = args[2:]
    sys.argv[:] = ["python -m unittest"] + args  # what the tests would see there
    try:
        OrderedProgram(module=None, argv=["python -m unittest"] + args,
                       testRunner=RecordingRunner, testLoader=loader)
    finally:
        # Also when unittest exits (it always does, with its own status).
        result = RecordingRunner.last_result
        folder = RecordingRunner.order_folder
        if result is not None and result.shouldStop and folder is not None:
            folder.stopped("stopped early (failfast or interrupted)")
        if result is not None:
            try:
                write_junit(output, result.records)
                write_records(output + RECORDS_SUFFIX, result.records)
            except Exception as exc:  # the run's verdict matters more
                sys.stderr.write("unittest_recorder: cannot write %s: %s\n" % (output, exc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
