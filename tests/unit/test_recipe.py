"""The recipe in .ci.ini as pure functions: what it sets, how the runner's
limits cap it, and that every malformed file is a RecipeError naming the
line or key, never another exception and never a silent default."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ci.runner import recipe
from ci.runner.recipe import Limits, RecipeError

LIMITS = Limits(setup=("make", "deps"), test=("run-tests",), timeout=600, setup_timeout=900)


def test_no_file_means_the_runner_flags():
    plan = recipe.resolve(None, LIMITS)
    assert (plan.setup, plan.test, plan.timeout, plan.setup_timeout) == \
        (("make", "deps"), ("run-tests",), 600, 900)
    assert plan.env_files == recipe.DEFAULT_ENV_FILES and not plan.from_file


def test_a_full_recipe_overrides_the_flags():
    plan = recipe.resolve(
        "[ci]\n"
        "setup = python -m pip install -e '.[test]'  # comments end a command\n"
        "test = python -m pytest -q tests\n"
        "timeout = 300\n"
        "setup_timeout = 120.5\n"
        "env_files = pyproject.toml requirements-test.txt\n", LIMITS)
    assert plan.setup == ("python", "-m", "pip", "install", "-e", ".[test]")
    assert plan.test == ("python", "-m", "pytest", "-q", "tests")
    assert (plan.timeout, plan.setup_timeout) == (300, 120.5)
    assert plan.env_files == ("pyproject.toml", "requirements-test.txt")
    assert plan.notes == ()


def test_an_empty_setup_turns_the_runners_off_and_keys_are_case_blind():
    plan = recipe.resolve("[ci]\nSETUP =\n", LIMITS)
    assert plan.setup is None and plan.test == ("run-tests",)


def test_timeouts_are_capped_by_the_runner():
    # Without --max-timeout a recipe may only lower the runner's limits.
    plan = recipe.resolve("[ci]\ntimeout = 5000\nsetup_timeout = 10\n", LIMITS)
    assert (plan.timeout, plan.setup_timeout) == (600, 10)
    assert plan.notes == ("timeout 5000s in .ci.ini capped at 600s by the runner's --timeout",)
    # With it, up to that and no further.
    capped = Limits(timeout=600, setup_timeout=900, max_timeout=1800)
    plan = recipe.resolve("[ci]\ntimeout = 1200\nsetup_timeout = 99999\n", capped)
    assert (plan.timeout, plan.setup_timeout) == (1200, 1800)
    assert "--max-timeout" in plan.notes[0]


@pytest.mark.parametrize("text, expected", [
    ("setup = x\n", "line 1: expected the [ci] section header"),
    ("[ci]\ntest = pytest\nnonsense here\n", "line 3: cannot parse 'nonsense here'"),
    ("[ci]\ntest = a\ntest = b\n", "line 3: key 'test' appears twice"),
    ("[ci]\n[ci]\n", "line 2: section [ci] appears twice"),
    ("[ci]\ntest = a\nscript = rm -rf /\n", "line 3: unknown key 'script'"),
    ("[ci]\n\n[tox]\nenvlist = py3\n", "line 3: unknown section [tox]"),
    ("[DEFAULT]\ntest = a\n", "unknown section [DEFAULT]"),
    ("# nothing\n", "has no [ci] section"),
    ("[ci]\ntest = pytest 'unclosed\n", "line 2: key 'test': No closing quotation"),
    ("[ci]\ntest =\n", "line 2: key 'test' is empty"),
    ("[ci]\n\ntimeout = soon\n", "line 3: key 'timeout' must be a positive number"),
    ("[ci]\nsetup_timeout = -1\n", "line 2: key 'setup_timeout' must be a positive"),
    ("[ci]\ntimeout = nan\n", "key 'timeout' must be a positive"),
    ("[ci]\nenv_files = ../../etc/passwd\n", "line 2: key 'env_files'"),
    ("[ci]\nenv_files = /etc/passwd\n", "must be a path inside the repository"),
    ("[ci]\nenv_files = " + "*/" * 32 + "x\n", "has more than 32 parts"),
    ("[ci]\nenv_files = " + "x" * 501 + "\n", "or 500 characters"),
    ("[ci]\ntest = " + "x" * 70000 + "\n", "larger than"),
])
def test_malformed_recipes_name_the_line_or_key(text, expected):
    with pytest.raises(RecipeError) as info:
        recipe.resolve(text, LIMITS)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("[]ci=:; #\n\t\r'\"%$\\{}xtesupimo_0123456789.-"),
               max_size=120))
def test_any_text_gives_a_recipe_or_a_recipe_error(text):
    try:
        plan = recipe.resolve(text, LIMITS)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert plan.timeout <= LIMITS.timeout and plan.setup_timeout <= LIMITS.setup_timeout
