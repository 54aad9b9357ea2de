"""Which commits the observer dispatches, from git: a branch's new commits on
its first-parent line oldest first, a new branch's own commits, the heads
the update script lists, and the ``dispatch`` body that carries each
commit's branch and predecessor (the metadata for broke/fixed marks).

Pure of any daemon state: each function is one git question."""

from __future__ import annotations

import logging
from typing import Iterator

from ci import matrix
from ci.git import GitError, TooLarge, read_blobs, run_git
from ci.runner import recipe
from ci.wire import valid_full_commit

log = logging.getLogger(__name__)


def new_commits(repo: str, head: str, last: str | None) -> tuple[list[str], bool]:
    """Commits after ``last`` up to ``head``, oldest first, on the
    first-parent line; (commits, history_rewritten)."""
    if last is None:
        return [head], False
    if last == head:
        return [], False
    # The usual push: ``last`` is on head's first-parent line, which the
    # oldest new commit's first parent shows, so one git process is enough
    # (every process on this path adds to the commit-to-result time).
    try:
        out = run_git(repo, "rev-list", "--first-parent", "--reverse", "--parents",
                              head, f"^{last}")
    except GitError:
        out = ""  # ``last`` is gone: the check below says how
    lines = [line.split() for line in out.splitlines() if line.strip()]
    if lines and lines[0][1:2] == [last]:
        return [line[0] for line in lines], False
    try:
        run_git(repo, "merge-base", "--is-ancestor", last, head)
    except GitError as exc:
        if exc.code in (1, 128):  # not an ancestor, or no longer known at all
            return [head], True
        raise
    out = run_git(repo, "rev-list", "--first-parent", "--reverse", head, f"^{last}")
    return out.split(), False


def parse_heads(text: str, skipped: list[str] | None = None) -> dict[str, str]:
    """``update_repo.sh``'s listing: one ``<full id> <branch>`` per line.
    A branch name that is not printable, or not UTF-8 (decoded with
    replacement characters, two such names could read as one), is left
    out, and named in ``skipped``: it cannot be named in a result safely."""
    heads = {}
    for line in text.splitlines():
        commit, _, branch = line.partition(" ")
        if not valid_full_commit(commit) or not branch:
            continue
        if branch.isprintable() and " " not in branch and "\ufffd" not in branch:
            heads[branch] = commit
        elif skipped is not None:
            skipped.append(branch)
    return heads


def own_commits(repo: str, head: str, others: list[str]) -> list[str]:
    """A new branch's commits that no other watched branch has, oldest
    first, on its first-parent line (for a branch made from main: its own)."""
    out = run_git(repo, "rev-list", "--first-parent", "--reverse", head,
                          *[f"^{other}" for other in others])
    return out.split()


def first_parent(repo: str, commit: str) -> str | None:
    try:
        parent = run_git(repo, "rev-parse", "--verify", "--quiet",
                                 f"{commit}^1").strip()
    except GitError:
        return None  # a root commit
    return parent if valid_full_commit(parent) else None


def dispatch_body(commits: list[str], previous: str | None, branch: str,
                  plans: dict[str, str] | None = None) -> bytes:
    """One ``<commit> <previous|-> <branch>`` line per commit: what the
    dispatcher needs to judge each commit against the one before it on its
    branch (broke / fixed); and for a commit whose recipe has a build
    matrix, its cells (``plan_field``) as a fourth field."""
    lines = []
    for commit in commits:
        extra = (plans or {}).get(commit)
        lines.append(f"{commit} {previous or '-'} {branch}" + (f" {extra}" if extra else ""))
        previous = commit
    return ("\n".join(lines) + "\n").encode()


# A ``dispatch`` body's size at most (the dispatcher's --max-message-size
# is 16 MiB by default): 200 commits of a 256-cell matrix with long labels
# made 17 MiB, refused at every poll, and no branch advanced again.
MAX_DISPATCH_BYTES = 1024 * 1024


def dispatch_batches(commits: list[str], previous: str | None, branch: str,
                     plans: dict[str, str], count: int,
                     limit: int = MAX_DISPATCH_BYTES) -> Iterator[tuple[list[str], bytes]]:
    """(batch, its ``dispatch_body``) in order: at most ``count`` commits
    each, halved until the body fits in ``limit`` bytes (a single commit
    is sent whatever its size: the dispatcher says if it is too large)."""
    start = 0
    while start < len(commits):
        size = count
        while True:
            batch = commits[start:start + size]
            body = dispatch_body(batch, previous, branch, plans)
            if len(body) <= limit or size == 1:
                break
            size = max(1, size // 2)
        yield batch, body
        previous = batch[-1]
        start += len(batch)


def plan_fields(repo: str, commits: list[str]) -> dict[str, str]:
    """``plan_field`` of each commit, their recipes read by two git processes
    (``git cat-file`` of ``<commit>:.ci.ini``, none past MAX_RECIPE_BYTES),
    and each recipe expanded once: commits that share a blob share its
    plan (keyed by the content, which the blob's id is the hash of), as a
    branch's commits mostly do."""
    blobs = read_blobs(repo, [f"{c}:{recipe.RECIPE_FILE}" for c in commits],
                       max_size=recipe.MAX_RECIPE_BYTES)
    plans: dict[bytes | TooLarge | None, str] = {}
    found = {}
    for commit in commits:
        blob = blobs[f"{commit}:{recipe.RECIPE_FILE}"]
        if blob not in plans:
            plans[blob] = plan_field(blob)
        found[commit] = plans[blob]
    return found


def merge_plan(merge_repo, commit: str) -> str:
    """``plan_field`` of a merge the observer made (its merged results and
    the land queue's), read from its private merge repository: a merge
    is tested with ITS recipe's matrix and labels, as any commit is."""
    return plan_field(merge_repo.read_blob(commit, recipe.RECIPE_FILE,
                                           recipe.MAX_RECIPE_BYTES))


def plan_field(blob: bytes | TooLarge | None) -> str:
    """The dispatch line's matrix field for a commit whose ``.ci.ini`` is
    ``blob`` (None: it has none): "" without a matrix, its cells, or the
    reason its matrix cannot be used (the dispatcher writes that as the
    commit's ``error`` verdict).  A recipe that does not parse at all is
    left to the runner, which reports it as it always has; the dispatcher
    applies its --max-cells.  A recipe too large to read is an error here:
    its matrix is unknown, and one plain job in its place could pass a
    commit on cells it never ran in."""
    if blob is None:
        return ""
    if isinstance(blob, TooLarge):
        return matrix.encode_plan(matrix.Plan((), recipe.TOO_LARGE))
    text = blob.decode("utf-8", "surrogateescape")
    try:
        cells = matrix.expand(text, max_cells=matrix.MAX_CELLS_LIMIT)
    except recipe.RecipeError:
        return ""
    except matrix.MatrixError as exc:
        return matrix.encode_plan(matrix.Plan((), f"{recipe.RECIPE_FILE}: {exc}"))
    return matrix.encode_plan(matrix.Plan(tuple(cells)))


# update_repo.sh's listing read at most (a line per branch: 64 MiB is some
# 600,000); a longer one is an error, never cut (cut at 2 MiB, 20,000 long
# branch names hid "main", which sorts after them).
MAX_LISTING = 64 * 1024 * 1024


# Dispatched commits remembered, to tell whether a new branch's fork point
# was tested (and so can be named as its first commit's previous one).
RECENT_LIMIT = 2000
