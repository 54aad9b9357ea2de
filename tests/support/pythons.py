"""Real interpreters of other versions for matrix tests: pyenv's, found
under ``$(pyenv root)/versions/*/bin/python3.X`` (a test skips, with the
reason, where one is missing)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest


def pyenv_root() -> str | None:
    root = os.environ.get("PYENV_ROOT")
    if root:
        return root
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    proc = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or None


def pyenv_python(version: str) -> str:
    """The path of pyenv's python<version>, or a skip saying why not."""
    root = pyenv_root()
    if root is None:
        pytest.skip(f"needs Python {version} from pyenv (no pyenv here)")
    found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin",
                                          f"python{version}")))
    if not found:
        pytest.skip(f"needs Python {version} under {root}/versions")
    return found[-1]
