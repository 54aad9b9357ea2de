#!/usr/bin/env bash
# Put the runner's clone at exactly COMMIT, with a clean tree.
#
# usage: test_runner_script.sh REPO COMMIT
# stdout: ci-meta<TAB>commit<TAB>author<TAB>commit time<TAB>subject
# exit:   0 on success; non-zero with the reason on stderr
set -euo pipefail

repo=${1:?usage: test_runner_script.sh REPO COMMIT}
commit=${2:?usage: test_runner_script.sh REPO COMMIT}

if [[ ! $commit =~ ^[0-9a-f]{4,64}$ ]]; then
    echo "invalid commit id: $commit" >&2
    exit 2
fi
cd -- "$repo"

# Fetch only when the commit is not here yet: one fetch brings a whole
# burst of commits (and a prefetch, see dispatcher.py --prefetch-runners,
# brings a pushed one early), so most checkouts need no network at all.
# --force alone resets index and tree to the commit (no separate reset
# --hard): each git process costs CPU that the tests of other runners share,
# and time on the way from a push to its verdict.
checkout() { git checkout --quiet --force --detach "$commit"; }
if ! checkout 2>/dev/null; then
    git fetch --quiet --prune origin
    if ! checkout 2>/dev/null; then
        # Not on any branch any more (force-pushed away): ask for it by id.
        git fetch --quiet origin "$commit" 2>/dev/null || true
        if ! git cat-file -e "${commit}^{commit}" 2>/dev/null; then
            echo "commit $commit not found in $repo or its origin" >&2
            exit 3
        fi
        checkout
    fi
fi
# The commit's id and metadata for the result header, tab separated, with
# a marker the runner looks for (the subject is one line by definition);
# read beside the clean, which only touches the working tree.
git log -1 --format='ci-meta%x09%H%x09%an <%ae>%x09%cI%x09%s' HEAD &
meta=$!
# -ff also removes nested repositories; -x removes ignored build debris.
git clean --quiet -ffdx
wait "$meta"
