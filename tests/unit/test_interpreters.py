"""ci/runner/interpreters.py: --label and --python checked, each
interpreter resolved by running it; a version shim resolved in an empty
folder (so a .python-version cannot steer it) or refused."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from support.cluster import ROOT
from support.pythons import pyenv_python

from ci.config import ConfigError
from ci.runner import interpreters

OWN = f"{sys.version_info[0]}.{sys.version_info[1]}"


def script(path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_labels_are_checked_and_interpreter_labels_come_only_from_python():
    assert interpreters.runner_label("gpu-2.big_x") == "gpu-2.big_x"
    for bad in ("", "has space", "x" * 65, "semi;colon", "é"):
        with pytest.raises(argparse.ArgumentTypeError, match="invalid label"):
            interpreters.runner_label(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="--python 3.9=PATH"):
        interpreters.runner_label("python3.9")


def test_python_flags_are_parsed_and_bad_ones_refused():
    assert interpreters.python_flag("3.12=/opt/py/bin/python3") == \
        interpreters.PythonFlag("3.12", "/opt/py/bin/python3")
    assert interpreters.python_flag("3.9") == interpreters.PythonFlag("3.9")
    assert interpreters.python_flag("auto") == interpreters.PythonFlag(None)
    for bad in ("three", "3", "3.12=", "/usr/bin/python3", "3.1234=/x"):
        with pytest.raises(argparse.ArgumentTypeError):
            interpreters.python_flag(bad)


def test_no_python_flag_is_the_runners_own_interpreter():
    found = interpreters.from_flags(None)
    assert list(found) == [OWN] and found[OWN].executable == sys.executable
    assert interpreters.advertised(["gpu", "gpu"], found) == ["gpu", f"python{OWN}"]


def test_a_real_interpreter_resolves_and_a_wrong_version_or_missing_one_is_refused(tmp_path):
    found = interpreters.from_flags([interpreters.python_flag(f"{OWN}={sys.executable}")])
    assert found[OWN].full_version == sys.version
    assert os.path.samefile(found[OWN].executable, sys.executable)
    other = "3.1" if OWN != "3.1" else "3.2"
    with pytest.raises(ConfigError, match=f"--python {other}: .* is Python {OWN}, not {other}"):
        interpreters.from_flags([interpreters.python_flag(f"{other}={sys.executable}")])
    missing = str(tmp_path / "python3.99")
    with pytest.raises(ConfigError, match=f"--python 3.99: cannot run {missing}"):
        interpreters.from_flags([interpreters.python_flag(f"3.99={missing}")])
    with pytest.raises(ConfigError, match="no python3.99 on PATH"):
        interpreters.from_flags([interpreters.python_flag("3.99")], search_path=str(tmp_path))
    liar = script(tmp_path / "liar", "#!/bin/sh\necho hello\n")
    with pytest.raises(ConfigError, match="not a Python interpreter"):
        interpreters.from_flags([interpreters.python_flag(f"3.99={liar}")])


def test_a_shim_that_does_not_resolve_is_refused_with_a_clear_line(tmp_path):
    shim = script(tmp_path / "python3.12",
                  "#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    with pytest.raises(ConfigError) as caught:
        interpreters.from_flags([interpreters.python_flag(f"3.12={shim}")])
    assert str(caught.value) == (
        f"--python 3.12: {shim} is a version shim (a script, not an interpreter) and does "
        f"not resolve here ({shim} exited 127: pyenv: python3.12: command not found); "
        "give the interpreter itself")


def test_a_shim_is_resolved_in_an_empty_folder_not_where_a_python_version_points(tmp_path):
    """A shim like pyenv's follows the .python-version of the folder it
    runs in; resolved at start (in an empty folder), the runner keeps the
    interpreter itself, which a commit's .python-version cannot change."""
    py312, py313 = pyenv_python("3.12"), pyenv_python("3.13")
    shim = script(tmp_path / "python3", "#!/bin/sh\n"
                  f"if [ -f .python-version ]; then exec {py313} \"$@\"; fi\n"
                  f"exec {py312} \"$@\"\n")
    (tmp_path / ".python-version").write_text("3.13\n")
    # The shim itself, run in a folder with .python-version, would switch:
    ran = subprocess.run([shim, "-c", "import sys; print(sys.version_info[1])"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert ran.stdout.strip() == "13"
    found = interpreters.from_flags([interpreters.python_flag(f"3.12={shim}")])
    assert found["3.12"].version == "3.12"
    assert os.path.samefile(found["3.12"].executable, py312)
    assert not interpreters.is_script(found["3.12"].executable)


def test_auto_finds_python3_x_on_path_and_leaves_out_shims_that_do_not_resolve(tmp_path):
    py312 = pyenv_python("3.12")
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    script(first / "python3.12", "#!/bin/sh\nexit 127\n")   # a dead shim first
    os.symlink(py312, second / "python3.12")
    os.symlink(sys.executable, second / f"python{OWN}")
    found = interpreters.from_flags([interpreters.python_flag("auto")],
                                    search_path=f"{first}{os.pathsep}{second}")
    assert set(found) == {"3.12", OWN}
    assert os.path.samefile(found["3.12"].executable, py312)


@pytest.mark.parametrize("args, line", [
    (["--label", "bad label"], "argument --label: invalid label 'bad label'"),
    (["--python", "3.12=/nonexistent/python3.12"],
     "test_runner: error: --python 3.12: cannot run /nonexistent/python3.12"),
])
def test_the_runner_refuses_to_start_on_a_bad_label_or_interpreter(tmp_path, args, line):
    clone = tmp_path / "clone"
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "test_runner.py"), *args,
                           "--port", "1", "--state-dir", str(tmp_path / "state"), str(clone)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and line in proc.stderr, proc.stderr
