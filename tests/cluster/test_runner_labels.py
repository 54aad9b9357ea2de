"""A runner's labels and interpreters, as a real dispatcher sees them:
``register`` carries ``--label`` names and one ``python3.X`` per
interpreter (and ``exclusive``), shown in ``state``; a ``runtest`` for an
interpreter the runner lacks is an error reply, never a verdict."""

from __future__ import annotations

import json
import sys

import helpers
from support.cluster import wait_until
from support.pythons import pyenv_python

from ci import jobspec

OWN = f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_labels_reach_the_state_and_a_missing_interpreter_is_refused(cluster):
    py313 = pyenv_python("3.13")
    cluster.start_dispatcher()
    runner = cluster.start_runner("--label", "gpu", "--python", f"3.13={py313}",
                                  "--exclusive", "--name", "big")

    def registered():
        state = json.loads(helpers.call(("127.0.0.1", cluster.dispatcher_port), "state",
                                        timeout=5).body)
        return next((r for r in state["runners"] if r.get("name") == "big"), None)
    found = wait_until(registered, 30, what="the runner in the state")
    assert found["labels"] == ["gpu", "python3.13"] and found["exclusive"] is True

    other = "3.9" if OWN != "3.9" else "3.10"
    body = jobspec.encode(jobspec.JobSpec(cell=f"py{other}", python=other))
    reply = helpers.call(("127.0.0.1", runner.port), "runtest", "a" * 40 + " " + "b" * 32,
                         body, timeout=5)
    assert reply.command == "error"
    assert reply.argument == f"this runner has no python{other} (it has: python3.13)"
