"""Flaky tests caught on the commit, and quarantine: what a run's per-test
records become before they are judged.  Pure functions over records.

* **Reruns** (recipe key ``rerun_failures = N``): the tests that failed are
  run again, only they, up to N times, in the same checkout and
  environment (the pipeline runs them; ``command_line.rerun`` builds the
  command).  A test that failed and then passed is **flaky**: its records
  become one ``flaky`` record that keeps the first failure's message, and
  it no longer counts as a failure.  A test that failed every time keeps
  the records of its first run.
* **Quarantine** (recipe key ``quarantine = ids or patterns``): matching
  records are marked; they still run and are recorded, but a failure of
  theirs does not decide the verdict (``verdict.judge_records``).

A test is ``(classname, name)``: a unittest subtest's failure reruns its
whole test.  Records that name no test that can be run by itself
(fixtures such as ``setUpClass``, modules that failed to import) are
never rerun: their failures stand.
"""

from __future__ import annotations

import dataclasses

from ci import results
from ci.results import FAILING, FLAKY, PASSED, TestRecord
from ci.runner import recipe

# More failing tests than this are not rerun: a commit that broke that
# many is broken, and rerunning them would only double its time.
MAX_RERUN_TESTS = 100
# Classnames of the records unittest makes for what it could not load.
UNLOADABLE = ("unittest.loader.", "unittest.suite._ErrorHolder")

Key = tuple[str, str]


def key_of(record: TestRecord) -> Key:
    return record.classname, record.name


def rerunnable(record: TestRecord) -> bool:
    """A failing record of a test that can be named and run again."""
    return (record.outcome in FAILING and not record.quarantined
            and record.kind in (results.TEST, results.SUBTEST) and record.name != ""
            and not record.classname.startswith(UNLOADABLE))


def failing_keys(records: list[TestRecord]) -> list[Key]:
    """The tests to run again, in the order they first failed."""
    return list(dict.fromkeys(key_of(r) for r in records if rerunnable(r)))


def passed_keys(rerun: list[TestRecord], keys: list[Key]) -> set[Key]:
    """Those of ``keys`` that a rerun's records show passing: recorded,
    and no record of theirs failing (a subtest failing fails its test)."""
    wanted = set(keys)
    seen: set[Key] = set()
    failed: set[Key] = set()
    for record in rerun:
        key = key_of(record)
        if key in wanted:
            seen.add(key)
            if record.outcome not in (PASSED, results.XFAIL):
                failed.add(key)
    return seen - failed


def mark_flaky(records: list[TestRecord], flaky: set[Key],
               rerun: list[TestRecord]) -> list[TestRecord]:
    """``records`` with each test of ``flaky`` as one ``flaky`` record in
    the place of its first: the first failure's message and traceback
    (what a reader needs to fix it), the passing run's duration."""
    durations: dict[Key, float] = {}
    for record in rerun:
        if key_of(record) in flaky:
            durations[key_of(record)] = durations.get(key_of(record), 0.0) + record.duration
    out: list[TestRecord] = []
    done: set[Key] = set()
    for record in records:
        key = key_of(record)
        if key not in flaky:
            out.append(record)
        elif key not in done:
            done.add(key)
            first = next(r for r in records if key_of(r) == key and r.outcome in FAILING)
            out.append(dataclasses.replace(
                first, outcome=FLAKY, kind=results.TEST, subtest="",
                duration=round(durations.get(key, first.duration), 3)))
    return out


@dataclasses.dataclass
class Reruns:
    """The reruns of one run: ``records`` as they stand after each round,
    the tests still failing, and a line per round for the output."""
    records: list[TestRecord]
    rounds: int
    todo: list[Key] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, records: list[TestRecord], rounds: int) -> Reruns:
        keys = failing_keys(records)
        plan = cls(list(records), rounds, keys)
        if len(keys) > MAX_RERUN_TESTS and rounds:
            plan.notes.append(f"{len(keys)} tests failed: more than {MAX_RERUN_TESTS}, "
                              "none is run again")
            plan.todo = []
        return plan

    @property
    def wanted(self) -> bool:
        return bool(self.todo) and self.rounds > 0

    def took(self, rerun: list[TestRecord] | None, why: str = "") -> None:
        """One round's records (None: it gave none; ``why`` says why)."""
        self.rounds -= 1
        tried = len(self.todo)
        if rerun is None:
            self.notes.append(f"rerun of {tried} failing tests gave no results ({why}); "
                              "their failures stand")
            self.rounds = 0
            return
        now_passing = passed_keys(rerun, self.todo)
        self.records = mark_flaky(self.records, now_passing, rerun)
        self.todo = [key for key in self.todo if key not in now_passing]
        self.notes.append(f"rerun of {tried} failing tests: {len(now_passing)} passed "
                          f"(flaky), {len(self.todo)} failed again")


def quarantine(records: list[TestRecord],
               patterns: tuple[str, ...]) -> tuple[list[TestRecord], list[str]]:
    """(records with the quarantined marked, the entries that matched no
    record).  A record matches by its id or by its test's id (a
    quarantined test's subtests are too)."""
    if not patterns:
        return records, []
    matcher = recipe.QuarantineMatcher(patterns)
    used: set[str] = set()
    out = []
    for record in records:
        base = f"{record.classname}.{record.name}" if record.classname else record.name
        found = matcher.matches((record.id, base))
        if found:
            used.update(found)
            record = dataclasses.replace(record, quarantined=True)
        out.append(record)
    return out, [p for p in patterns if p not in used]
