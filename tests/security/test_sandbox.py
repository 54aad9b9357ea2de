"""Nothing a test leaves behind reaches a later run (issue 17), with
``--test-user``: a user-site ``.pth`` or a ``pip.conf`` planted in HOME, a
process that escaped its process group, files in the shared temporary
folders (ci.runner.sandbox.cleanup).  Real runners as root switching to test users of
their own (root only), and the temporary folders' sweep in-process."""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import stat
import subprocess

import pytest

from ci.runner.sandbox import cleanup as user_sandbox
from support.cluster import FAILING_TEST, ROOT, SYSTEM_PYTHON, Daemon, free_port, wait_for_port, wait_until
from support.users import new_test_user
from support.privilege import LOOPBACK, TEST_COMMAND, ask, nobody_clone, user_folder_cluster

# A test that plants, for every later Python of its user, a module that
# turns any exit into success, and for every later pip an index of its own.
PLANTING_TEST = r'''import os, site, unittest

PAYLOAD = ("import atexit, os\nprint('POISONED by zz.pth', flush=True)\n"
           "atexit.register(os._exit, 0)\n")
PIP_CONF = "[global]\nindex-url = http://127.0.0.1:9/poisoned-index\n"


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


class Plant(unittest.TestCase):
    def test_plant(self):
        user_site = site.getusersitepackages()
        write(os.path.join(user_site, "zz.py"), PAYLOAD)
        write(os.path.join(user_site, "zz.pth"), "import zz\n")
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        write(os.path.join(config, "pip", "pip.conf"), PIP_CONF)
        write(os.path.expanduser("~/.pip/pip.conf"), PIP_CONF)
        info = os.stat(os.path.expanduser("~"))
        print("PLANTED HOME=%s TMPDIR=%s mode=%o uid=%d" % (
            os.path.expanduser("~"), os.environ.get("TMPDIR"), info.st_mode & 0o777,
            info.st_uid), flush=True)
'''

# The setup of every commit: fails if pip's configuration names the
# planted index (the index a later setup would install from).
CANARY_SETUP = ("python -c \"import subprocess, sys; out = subprocess.run([sys.executable, "
                "'-m', 'pip', 'config', 'list'], capture_output=True, text=True).stdout; "
                "print('pip config:', out); sys.exit(3 if 'poisoned' in out else 0)\"")


def start_runner(cluster, base, name: str, user, *extra) -> Daemon:
    """A runner as root (the system Python, which the test user can run,
    so that environments work) with ``--test-user``, in a clone of that
    user's."""
    clone = nobody_clone(cluster.upstream, base / f"clone-{name}", user)
    port = free_port()
    args = [SYSTEM_PYTHON, os.path.join(ROOT, "test_runner.py"), "--host", LOOPBACK,
            "--port", str(port), "--dispatcher-server", cluster.dispatcher_address,
            "--heartbeat", "0.5", "--retry-max", "0.5", "--log-level", "DEBUG",
            "--test-user", user.pw_name, "--state-dir", str(base / f"state-{name}"),
            "--test-command", TEST_COMMAND, *extra, clone]
    daemon = Daemon(f"runner-{name}", args, str(base / f"runner-{name}.log"), str(base),
                    cluster.env)
    cluster.daemons.append(daemon)
    wait_for_port(port, daemon)
    return daemon


def run(cluster, commit: str) -> dict:
    """Dispatch ``commit`` as the observer does, on ``main`` (a trusted
    branch: its environments are reused by main's next commits)."""
    reply = ask(cluster.dispatcher_port, "dispatch", commit, f"{commit} - main\n".encode())
    assert reply.command == "ok", reply
    return cluster.result(commit, 60)


def text(result: dict) -> str:
    return result["output"][-4000:].decode("utf-8", "replace")


