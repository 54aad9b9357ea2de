"""The one-command quickstart, run as a new user would run it."""

import json
import os
import re
import signal
import subprocess
import threading
import urllib.request

from support.cluster import GIT_ENV, PY, ROOT, wait_until
from support.procs import process_alive

from ci.results import parse_result
from ci.wire import valid_full_commit


def read_verdicts(results):
    verdicts = {}
    for name in os.listdir(results):
        if valid_full_commit(name):
            with open(os.path.join(results, name), "rb") as handle:
                verdicts[name] = parse_result(handle.read())[0]["verdict"]
    return verdicts


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def test_demo_gives_right_verdicts(tmp_path):
    proc = subprocess.run([PY, os.path.join(ROOT, "run_local.py"), "--demo-only",
                           "--poll", "0.5"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    verdicts = read_verdicts(tmp_path / "test_results")
    assert sorted(verdicts.values()) == ["failed", "passed", "passed"], proc.stderr
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", proc.stderr)
    upstream = tmp_path / ".ci_local" / "upstream"
    log = subprocess.run(["git", "-C", str(upstream), "log", "--format=%H"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert set(log) == set(verdicts)


def test_ctrl_c_stops_every_process(tmp_path):
    proc = subprocess.Popen([PY, os.path.join(ROOT, "run_local.py"), "--poll", "0.5"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pids = []
    url = None
    # Reads below block on the launcher's output: a hung launcher is
    # killed, so the test fails instead of hanging.
    watchdog = threading.Timer(90, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for _ in range(200):
            line = proc.stderr.readline()
            match = re.search(r"started \S+\s+pid (\d+)", line)
            if match:
                pids.append(int(match.group(1)))
            match = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
            if match:
                url = match.group(1)
            if "try it:" in line or not line:
                break
        assert len(pids) == 5 and url
        verdicts = read_verdicts(tmp_path / "test_results")
        assert len(verdicts) == 3
        # The dashboard answers, with every verdict.
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200 and b"CI dashboard" in reply.read()
        def shown():
            return {c["commit"]: c["verdict"] for c in get_json(url + "api/commits")["commits"]}
        # The dashboard lists the results folder at most every half second:
        # what it shows may lag the files by that much, never more than 2 s.
        wait_until(lambda: shown() == verdicts, 2.0, what="the dashboard's list")
        assert shown() == verdicts
        # Its test pages read the dispatcher's test history (in the launcher's
        # state folder, not beside the results folder).
        wait_until(lambda: get_json(url + "api/tests")["results"] == 3, 10,
                   what="the dashboard's test history")

        # The launcher names its runners; the dashboard shows those names.
        wait_until(lambda: sorted(r["name"] for r in get_json(url + "api/status")["runners"])
                   == ["runner1", "runner2"], 5, what="the runners under their names")
        # After the demo it keeps printing each new verdict, one line each.
        upstream = tmp_path / ".ci_local" / "upstream"
        subprocess.run(["git", "-C", str(upstream), "commit", "-q", "--allow-empty", "-m",
                        "one more"], check=True, env=dict(os.environ, **GIT_ENV))
        head = subprocess.run(["git", "-C", str(upstream), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        for _ in range(50):
            line = proc.stderr.readline()
            if head[:12] in line or not line:
                break
        assert re.search(rf"new result {head[:12]} -> passed", line), line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0

        def all_gone():
            return not any(process_alive(pid) for pid in pids)
        wait_until(all_gone, 10, what="launcher's daemons to exit")
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
