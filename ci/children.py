"""Starting one of our own modules as a child process
(``python -m ci.<...>``): the dispatcher's test history writer and the
pruner's worker.  The child must import ``ci`` from this checkout whatever
the dispatcher's working folder, so the checkout goes first on its
PYTHONPATH."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``module`` with ``args``
    under this interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", module, *args], env