def test_a_planted_user_site_and_pip_conf_change_no_later_verdict_on_either_runner(request):
    """A commit's test writes ``zz.pth`` + ``zz.py`` into Python's user
    site and a ``pip.conf`` naming its own index.  With HOME=/tmp (a user
    without a home) every later Python of that user imported it, and every
    other homeless user's too: the next failing commit came out passed, on
    that runner and on another.  Now each run has a HOME of its own."""
    user_a, user_b = new_test_user(request), new_test_user(request)
    cluster, upstream, base, _nobody = user_folder_cluster(request)
    cluster.start_dispatcher()
    runner_a = start_runner(cluster, base, "a", user_a, "--setup-command", CANARY_SETUP)
    planting = upstream.commit({"tests/test_plant.py": PLANTING_TEST,
                                "requirements.txt": "first\n"}, "plants for later runs")
    planted = run(cluster, planting)
    assert planted["verdict"] == "passed", text(planted)
    assert b"PLANTED" in planted["output"], text(planted)
    # The first failing commit builds an environment (its setup reads
    # pip's configuration), the second reuses it (only its tests run).
    first = upstream.commit({"tests/test_plant.py": None, "tests/test_sample.py": FAILING_TEST,
                             "requirements.txt": "second\n"}, "broken, new environment")
    second = upstream.commit({"tests/test_more.py": FAILING_TEST.replace("TestBroken",
                                                                        "TestMore")},
                             "broken again, same environment")
    later = [run(cluster, first), run(cluster, second)]
    # Another runner, with another homeless test user.
    runner_a.stop()
    start_runner(cluster, base, "b", user_b, "--setup-command", CANARY_SETUP)
    third = upstream.commit({"tests/test_third.py": FAILING_TEST.replace("TestBroken",
                                                                        "TestThird")},
                            "broken on the other runner")
    later.append(run(cluster, third))
    for result in later:
        assert result["verdict"] == "failed", text(result)
        assert b"POISONED" not in result["output"] and b"poisoned-index" not in \
            result["output"], text(result)
    assert [r["setup"] for r in later] == ["built", "reused", "built"]
    assert [r["runner"] for r in later][1:] != [later[0]["runner"]] * 2
    # The planting run's HOME was private (700, the user's) in the
    # runner's state folder, and is gone.
    line = next(ln for ln in planted["output"].decode().splitlines()
                if ln.startswith("PLANTED"))
    home = line.split("HOME=")[1].split()[0]
    assert home.startswith(str(base / "state-a" / user_sandbox.FOLDER) + os.sep), line
    assert f"mode=700 uid={user_a.pw_uid}" in line, line
    assert not os.path.lexists(home)
    assert os.listdir(base / "state-a" / user_sandbox.FOLDER) == []


# A new session, a double fork: out of the runner's process group.  The
# survivor says its PID on stdout, then closes it (so the test's read ends).
ESCAPING = r'''import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(1, str(os.getpid()).encode())
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        time.sleep(120)
    os._exit(0)
os.wait()
'''

LEAVING_TEST = r'''import os, subprocess, sys, unittest

FILES = %r
ESCAPING = %r


class Leave(unittest.TestCase):
    def test_leave_things_behind(self):
        for path in FILES:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write("left behind\n")
        pid = subprocess.run([sys.executable, "-c", ESCAPING], check=True,
                             capture_output=True, text=True, timeout=20).stdout
        print("ESCAPED PID", int(pid), flush=True)
'''


