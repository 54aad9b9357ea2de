"""Making a virtual environment with a given interpreter, and lending it
pip.  Split from ``environments`` (which decides when and where to build)
because a matrix cell's environment is made by the cell's interpreter,
not the runner's: ``<python> -m venv``.

A venv is made without pip, then the interpreter's own pip package is
copied in (a fraction of a second, where ``ensurepip`` takes seconds);
only an interpreter without pip leaves that to ``ensurepip``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import venv

from ci.runner.interpreters import Interpreter
from ci.wire import one_line

# Making an empty venv takes well under a second.
CREATE_TIMEOUT = 120.0


def create(path: str, python: Interpreter, timeout: float = CREATE_TIMEOUT) -> None:
    """A fresh venv at ``path`` whose ``bin/python`` is ``python``; the
    runner's own interpreter makes it in-process.  OSError on failure."""
    if os.path.realpath(python.executable) == os.path.realpath(sys.executable):
        venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
        return
    try:
        proc = subprocess.run([python.executable, "-I", "-m", "venv", "--without-pip",
                               "--symlinks", path], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OSError(f"{python.executable} -m venv did not finish within "
                      f"{timeout:g}s") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OSError(f"{python.executable} -m venv exited {proc.returncode}"
                      + (f": {one_line(lines[-1], 200)}" if lines else ""))


def provide_pip(env_path: str, python: Interpreter) -> bool:
    """Copy ``python``'s own pip into the new environment, so that the
    setup command's ``python -m pip`` works there.  False when it has no
    pip to copy (``ensurepip`` then installs the bundled one)."""
    if not python.pip or not os.path.isdir(python.pip):
        return False
    parent = os.path.dirname(python.pip)
    infos = glob.glob(os.path.join(glob.escape(parent), "pip-*.dist-info"))
    site = os.path.join(env_path, "lib", f"python{python.version}", "site-packages")
    if len(infos) != 1 or not os.path.isdir(site):
        return False
    shutil.copytree(python.pip, os.path.join(site, "pip"), symlinks=True)
    shutil.copytree(infos[0], os.path.join(site, os.path.basename(infos[0])), symlinks=True)
    env_python = os.path.join(env_path, "bin", "python")
    for name in ("pip", "pip3", f"pip{python.version}"):
        script = os.path.join(env_path, "bin", name)
        with open(script, "w") as handle:
            handle.write(f"#!{env_python}\nimport sys\nfrom pip._internal.cli.main import main\n"
                         "sys.exit(main())\n")
        os.chmod(script, 0o755)
    return True
