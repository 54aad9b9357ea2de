"""Start-up flags: every count and duration flag of every entry point is
checked by the one ``positive`` type, so zero, a negative, NaN and
infinity are refused the same way everywhere (one line, exit status 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dashboard
import dispatcher
import repo_observer
import run_local
import test_runner
from ci import config
from ci.history import child as history_child
from ci.notify import flags as notify_flags

# Per entry point, every flag that must be above zero.
COMMON = ["--max-message-size", "--read-timeout", "--auth-window"]
SERVER = COMMON + ["--max-connections", "--max-buffered"]
NOTIFY = [flag for flag, _, _ in notify_flags.SECONDS_FLAGS]
FLAGS = {
    dispatcher: SERVER + NOTIFY + ["--ping-interval", "--ping-misses", "--ping-timeout",
                                   "--job-timeout", "--max-attempts", "--workers",
                                   "--max-shards"],
    repo_observer: SERVER + ["--poll", "--new-branch-limit"],
    test_runner: SERVER + ["--timeout", "--setup-timeout", "--max-timeout", "--keep-envs",
                           "--checkout-timeout", "--heartbeat", "--retry-max",
                           "--progress-interval"],
    dashboard: COMMON + ["--request-timeout", "--max-connections", "--scan-interval"],
    run_local: ["--runners"],
    history_child: ["--max-pending"],   # the history writer the dispatcher starts
}
CASES = [(module, flag) for module, flags in FLAGS.items() for flag in flags]


def positional(module) -> list[str]:
    """The positional arguments a parser needs besides the flag under test."""
    if module is history_child:
        return ["--store", "history.sqlite3", "--results-dir", "test_results"]
    return ["repo"] if module in (repo_observer, test_runner) else []


@pytest.mark.parametrize("module, flag", CASES,
                         ids=[f"{m.__name__}{f}" for m, f in CASES])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e300"])
def test_every_count_and_duration_flag_refuses_non_positive(module, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.build_parser().parse_args([*positional(module), f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"argument {flag}: must be" in err or "invalid int value" in err, err


@pytest.mark.parametrize("module, flag", CASES,
                         ids=[f"{m.__name__}{f}" for m, f in CASES])
def test_every_count_and_duration_flag_takes_a_positive_value(module, flag):
    args = module.build_parser().parse_args([*positional(module), f"{flag}=3"])
    assert getattr(args, flag[2:].replace("-", "_")) == 3


@pytest.mark.parametrize("argv, message", [
    (["--seconds", "0"], "x: error: argument --seconds: must be positive (see --help)"),
    (["--count", "0"], "x: error: argument --count: must be at least 1 (see --help)"),
    (["--seconds", "soon"], "argument --seconds: invalid float value: 'soon'"),
    (["--count", "1.5"], "argument --count: invalid int value: '1.5'"),
])
def test_positive_says_what_is_wrong(argv, message, capsys):
    parser = config.ArgumentParser(prog="x")
    parser.add_argument("--seconds", type=config.positive(float))
    parser.add_argument("--count", type=config.positive(int))
    assert parser.parse_args(["--seconds", "0.5", "--count", "1"]).seconds == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "1e300"])
def test_the_hooks_timeout_is_refused_in_one_line_not_a_traceback(value):
    """``hook_client.py --timeout`` (read without argparse for speed) and
    the clients' ``--timeout`` took any float: nan, -1 or 1e300 reached
    ``settimeout`` and ended in a traceback."""
    proc = subprocess.run([sys.executable, "-S", "hook_client.py", "--observer", "127.0.0.1:9",
                           "--timeout", value], cwd=os.path.dirname(os.path.abspath(
                               dispatcher.__file__)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("(see --help)") and "--timeout" in proc.stderr
