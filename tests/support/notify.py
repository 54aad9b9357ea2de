"""Shared by the notification tests: commit ids, one branch's chain of
results, the journal records a decider makes of them, and a notify command
that records what it is given."""

from __future__ import annotations

import hashlib
import json

from support.cluster import PY

from ci.notify.decider import NOTIFY_ON, PENDING, UNKNOWN, Decider, Result
from ci.notify.events import build_event


def cid(n) -> str:
    return hashlib.sha1(str(n).encode()).hexdigest()


def chain(verdicts, branch="main", first_previous=None):
    """Results of one branch, oldest first, each naming the one before."""
    results, previous = [], first_previous
    for n, verdict in enumerate(verdicts):
        commit = cid(f"{branch}-{n}")
        results.append(Result(commit, branch, previous, verdict, {"tests": "3"}))
        previous = commit
    return results


def pending_lookup(results):
    """Commits of the chain not given yet are pending; anything else unknown."""
    known = {r.commit for r in results}
    return lambda commit: PENDING if commit in known else UNKNOWN


def decision_records(results, kinds="all"):
    decider = Decider(NOTIFY_ON[kinds])
    records = []
    for d in decider.add(results, pending_lookup(results)):
        event = build_event(d, "/r", None, ["command", "webhook:x"]) \
            if d.announce else None
        records.append({"j": d.result.commit, "v": d.result.verdict, "n": d.n, "e": event})
    return records


RECORDER = """import json, os, sys
record = {k: v for k, v in os.environ.items() if k.startswith("CI_")}
record["env_keys"] = sorted(os.environ)
record["stdin"] = sys.stdin.read()
with open(sys.argv[1], "a") as handle:
    handle.write(json.dumps(record) + "\\n")
"""


def recorder(tmp_path) -> tuple[str, str]:
    script, out = tmp_path / "record.py", tmp_path / "recorded.jsonl"
    script.write_text(RECORDER)
    return f"{PY} {script} {out}", str(out)


def recorded(path) -> list[dict]:
    """Each complete line (one still being written is not yet recorded)."""
    try:
        with open(path) as handle:
            return [json.loads(line) for line in handle if line.endswith("\n")]
    except FileNotFoundError:
        return []
