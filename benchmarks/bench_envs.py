"""What an environment costs per commit.

A real project (a git repository whose tests import a third-party package,
installed from a local wheel folder: no network) is run by the runner's own
``execute`` step (checkout, recipe, environment, tests), in turns:

* **reused**: ``.ci.ini`` has a setup command; its environment is already
  built, so each run only finds it again;
* **no setup**: the same commit with the recipe ignored and no setup command;
  the dependency is put on ``PYTHONPATH`` instead, so the same tests run
  with the runner's own Python.

The difference of the medians is the per-commit overhead of a reused
environment (target: within 0.1 s).  The first build's time is measured on
fresh environment folders.

usage: python benchmarks/bench_envs.py [--runs 20] [--builds 3] [--strict] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from ci.runner import environments  # noqa: E402
from ci.runner import recipe  # noqa: E402
from ci.runner.pipeline import Settings, execute  # noqa: E402
from ci.runner.slot import ProcessSlot  # noqa: E402
from support.wheels import make_wheel  # noqa: E402

TARGET = 0.1
TESTS = '''import unittest

import tinydep


class TestWithDependency(unittest.TestCase):
''' + "".join(f'''
    def test_{i}(self):
        self.assertEqual(tinydep.double({i}), {2 * i})
''' for i in range(20))


def git(repo: str, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid")
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def make_project(tmp: str) -> tuple[str, str, str, str]:
    """(runner clone, commit, wheel folder, unpacked dependency)."""
    wheels = os.path.join(tmp, "wheels")
    wheel = make_wheel(wheels, "tinydep", "1.0", "def double(x):\n    return 2 * x\n")
    site = os.path.join(tmp, "site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    upstream = os.path.join(tmp, "upstream")
    os.makedirs(os.path.join(upstream, "tests"))
    files = {
        "tests/__init__.py": "",
        "tests/test_dep.py": TESTS,
        "requirements-test.txt": "tinydep==1.0\n",
        ".ci.ini": f"[ci]\nsetup = python -m pip install --no-index --find-links {wheels} "
                   "-r requirements-test.txt\n",
    }
    for name, text in files.items():
        with open(os.path.join(upstream, name), "w") as handle:
            handle.write(text)
    git(upstream, "init", "-q", "-b", "main")
    git(upstream, "add", "-A")
    git(upstream, "commit", "-q", "-m", "project")
    clone = os.path.join(tmp, "clone")
    subprocess.run(["git", "clone", "-q", upstream, clone], check=True)
    return clone, git(upstream, "rev-parse", "HEAD"), wheels, site


def run(clone: str, commit: str, preparer, slot) -> tuple[float, dict]:
    started = time.perf_counter()
    outcome = execute(Settings(clone, slot, preparer, 1 << 24), commit)
    elapsed = time.perf_counter() - started
    fields = dict(outcome.header)
    if fields["verdict"] != "passed":
        sys.exit(f"unexpected verdict {fields}:\n"
                 f"{outcome.output.decode(errors='replace')[-3000:]}")
    return elapsed, fields


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each kind (default 20)")
    parser.add_argument("--builds", type=int, default=3,
                        help="first builds timed on fresh folders (default 3)")
    parser.add_argument("--strict", action="store_true", help="exit 3 on a missed target")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-envs-")
    try:
        clone, commit, _, site = make_project(tmp)
        slot = ProcessSlot()
        builds = []
        for i in range(args.builds):
            cache = environments.EnvironmentCache(os.path.join(tmp, f"envs-{i}"))
            _, fields = run(clone, commit, environments.Preparer(recipe.Limits(), cache), slot)
            assert fields["setup"] == "built", fields
            builds.append(float(fields["setup_duration"]))
            cache.close()
        reusing = environments.Preparer(recipe.Limits(), cache)
        plain = environments.Preparer(recipe.Limits(), None, read_recipe=False)
        reused, bare, lookups = [], [], []
        for _ in range(args.runs):
            os.environ.pop("PYTHONPATH", None)
            elapsed, fields = run(clone, commit, reusing, slot)
            assert fields["setup"] == "reused", fields
            reused.append(elapsed)
            lookups.append(float(fields["setup_duration"]))
            os.environ["PYTHONPATH"] = site
            elapsed, fields = run(clone, commit, plain, slot)
            assert fields["setup"] == "none", fields
            bare.append(elapsed)
        os.environ.pop("PYTHONPATH", None)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    overhead = statistics.median(reused) - statistics.median(bare)
    cores = os.cpu_count()
    print(f"per-commit run (checkout + recipe + tests), {cores} cores, {args.runs} runs each:")
    print(f"  no setup command, median        {statistics.median(bare):.3f} s")
    print(f"  reused environment, median      {statistics.median(reused):.3f} s")
    print(f"  overhead of a reused environment {overhead:+.3f} s (target < {TARGET} s)")
    print(f"  finding the environment again (recipe, key, lookup), median "
          f"{statistics.median(lookups) * 1000:.1f} ms")
    print(f"  first build (venv + pip + setup), median of {len(builds)}: "
          f"{statistics.median(builds):.2f} s (min {min(builds):.2f}, max {max(builds):.2f})")
    missed = overhead >= TARGET
    if missed:
        print("  target missed")
    return 3 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
