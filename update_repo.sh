#!/usr/bin/env bash
# Bring the observer's clone up to date and print the newest commit of BRANCH.
#
# usage: update_repo.sh REPO BRANCH
# stdout: the full id of BRANCH's head after fetching (one line)
# exit:   0 on success; non-zero with the reason on stderr
set -euo pipefail

repo=${1:?usage: update_repo.sh REPO BRANCH}
branch=${2:?usage: update_repo.sh REPO BRANCH}

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
