#!/usr/bin/env bash
# Bring the observer's clone up to date and print the newest commit of BRANCH,
# or, without BRANCH, of every branch: one fetch serves them all.
#
# usage: update_repo.sh REPO [BRANCH]
# stdout: the full id of BRANCH's head after fetching (one line); without
#         BRANCH, one "<full id> <branch>" line per branch of the upstream
# exit:   0 on success; non-zero with the reason on stderr
set -euo pipefail

repo=${1:?usage: update_repo.sh REPO [BRANCH]}
if [[ $# -lt 2 ]]; then
    cd -- "$repo"
    if git remote get-url origin >/dev/null 2>&1; then
        git fetch --quiet --prune origin
        prefix=refs/remotes/origin strip=3
    else
        prefix=refs/heads strip=2
    fi
    # Symbolic refs (origin/HEAD) print an empty line and are skipped by the caller.
    exec git for-each-ref \
        --format="%(if)%(symref)%(then)%(else)%(objectname) %(refname:lstrip=$strip)%(end)" \
        "$prefix"
fi
branch=$2

# A branch name goes to git as one argument after validation, never to a shell.
if ! git check-ref-format --branch "$branch" >/dev/null 2>&1; then
    echo "invalid branch name: $branch" >&2
    exit 2
fi
cd -- "$repo"

if git remote get-url origin >/dev/null 2>&1; then
    # --prune so a deleted or force-pushed branch is seen as it now is.
    git fetch --quiet --prune origin
    ref="refs/remotes/origin/$branch"
else
    # Watching the upstream itself: its branches are the truth.
    ref="refs/heads/$branch"
fi
git rev-parse --verify --quiet "${ref}^{commit}" || {
    echo "branch $branch not found in $repo" >&2
    exit 3
}
