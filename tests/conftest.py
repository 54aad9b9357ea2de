"""Fixtures every test may ask for: temporary git repositories, the real
daemons as processes (ended by PID in the finalisers), threaded stand-ins,
and the dashboard's result folders.  Plain helpers live in tests/support/."""

import os
import signal

import pytest

from support.cluster import Cluster, FakeRunner, Fleet, PASSING_TEST, Upstream
from support.dashboard import Dashboard, dead_address
from support.faults import Notes, is_fault_process
from support.privilege import KeyedRunner
from support.procs import process_alive


@pytest.fixture
def quiet_pytest(monkeypatch):
    """The pytest a test runs as a tested project's command loads only the
    plugins it names: ours (hypothesis, xdist) cost each such run about a
    second of imports and test nothing of the project's."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def upstream(tmp_path):
    repo = Upstream(tmp_path / "upstream")
    repo.commit({"tests/test_sample.py": PASSING_TEST}, "initial")
    return repo


@pytest.fixture
def cluster(tmp_path, upstream, request):
    c = Cluster(tmp_path, upstream)
    yield c
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(c.dump_logs())
    c.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def threaded_servers():
    """Make ThreadedServer subclasses; all are closed after the test."""
    made = []

    def make(cls, *args):
        made.append(cls(*args))
        return made[-1]
    yield make
    for server in made:
        server.close()


@pytest.fixture
def fleet():
    made = []

    def make(size: int = 4) -> Fleet:
        made.append(Fleet(size))
        return made[-1]
    yield make
    for one in made:
        one.close()


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "test_results"
    folder.mkdir()
    return folder


@pytest.fixture
def dashboards(tmp_path):
    made = []

    def start(results_dir, dispatcher=None, *extra):
        made.append(Dashboard(tmp_path, results_dir, dispatcher or dead_address(), *extra))
        return made[-1]
    yield start
    for item in made:
        item.close()


@pytest.fixture
def notes(tmp_path):
    """Where the fault tests of the commits under test leave their notes
    (see tests/support/faults.py)."""
    folder = Notes(str(tmp_path / "notes"))
    yield folder
    # Test processes run in sessions of their own, so killing a daemon's
    # group does not reach them; end any that are still there, by PID.
    for pid in folder.pids():
        if process_alive(pid) and is_fault_process(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def keyed_runners():
    """Make runner stand-ins holding issued keys (see KeyedRunner); all
    are closed after the test."""
    made = []

    def make(*names, port=0):
        made.extend(KeyedRunner(name, port) for name in names)
        return made[-len(names):]
    yield make
    for runner in made:
        runner.close()


@pytest.fixture
def fake_runner(threaded_servers):
    """Make runner stand-ins (FakeRunner) that answer ``runtest`` as the
    test says; all are closed after the test."""
    return lambda answers=None: threaded_servers(FakeRunner, answers)