def alive_as(pid: int, uid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process of ``uid``."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return False
    return fields["State"].split()[0] not in ("Z", "X") and \
        int(fields["Uid"].split()[0]) == uid


def leave_things_behind(request):
    """A runner whose commit leaves a process that escaped its group
    (setsid, a double fork) and files in /tmp, /var/tmp and /dev/shm;
    returns (the escaped process's pid, the files, the user)."""
    user = new_test_user(request)
    cluster, upstream, base, _nobody = user_folder_cluster(request)
    tag = secrets.token_hex(6)
    folders = [f for f in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(f)]
    # What the test leaves: a file in each folder, and a folder in /tmp.
    tops = [os.path.join(folder, f"ci-left-{tag}") for folder in folders]
    tops.append(f"/tmp/ci-left-dir-{tag}")
    files = tops[:-1] + [f"/tmp/ci-left-dir-{tag}/inner/file"]

    def remove_left():
        # Only the names this test made up (never the folders holding them).
        for top in tops:
            assert os.path.basename(top).endswith(tag), top
            if os.path.isdir(top) and not os.path.islink(top):
                shutil.rmtree(top, ignore_errors=True)
            elif os.path.lexists(top):
                os.unlink(top)
    request.addfinalizer(remove_left)
    cluster.start_dispatcher()
    start_runner(cluster, base, "a", user)
    commit = upstream.commit({"tests/test_leave.py": LEAVING_TEST % (files, ESCAPING)},
                             "leaves things behind")
    result = run(cluster, commit)
    assert result["verdict"] == "passed", text(result)
    pid = int(result["output"].split(b"ESCAPED PID ", 1)[1].split()[0])
    return pid, files, user


def test_a_process_that_escaped_its_group_is_ended_after_the_run(request):
    pid, _files, user = leave_things_behind(request)
    wait_until(lambda: not alive_as(pid, user.pw_uid), 10,
               what=f"the escaped process {pid} ended")


def test_files_the_test_user_left_in_the_shared_temporary_folders_are_gone(request):
    _pid, files, user = leave_things_behind(request)
    assert [path for path in files if os.path.lexists(path)] == []
    assert not os.path.lexists(os.path.dirname(os.path.dirname(files[-1])))


# --------------------------------------------------------------------------
# The sweep itself, in-process (root: it gives files to another uid).

def test_the_sweep_removes_what_the_user_could_have_made_and_nothing_else(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (to give files to another user)")
    uid = gid = 54_321   # no user of that id is needed to own files
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o1777)

    def make(path, owner=uid, mode=0o644, folder=False):
        path = root / path
        if folder:
            path.mkdir()
        else:
            path.write_text("x")
        path.chmod(mode)
        os.chown(path, owner, owner)
        return path
    outside = tmp_path / "roots-file"
    outside.write_text("root's\n")
    gone = [make("owned"), make("owned-dir", folder=True, mode=0o755)]
    gone.append(make("owned-dir/roots", owner=0))           # inside the user's folder
    (root / "link").symlink_to(outside)
    os.lchown(root / "link", uid, gid)
    gone.append(root / "link")
    make("open", owner=0, mode=0o777, folder=True)
    gone.append(make("open/file"))
    kept = [make("open/roots", owner=0), outside]
    make("closed", owner=0, mode=0o755, folder=True)
    kept.append(make("closed/given"))                      # the user cannot make it here
    make("private", owner=0, mode=0o700, folder=True)
    make("private/open", owner=0, mode=0o777, folder=True)
    kept.append(make("private/open/file"))                 # the user cannot reach it
    clone = make("clone", folder=True, mode=0o755)
    kept += [clone, make("clone/tracked")]
    holder = make("holder", folder=True, mode=0o755)
    inner = root / "holder" / "clone"
    inner.mkdir()
    os.chown(inner, uid, gid)
    kept += [holder, inner]
    gone.append(make("holder/other"))
    removed = user_sandbox.remove_owned(uid, gid, roots=(str(root),),
                                        keep=(str(clone), str(inner)))
    assert [str(p) for p in kept if not os.path.lexists(p)] == []
    assert [str(p) for p in gone if os.path.lexists(p)] == []
    assert removed == 5   # owned, owned-dir, link, open/file, holder/other
    assert outside.read_text() == "root's\n"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644 and outside.stat().st_uid == 0


def test_what_the_user_left_on_top_goes_even_beside_trees_too_big_to_walk(tmp_path):
    # Others' big trees in /tmp (a build's, a benchmark's) used up the
    # walk's budget before it reached the user's own file at the top when
    # they came first in the folder's order; each folder's own entries now
    # come before any sub-folder's.
    if os.geteuid() != 0:
        pytest.skip("needs root (to give files to another user)")
    uid = gid = 54_321
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o1777)
    for n in range(6):
        crowded = root / f"crowded-{n}"
        crowded.mkdir()
        for m in range(30):
            (crowded / str(m)).write_text("x")
    left = root / "left-by-the-test"
    left.write_text("x")
    os.chown(left, uid, gid)
    assert user_sandbox.remove_owned(uid, gid, roots=(str(root),), budget=20) == 1
    assert not left.exists() and len(list((root / "crowded-0").iterdir())) == 30


def nest(top: pathlib.Path, depth: int) -> None:
    """Folders ``depth`` deep under ``top`` (a path far past PATH_MAX), a
    file and a symlink to ``top``'s parent at the bottom."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d" * 50, dir_fd=fd)
            sub = os.open("d" * 50, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        os.symlink(str(top.parent), "up", dir_fd=fd)
    finally:
        os.close(fd)


def test_folders_nested_deeper_than_python_recurses_are_removed_all_the_same(request, tmp_path):
    """shutil.rmtree recurses: 1,500 folders deep it raised RecursionError,
    which escaped the run's cleanup (the runner's work thread died) and the
    sweep of the shared temporary folders, and the folders stayed."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to give files to another user)")
    # Whatever is left if it fails (pytest's own cleanup recurses too).
    request.addfinalizer(lambda: subprocess.run(["rm", "-rf", "--", str(tmp_path)],
                                                capture_output=True, timeout=300))
    keep = tmp_path / "keep"
    keep.write_text("kept\n")
    uid = gid = 54_322
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o1777)
    deep = root / "deep"
    deep.mkdir()
    nest(deep, 1500)
    os.chown(deep, uid, gid)
    assert user_sandbox.remove_owned(uid, gid, roots=(str(root),)) == 1
    assert list(root.iterdir()) == []
    run = tmp_path / "run"
    run.mkdir()
    nest(run, 1500)
    user_sandbox.UserSandbox._remove(str(run))
    assert not run.exists() and keep.read_text() == "kept\n"


