"""Branches tested as merged results (``--merge-into PATTERN=TARGET``):
for each new head of such a branch, ONE merge into the target's current
head (not one per intermediate commit), published under
``refs/ci/merges/<merge>`` before it is dispatched (a runner must be able
to fetch it), and the dispatch line's fields that say what it is
(ci/mergeinfo.py).  A conflict is dispatched under its own id
(``mergeinfo.conflict_id``) with the conflicting paths: the dispatcher
writes its verdict without a run.

Published refs are bounded: each branch keeps its newest ``keep`` merges
published; older ones (and those of a branch that is gone) are deleted
in batches, at most UNPUBLISH_PER_POLL refs a poll."""

from __future__ import annotations

import dataclasses
import logging

from ci.git import GitError
from ci.mergeinfo import MergeInfo, conflict_id, encode_conflicts, encode_merge_field
from ci.merging import Conflict, Merged, MergeRepo
from ci.merging.rules import MergeRule, target_of
from ci.observer.commits import merge_plan
from ci.observer.state import ObserverState

log = logging.getLogger(__name__)

DEFAULT_KEEP = 3
UNPUBLISH_PER_POLL = 100


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What to dispatch for a branch's new head: the commit (the merge, or
    the conflict's own id) and the line's extra fields."""
    commit: str
    fields: str
    result: Merged | Conflict


class BranchMerges:
    def __init__(self, repo: MergeRepo, rules: list[MergeRule], state: ObserverState,
                 keep: int = DEFAULT_KEEP):
        self.repo = repo
        self.rules = rules
        self.state = state
        self.keep = keep
        # The last merge made per branch, reused while its head and target
        # commit are the same (a dispatcher that is away does not make the
        # observer merge and publish again on every poll).
        self._made: dict[str, tuple[str, str, Prepared]] = {}

    def target_of(self, branch: str) -> str | None:
        return target_of(self.rules, branch)

    def already_merged(self, head: str, target_commit: str) -> bool:
        """Nothing of the branch's own to test: its head is in the target
        (asked of the merge repository, which sees the clone's commits)."""
        return self.repo.is_ancestor(head, target_commit)

    def prepare(self, branch: str, head: str, target: str, target_commit: str) -> Prepared:
        """Merge, publish (a clean merge), and say how to dispatch it.
        GitError if git fails (the branch is retried on the next poll, with
        the same merge if it was made)."""
        made = self._made.get(branch)
        if made and made[:2] == (head, target_commit):
            prepared = made[2]
        else:
            prepared = self._merge(branch, head, target, target_commit)
            self._made[branch] = (head, target_commit, prepared)
        if isinstance(prepared.result, Merged) \
                and prepared.commit not in self.state.published_of(branch):
            self.repo.publish([prepared.commit])
            # Kept before it is dispatched: a merge published and never
            # dispatched (a crash) is still unpublished in its turn.
            self.state.add_published(branch, prepared.commit, self.keep)
            log.info("published %s, the merge of %s", prepared.commit[:12], branch)
        return prepared

    def _merge(self, branch: str, head: str, target: str, target_commit: str) -> Prepared:
        info = MergeInfo(head, target_commit, target)
        result = self.repo.merge(target_commit, head, branch, target)
        if isinstance(result, Conflict):
            log.info("branch %s at %s does not merge into %s at %s: %s", branch, head[:12],
                     target, target_commit[:12], result.describe())
            return Prepared(conflict_id(info), f"{encode_merge_field(info)} "
                                  f"{encode_conflicts(result.paths)}", result)
        log.info("branch %s at %s merged into %s at %s: %s", branch, head[:12], target,
                 target_commit[:12], result.commit[:12])
        plan = merge_plan(self.repo, result.commit)
        return Prepared(result.commit, " ".join(
            f for f in (encode_merge_field(info), plan) if f), result)

    def forget(self, branch: str) -> None:
        self._made.pop(branch, None)

    def retire(self) -> None:
        """Delete a batch of published merges no longer kept (one push)."""
        batch = self.state.retired_batch(UNPUBLISH_PER_POLL)
        if not batch:
            return
        try:
            self.repo.unpublish(batch)
        except GitError as exc:
            log.warning("could not unpublish %d old merge(s), trying again next poll: %s",
                        len(batch), exc)
            return
        self.state.drop_retired(batch)
        log.info("unpublished %d old merge(s)", len(batch))
