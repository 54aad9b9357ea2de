"""ci/runner/pipeline.py step by step, on a real clone (the checkout
script, the slot, the judge), and the outbox's storing and refusals."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from support.cluster import PASSING_TEST

from ci.jobspec import JobSpec
from ci.runner import environments, recipe
from ci.runner.outbox import MAX_REFUSALS, Outbox
from ci.runner.pipeline import JobPipeline, Settings, execute
from ci.runner.slot import ProcessSlot

# Its tested pytest runs load no plugin of ours (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quiet_pytest")

PY = sys.executable


def settings(clone: str, command=None) -> Settings:
    limits = recipe.Limits(test=tuple(command) if command else None, timeout=60)
    return Settings(clone, ProcessSlot(), environments.Preparer(limits, read_recipe=False),
                    1 << 20, checkout_timeout=60)


def test_checkout_reads_the_commits_metadata_and_a_bad_commit_is_an_error(upstream, tmp_path):
    head = upstream.commit({"README": "hello\n"}, "a subject line")
    clone = upstream.clone(tmp_path / "clone")
    code, timed_out, log = JobPipeline(settings(clone), head).checkout()
    assert (code, timed_out) == (0, False) and b"ci-meta\t" in log
    outcome = execute(settings(clone), "f" * 40)
    assert outcome.verdict == "error" and "checkout of " + "f" * 40 in outcome.header["reason"]
    assert float(outcome.header["duration"]) >= 0


def test_the_locks_of_a_git_killed_mid_checkout_do_not_fail_the_next_commits(upstream,
                                                                            tmp_path):
    """A checkout stopped by SIGKILL (a runner stopping, --checkout-timeout,
    a SIGKILLed runner's watchdog) leaves git's lock files in the clone;
    every later checkout failed on them, and each commit the runner took
    was 'error' for good (the first result wins)."""
    clone = upstream.clone(tmp_path / "clone")
    good = upstream.commit({}, "after the kill")
    git_dir = os.path.join(clone, ".git")
    for lock in ("index.lock", "HEAD.lock", "shallow.lock",
                 os.path.join("refs", "remotes", "origin", "main.lock")):
        with open(os.path.join(git_dir, lock), "w") as handle:
            handle.write("a dead git's\n")
    outcome = execute(settings(clone), good)
    assert outcome.verdict == "passed", outcome.header.get("reason")
    assert not [n for n in os.listdir(git_dir) if n.endswith(".lock")]


def test_a_commit_without_tests_is_an_error_and_a_passing_one_passes(upstream, tmp_path):
    clone = upstream.clone(tmp_path / "clone")
    good = upstream.commit({}, "nothing changed")
    outcome = execute(settings(clone), good)
    assert outcome.verdict == "passed" and outcome.header["tests"] == 1
    assert outcome.header["subject"] == "nothing changed" and outcome.junit_xml
    bare = upstream.commit({"tests/test_sample.py": None}, "no tests left")
    outcome = execute(settings(clone), bare)
    assert outcome.verdict == "error"
    assert outcome.header["reason"] == "no tests/ folder in this commit"


def test_a_shard_with_nothing_to_run_passes_without_running(upstream, tmp_path):
    from ci import sharding
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({"tests/test_more.py": PASSING_TEST}, "two")
    ran = tmp_path / "ran"
    command = [PY, "-c", f"open({str(ran)!r}, 'w').close()"]
    job = JobPipeline(settings(clone, command), head, JobSpec(sharding.ShardSpec(2, 2, {})))
    outcome = job.run()
    assert outcome.verdict == "passed" and outcome.header["shards"] == "2/2 skipped"
    assert b"nothing to run" in outcome.output and not ran.exists()


def test_the_outbox_stores_and_sets_a_refused_result_aside(tmp_path):
    outbox = Outbox(str(tmp_path / "outbox"))
    commit, token = "a" * 40, "0" * 32
    assert outbox.store(commit, token, b"body", threading.Event(), 0.1)
    ((name, got_commit, got_token),) = outbox.items()
    assert (got_commit, got_token) == (commit, token) and outbox.read(name) == b"body"
    counts = [outbox.refused(name) for _ in range(MAX_REFUSALS)]
    assert counts == list(range(1, MAX_REFUSALS + 1))
    assert outbox.items() == [] and os.listdir(outbox.folder) == ["refused-" + name]


def test_the_outbox_gives_up_storing_only_when_stopping(tmp_path):
    outbox = Outbox(str(tmp_path / "outbox"))
    os.rmdir(outbox.folder)   # every write now fails
    stop = threading.Event()
    stop.set()
    assert outbox.store("a" * 40, "0" * 32, b"body", stop, 0.1) is False


FAILING_TEST = ("import unittest\n\nclass TestA(unittest.TestCase):\n"
                "    def test_a(self):\n        self.assertEqual(1, 2)\n")


def test_a_test_that_ends_the_process_with_status_0_is_no_pass(upstream, tmp_path):
    """The recorder writes its report as the run ends: os._exit(0) in a
    test skipped it, and the exit status alone made a failing suite
    'passed', with 0 tests."""
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({"tests/test_a.py": FAILING_TEST, "tests/test_z.py":
                            "import os, unittest\n\nclass TestZ(unittest.TestCase):\n"
                            "    def test_zz_exit(self):\n        os._exit(0)\n"}, "exits")
    outcome = execute(settings(clone), head)
    assert outcome.verdict == "error", outcome.header
    assert "without its tests' report" in outcome.header["reason"]


def test_a_commit_whose_tests_folder_holds_no_test_is_an_error(upstream, tmp_path):
    """unittest of Python 3.11 exits 0 after 'Ran 0 tests' (3.12 exits 5)."""
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({"tests/test_sample.py": None, "tests/helpers.py": "X = 1\n"},
                           "the tests renamed away")
    outcome = execute(settings(clone), head)
    assert outcome.verdict == "error" and outcome.header["reason"] == "no tests ran"


def test_a_quarantined_failure_run_first_does_not_pass_a_run_it_stopped(upstream, tmp_path):
    """With failfast, the quarantined test (run first: the history names
    it) stopped the run before a real failure, and the records, one
    quarantined failure, passed the commit."""
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({
        ".ci.ini": "[ci]\ntest = python -m unittest discover -s tests -f\n"
                   "quarantine = test_z.TestBroken.test_wrong\n",
        "tests/test_b.py": FAILING_TEST,
        "tests/test_z.py": "import unittest\n\nclass TestBroken(unittest.TestCase):\n"
                           "    def test_wrong(self):\n        self.fail('known')\n"}, "ff")
    limits = recipe.Limits(timeout=60)
    ready = Settings(clone, ProcessSlot(), environments.Preparer(limits), 1 << 20,
                     checkout_timeout=60)
    in_order = execute(ready, head)
    assert in_order.verdict == "failed", in_order.header
    first = execute(ready, head, JobSpec(failing_first=("test_z.TestBroken.test_wrong",)))
    assert first.header["failing_first"].startswith("1 of 1"), first.header
    assert first.verdict == "error", first.header
    assert "stopped at a flaky or quarantined failure" in first.header["reason"]


def test_a_shard_module_that_exits_at_import_is_a_failed_import(tmp_path):
    """Loaded by name for a shard, a module calling sys.exit(0) at import
    (unittest.main() without the __main__ guard) ended the shard before
    any test ran: 'passed', 0 tests, and the merge passed the commit."""
    import subprocess
    from ci import results
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text(FAILING_TEST)
    (tests / "test_b.py").write_text("import sys\nsys.exit(0)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    report = tmp_path / "report.xml"
    proc = subprocess.run([PY, os.path.join(root, "ci_support", "unittest_recorder.py"),
                           str(report), "--shard", "--path-first", str(tests), "test_b", "test_a"],
                          cwd=tmp_path, capture_output=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    records = results.parse_records(open(str(report) + ".records", "rb").read())
    assert sorted((r.name, r.outcome) for r in records) == [("test_a", "failed"),
                                                            ("test_b", "error")]


def test_a_flaky_failure_that_stopped_a_pytest_x_run_does_not_pass_it(upstream, tmp_path):
    """pytest -x stopped at a test that then passed on its rerun: the run's
    one record was flaky, and the commit passed, though test_b (failing)
    never ran."""
    once = tmp_path / "failed-once"
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({
        ".ci.ini": "[ci]\ntest = python -m pytest -q -x -p no:cacheprovider tests\n"
                   "rerun_failures = 1\n",
        "tests/test_sample.py": None,
        "tests/test_a.py": f"import os\n\ndef test_flaky():\n    if not os.path.exists("
                           f"{str(once)!r}):\n        open({str(once)!r}, 'w').close()\n"
                           "        assert False\n",
        "tests/test_b.py": "def test_b():\n    assert False\n"}, "pytest -x")
    ready = Settings(clone, ProcessSlot(), environments.Preparer(recipe.Limits(timeout=60)),
                     1 << 20, checkout_timeout=60)
    outcome = execute(ready, head)
    assert once.exists(), outcome.output[-2000:]
    assert outcome.verdict == "error", outcome.header
    assert "stopped at a flaky or quarantined failure" in outcome.header["reason"]


# ---- a sharded run says what the whole run says ----------------------------

COUNTS = ("tests", "failures", "errors", "skipped")


def whole_and_sharded(upstream, tmp_path, files: dict, total: int = 2, command=None):
    """The commit of ``files`` run whole, then in ``total`` shards, merged:
    (whole outcome, merged outcome, the shards' outcomes)."""
    from ci import sharding
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit(files, "under test")
    whole = execute(settings(clone, command), head)
    parts = {i: execute(settings(clone, command), head,
                        JobSpec(sharding.ShardSpec(i, total, {})))
             for i in range(1, total + 1)}
    return whole, sharding.merge(total, parts), parts


def verdict_and_counts(outcome) -> tuple:
    return (outcome.verdict, *(int(outcome.header[name]) for name in COUNTS))


NO_TESTS = "import unittest\n\nVALUE = 1\n"


def test_shards_whose_modules_hold_no_test_are_no_pass(upstream, tmp_path):
    """Each shard ran a module without tests and passed with 0 tests; the
    merge passed the commit, which unsharded is 'no tests ran'."""
    whole, merged, parts = whole_and_sharded(upstream, tmp_path, {
        "tests/test_sample.py": None, "tests/test_a.py": NO_TESTS, "tests/test_b.py": NO_TESTS})
    assert all(p.header["shards"] in ("1/2", "2/2") for p in parts.values())
    assert (whole.verdict, whole.header["reason"]) == ("error", "no tests ran")
    assert verdict_and_counts(merged) == verdict_and_counts(whole)
    assert merged.header["reason"] == "no tests ran"


def test_a_suite_without_test_files_is_no_pass_sharded(upstream, tmp_path):
    """No shard had a file and none ran anything: the merge of nothing
    passed (0 tests), where discovery finds no test: 'no tests ran'."""
    whole, merged, parts = whole_and_sharded(upstream, tmp_path, {
        "tests/test_sample.py": None, "tests/helpers.py": NO_TESTS})
    assert (whole.verdict, whole.header["reason"]) == ("error", "no tests ran")
    assert verdict_and_counts(merged) == verdict_and_counts(whole)
    assert merged.header["reason"] == "no tests ran"
    # Shard 1 ran discovery, as the unsharded run does.
    assert [parts[i].header["shards"] for i in (1, 2)] == ["1/2 whole", "2/2 skipped"]


PYTEST = [PY, "-m", "pytest", "-q", "tests"]


def test_a_pytest_shard_whose_files_hold_no_test_passes(upstream, tmp_path):
    """pytest exits 5 when it collects nothing: the shard whose only file
    held helpers was 'error', and so was the commit that passes whole."""
    whole, merged, parts = whole_and_sharded(upstream, tmp_path, {
        "tests/test_sample.py": None,
        "tests/test_a.py": "def test_a():\n    assert True\n",
        "tests/test_helpers.py": "VALUE = 1\n"}, command=PYTEST)
    assert whole.verdict == "passed" and whole.header["tests"] == 1
    assert verdict_and_counts(merged) == verdict_and_counts(whole)
    # The shard plugin (ci_shard.py) ends a run whose share is empty with 0.
    assert sorted(int(p.header["exit_code"]) for p in parts.values()) == [0, 0]


def test_pytest_shards_of_a_suite_without_tests_are_no_pass(tmp_path, upstream):
    """Every shard exits 5, as the whole run does: each passes with 0
    tests, and the merge says what the whole run says, an error."""
    whole, merged, parts = whole_and_sharded(upstream, tmp_path, {
        "tests/test_sample.py": None, "tests/test_helpers.py": "VALUE = 1\n"},
        command=PYTEST)
    assert whole.verdict == "error" and int(whole.header["exit_code"]) == 5
    assert [(p.verdict, int(p.header["exit_code"])) for p in parts.values()] == [
        ("passed", 5), ("passed", 5)]
    assert verdict_and_counts(merged) == verdict_and_counts(whole)
    assert merged.header["reason"] == "no tests ran"


def test_a_unittest_shard_without_tests_on_python_3_12_passes(upstream, tmp_path):
    """Python 3.12's unittest exits 5 after 'Ran 0 tests' (3.11's 0)."""
    from support.pythons import pyenv_python
    from ci import sharding
    from ci.runner import interpreters
    cell = interpreters.JobCell("", interpreters.resolve(pyenv_python("3.12"), "3.12"))
    clone = upstream.clone(tmp_path / "clone")
    head = upstream.commit({"tests/test_helpers.py": NO_TESTS}, "a module without tests")
    cache = environments.EnvironmentCache(str(tmp_path / "envs"))
    try:
        ready = settings(clone)
        ready.preparer.cache = cache
        whole = execute(ready, head, cell=cell)
        parts = {i: execute(ready, head, JobSpec(sharding.ShardSpec(i, 2, {})), cell)
                 for i in (1, 2)}
    finally:
        cache.close()
    assert whole.verdict == "passed" and whole.header["tests"] == 1, whole.header
    assert verdict_and_counts(sharding.merge(2, parts)) == verdict_and_counts(whole)
    assert sorted(int(p.header["exit_code"]) for p in parts.values()) == [0, 5]


def unittest_case(name: str, fails: bool = False) -> str:
    return (f"import unittest\n\nclass Test{name.title()}(unittest.TestCase):\n"
            f"    def test_{name}(self):\n        self.assertEqual(1, {2 if fails else 1})\n")


HELPERS_WITH_DOCTEST = ('def double(x):\n    """\n    >>> double(2)\n    5\n    """\n'
                        '    return 2 * x\n')

# Packages whose __init__.py discovery runs and a shard's modules never do.
DISCOVERY_PACKAGES = {
    "load_tests adds a failing doctest": {
        "tests/__init__.py": "import doctest\n\nfrom tests import helpers\n\n\n"
                             "def load_tests(loader, tests, pattern):\n"
                             "    tests.addTests(doctest.DocTestSuite(helpers))\n"
                             "    return tests\n",
        "tests/helpers.py": HELPERS_WITH_DOCTEST},
    "a package imports a test class, which runs twice": {
        "tests/sub/__init__.py": "from .test_c import TestC\n",
        "tests/sub/test_c.py": unittest_case("c", fails=True)},
    "a package skips on import: one skip": {
        "tests/sub/__init__.py": "import unittest\nraise unittest.SkipTest('no GPU')\n",
        "tests/sub/test_c.py": unittest_case("c"), "tests/sub/test_d.py": unittest_case("d")},
}


@pytest.mark.parametrize("case", list(DISCOVERY_PACKAGES))
def test_packages_discovery_imports_are_not_split(upstream, tmp_path, case):
    files = {"tests/test_sample.py": None, "tests/test_a.py": unittest_case("a"),
             "tests/test_b.py": unittest_case("b"), **DISCOVERY_PACKAGES[case]}
    whole, merged, parts = whole_and_sharded(upstream, tmp_path, files)
    assert verdict_and_counts(merged) == verdict_and_counts(whole), case
    assert [parts[i].header["shards"] for i in (1, 2)] == ["1/2 whole", "2/2 skipped"]
    assert b"runs the whole suite, not its share: tests/" in parts[1].output


def test_a_symlinked_package_discovery_follows_is_not_split(upstream, tmp_path):
    """Discovery follows a symlinked package folder; the shards' module
    list skipped it, so its failing test ran in no shard."""
    upstream.commit({"shared/__init__.py": "", "shared/test_shared.py":
                     unittest_case("shared", fails=True)}, "shared tests")
    os.symlink("../shared", os.path.join(upstream.path, "tests", "linked"))
    whole, merged, parts = whole_and_sharded(upstream, tmp_path, {
        "tests/test_a.py": unittest_case("a"), "tests/test_b.py": unittest_case("b")})
    assert whole.verdict == "failed" and whole.header["tests"] == 4
    assert verdict_and_counts(merged) == verdict_and_counts(whole)
    assert b"tests/linked is a symlinked package" in parts[1].output


YAML_CONFTEST = '''import pytest


def pytest_collect_file(parent, file_path):
    if file_path.name == "cases.yaml":
        return CaseFile.from_parent(parent, path=file_path)


class CaseFile(pytest.File):
    def collect(self):
        for line in self.path.read_text().splitlines():
            name, _, value = line.partition(":")
            yield Case.from_parent(self, name=name.strip(), value=value.strip())


class Case(pytest.Item):
    def __init__(self, *, value, **kwargs):
        super().__init__(**kwargs)
        self.value = value

    def runtest(self):
        assert self.value == "ok", self.value

    def reportinfo(self):
        return self.path, 0, self.name
'''

FAILING_PYTEST = "def test_wrong():\n    assert 1 == 2\n"

# What pytest collects from a folder, which the files a shard named did not
# say: each case run whole and in shards must give one verdict and counts.
PYTEST_PROJECTS = {
    "addopts --doctest-modules: a failing doctest in a helper": {
        "pytest.ini": "[pytest]\naddopts = --doctest-modules\n",
        "tests/helpers.py": HELPERS_WITH_DOCTEST},
    "a conftest.py collects a failing case from cases.yaml": {
        "tests/conftest.py": YAML_CONFTEST, "tests/cases.yaml": "one: ok\ntwo: broken\n"},
    "a conftest.py's collect_ignore": {
        "tests/conftest.py": "collect_ignore = ['test_old.py']\n",
        "tests/test_old.py": FAILING_PYTEST},
    "norecursedirs": {
        "pytest.ini": "[pytest]\nnorecursedirs = legacy\n",
        "tests/legacy/test_legacy.py": FAILING_PYTEST},
    "addopts --ignore": {
        "pytest.ini": "[pytest]\naddopts = --ignore=tests/test_old.py\n",
        "tests/test_old.py": FAILING_PYTEST},
    "build/ skipped by default": {"tests/build/test_built.py": FAILING_PYTEST},
    "a module that cannot be imported: one error, no test run": {
        "tests/test_broken.py": "import no_such_module_here\n"},
    "a module that skips itself: one skip": {
        "tests/test_skipped.py": "import pytest\n\npytest.skip('not here', "
                                 "allow_module_level=True)\n"},
    "-x in addopts: the run stops at its first failure": {
        "pytest.ini": "[pytest]\naddopts = -x\n",
        "tests/test_c.py": FAILING_PYTEST, "tests/test_d.py": FAILING_PYTEST},
}


@pytest.mark.parametrize("case", list(PYTEST_PROJECTS))
def test_pytest_shards_keep_what_pytest_collects(upstream, tmp_path, case):
    files = {"tests/test_sample.py": None,
             "tests/test_a.py": "def test_a():\n    assert True\n",
             "tests/test_b.py": "def test_b():\n    assert True\n",
             **PYTEST_PROJECTS[case]}
    whole, merged, parts = whole_and_sharded(upstream, tmp_path, files, command=PYTEST)
    assert verdict_and_counts(merged) == verdict_and_counts(whole), (
        case, whole.output[-1500:].decode(), merged.output[-3000:].decode())
    assert all(p.header["shards"] == f"{i}/2" for i, p in parts.items())
    assert all(b"ci_shard: " in p.output for p in parts.values())
