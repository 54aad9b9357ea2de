"""Whose rules judge a run: a merge commit tested "as merged" into its
target (issue 22) is judged by the TARGET's quarantine list, not by the
one its own tree carries, so a branch cannot land red by quarantining its
own failures.  The dispatcher names that commit in the job (``rules``,
ci/jobspec.py); the runner reads ``<rules>:.ci.ini`` from its repository
with ``git cat-file`` (the checkout fetched the merge, whose first parent
it is) and uses that recipe's ``quarantine`` only.

When it cannot be read (not there, not UTF-8, a recipe that does not
parse), the quarantine is EMPTY, never the commit's own, and the output
says so: failing safe means failing red.
"""

from __future__ import annotations

import logging
import os

from ci.git import GitError, TooLarge, read_blobs, run_git
from ci.runner import recipe
from ci.wire import one_line

log = logging.getLogger(__name__)


def quarantine_of(text: str | None, limits: recipe.Limits) -> tuple[str, ...]:
    """The quarantine list of a recipe's text (None: no ``.ci.ini``, so
    none); RecipeError if the recipe cannot be used."""
    return recipe.resolve(text, limits).quarantine if text is not None else ()


def target_quarantine(repo: str, rules: str, limits: recipe.Limits,
                      env: dict | None = None) -> tuple[tuple[str, ...], str]:
    """(the quarantine list of ``<rules>:.ci.ini``, the ``[ci]`` line that
    says whose it is, or why it is empty).  ``env``: the runner's git
    environment (with --test-user, its private repository)."""
    env = dict(os.environ if env is None else env, GIT_NO_REPLACE_OBJECTS="1")
    short = rules[:12]
    try:
        run_git(repo, "cat-file", "-e", f"{rules}^{{commit}}", env=env, timeout=60)
        data = read_blobs(repo, [f"{rules}:{recipe.RECIPE_FILE}"],
                          max_size=recipe.MAX_RECIPE_BYTES, timeout=60,
                          env=env)[f"{rules}:{recipe.RECIPE_FILE}"]
        if isinstance(data, TooLarge):
            raise recipe.RecipeError(recipe.TOO_LARGE)
        text = None if data is None else data.decode("utf-8")
        quarantine = quarantine_of(text, limits)
    except (GitError, OSError, ValueError, recipe.RecipeError) as exc:
        why = one_line(str(exc), 300)
        log.warning("cannot read the quarantine of %s: %s", short, why)
        return (), (f"[ci] quarantine: the target's rules ({short}:{recipe.RECIPE_FILE}) "
                    f"cannot be read ({why}): no test is quarantined\n")
    return quarantine, (f"[ci] quarantine: judged by the target's rules ({short}:"
                        f"{recipe.RECIPE_FILE}), {len(quarantine)} entries; this commit's "
                        "own quarantine list is not used\n")