def test_a_tree_nested_deeper_than_python_recurses_is_given_and_cut(request, tmp_path):
    """The runner takes the working tree back before every checkout
    (chown_tree, an os.fwalk): 1,500 folders deep it raised RecursionError,
    and every later job on that runner was a runner failure."""
    from ci.runner.sandbox.ownership import MAX_DEPTH, Owner, chown_tree
    if os.geteuid() != 0:
        pytest.skip("needs root (to give files to another user)")
    request.addfinalizer(lambda: subprocess.run(["rm", "-rf", "--", str(tmp_path)],
                                                capture_output=True, timeout=300))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "kept.py").write_text("x = 1\n")
    nest(tree, 1500)
    chown_tree(str(tree), Owner(54_323, 54_323))
    depth, fd = 0, os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while "d" * 50 in os.listdir(fd):
            sub = os.open("d" * 50, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, depth = sub, depth + 1
            assert os.fstat(fd).st_uid == 54_323
    finally:
        os.close(fd)
    assert depth == MAX_DEPTH
    assert (tree / "kept.py").stat().st_uid == 54_323
    assert (tmp_path / "tree").lstat().st_uid == 54_323


# --------------------------------------------------------------------------
# The start-up checks run the test user's Python too.

def home_of_its_own(request, user) -> pathlib.Path:
    """Give ``user`` a home in /home, as ``useradd --create-home`` would
    (out of the temporary folders the runner sweeps), removed afterwards."""
    if not os.path.isdir("/home"):
        pytest.skip("needs /home for a test user's own home")
    home = pathlib.Path("/home") / user.pw_name
    home.mkdir(mode=0o755)
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    os.chown(home, user.pw_uid, user.pw_gid)
    subprocess.run(["usermod", "--home", str(home), user.pw_name], check=True,
                   capture_output=True, timeout=30)
    return home


def test_the_start_up_checks_run_nothing_the_test_user_left_in_its_home(request):
    """A test may write into its user's own home (found through ``pwd``,
    whatever HOME says), which no run removes.  The runner's start-up
    checks started that user's Python with HOME set to it (to /tmp for a
    homeless user), so a user-site ``.pth`` planted there ran as the user
    at the next start (and could leave a process that changes the first
    job's tree after its checkout).  The checks now run in a private HOME
    of their own, and every process of the user is ended after them."""
    user = new_test_user(request)
    cluster, upstream, base, _nobody = user_folder_cluster(request)
    home = home_of_its_own(request, user)
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % "
                              "sys.version_info[:2])"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
    marker = home / "PLANTED-CODE-RAN"
    pth = home / ".local" / "lib" / f"python{version}" / "site-packages" / "zz_planted.pth"
    # Written as the user, as a test would (the home is its own).
    subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import os, sys; os.makedirs(os.path.dirname("
                    "sys.argv[1])); open(sys.argv[1], 'w').write(sys.argv[2])", str(pth),
                    f"import os; open({str(marker)!r}, 'a').write(str(os.getpid()))\n"],
                   check=True, timeout=30, user=user.pw_uid, group=user.pw_gid,
                   extra_groups=[])
    cluster.start_dispatcher()
    start_runner(cluster, base, "a", user)
    assert not marker.exists(), marker.read_text()
    assert user_sandbox.live_pids(user.pw_uid) == []
    commit = upstream.commit({"tests/test_more.py": PASSING_MORE}, "more")
    assert run(cluster, commit)["verdict"] == "passed"
    assert not marker.exists(), marker.read_text()
    # Planted it was: the user's Python with HOME there runs it.
    subprocess.run([SYSTEM_PYTHON, "-c", "pass"], check=True, timeout=30,
                   env={"HOME": str(home)}, user=user.pw_uid, group=user.pw_gid,
                   extra_groups=[])
    assert marker.exists()


PASSING_MORE = """import unittest


class TestMore(unittest.TestCase):
    def test_ok(self):
        pass
"""
