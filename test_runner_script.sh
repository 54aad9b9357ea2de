#!/usr/bin/env bash
# Put the runner's clone at exactly COMMIT, with a clean tree: cleaned
# before the checkout as well, so nothing a test left is read by it.
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
# A test may have taken its own permissions away from the tree's top.
[[ -w $repo && -x $repo ]] || chmod u+rwx -- "$repo"
cd -- "$repo"

# A git the runner killed mid-way (a stop, --checkout-timeout, a SIGKILLed
# runner's watchdog) leaves its lock files, and every later git here fails
# on them: each commit this runner took after that was 'error'.  The runner
# runs one git at a time in its clone, so a lock now is a dead git's.
git_dir=$(git rev-parse --git-dir 2>/dev/null) || git_dir=.git
if [[ -d $git_dir ]]; then
    find "$git_dir" -maxdepth 1 -type f -name '*.lock' -delete 2>/dev/null || true
    [[ -d $git_dir/refs ]] && find "$git_dir/refs" -type f -name '*.lock' -delete 2>/dev/null || true
fi

# What the last test left in the tree must be gone BEFORE git checks out
# the next commit, not only after: checkout and reset read the tree's
# .gitattributes for every path the index has none for (an untracked
# "*.py working-tree-encoding=UTF-16" would make git write the next
# commit's files as UTF-16), and git 2.39 has no --attr-source.
fail() { echo "cannot clean the tree of $repo: $1 (a test left it so; see above)" >&2; exit 4; }
# 1. Every folder made enterable and writable by us, or its removal below
#    fails (a test may chmod 000 a folder; as root this changes nothing
#    that matters), and every .git below the top removed: git never looks
#    into a folder holding one (its clean does not remove one inside a
#    tracked folder), nor at any name ".git".  The top one is the
#    repository (or, with --test-user, the pointer the runner rewrites).
#    A folder we cannot fix is left for the clean to fail on.
#    -execdir: a command is given a name in the folder it runs in, not a
#    path, which a test's folders nested past PATH_MAX would make too long
#    (find itself walks any depth); it refuses a PATH with a relative
#    folder, so it gets ours without them.
IFS=: read -ra path_dirs <<< "$PATH"
safe_path=
for dir in "${path_dirs[@]}"; do [[ $dir == /* ]] && safe_path+=${safe_path:+:}$dir; done
PATH=$safe_path find . -path ./.git -prune -o \( ! -type d -o -perm -u=rwx -o \
    -execdir chmod u+rwx -- {} \; -o -prune \) -name .git -prune -execdir rm -rf -- {} + \
    || fail "the pass over its folders failed"
# 2. Untracked and ignored files (-x: no .gitignore is read), nested
#    repositories (-ff).  Git cannot open a folder whose path is longer
#    than PATH_MAX; it still names the untracked folder above it, which rm
#    removes at any depth, and then the clean again.
if ! git clean --quiet -ffdx 2>/dev/null; then
    git ls-files -z --others --directory 2>/dev/null | xargs -0 -r rm -rf -- \
        || fail "git clean failed, and so did removing what it left"
    git clean --quiet -ffdx || fail "git clean failed"
fi
# 3. Tracked files back to HEAD before moving: a tracked file a test made
#    a folder is a name clean leaves alone (it is in the index), and a
#    .gitattributes inside it would apply to the next commit's files
#    under that name; reset removes the folder.  Only then is the tree
#    exactly HEAD, with nothing of the test's left for checkout to read.
git reset --quiet --hard || fail "git reset --hard failed"

# Fetch only when the commit is not here yet: one fetch brings a whole
# burst of commits (and a prefetch, see dispatcher.py --prefetch-runners,
# brings a pushed one early), so most checkouts need no network at all.
# --force: index and tree from HEAD's to the commit's (the tree is HEAD's
# now, so only what differs is written).
checkout() { git checkout --quiet --force --detach "$commit"; }
# Besides the branches (the clone's own refspec), the upstream's refs/ci/*:
# the merge commits tested "as merged" are published as
# refs/ci/merges/<commit> and reachable from nothing else (issue 22).
ci_refs=(-c 'remote.origin.fetch=+refs/ci/*:refs/ci/*')
if ! checkout 2>/dev/null; then
    git "${ci_refs[@]}" fetch --quiet --prune origin
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
# a marker the runner looks for (the subject is one line by definition).
# No clean after the checkout: from a tree that was exactly HEAD, checkout
# leaves nothing that is not the commit's.
git log -1 --format='ci-meta%x09%H%x09%an <%ae>%x09%cI%x09%s' HEAD
