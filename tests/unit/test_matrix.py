"""The build matrix read from a recipe (ci/matrix.py): the cells, their
names, python and axes, exclusions and inclusions, labels; every odd
recipe a MatrixError with the reason (it becomes the commit's ``error``
verdict), never another exception and never a silently lost cell."""

from __future__ import annotations

import itertools
import json
import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.cluster import Upstream
from support.procs import run_measured

from ci import matrix
from ci.matrix import Cell, MatrixError
from ci.runner import recipe

# The repository's root, where a child interpreter finds the ci package.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL = ("[ci]\n"
        "test = python -m pytest\n"
        "matrix_django = 4.2 5.1\n"
        "matrix_python = 3.9 3.12 3.13\n"
        "matrix_exclude = python=3.9 django=5.1 ; python=3.13 django=4.2\n"
        "matrix_include = python=3.12 django=main\n"
        "labels = gpu linux\n"
        "labels_python_3.13 = big\n")


def names(cells):
    return [c.name for c in cells]


def test_a_recipe_without_a_matrix_is_one_unnamed_cell():
    assert matrix.expand("[ci]\ntest = python -m pytest\n") == [Cell("")]
    assert matrix.expand({}) == [matrix.SINGLE]
    only_labels = matrix.expand("[ci]\nlabels = gpu\n")
    assert only_labels == [Cell("", labels=frozenset({"gpu"}))]
    assert only_labels[0].needs == {"gpu"} and only_labels[0].env == {}


def test_the_full_example():
    cells = matrix.expand(FULL)
    assert names(cells) == ["py3.9-django4.2", "py3.12-django4.2", "py3.12-django5.1",
                            "py3.13-django5.1", "py3.12-djangomain"]
    by_name = {c.name: c for c in cells}
    big = by_name["py3.13-django5.1"]
    assert (big.python, big.axes, big.env) == ("3.13", (("django", "5.1"),),
                                               {"CI_DJANGO": "5.1"})
    assert big.labels == {"gpu", "linux", "big"}
    assert big.needs == {"gpu", "linux", "big", "python3.13"}
    assert by_name["py3.9-django4.2"].needs == {"gpu", "linux", "python3.9"}


def test_python_is_first_whatever_the_file_order_and_other_axes_keep_theirs():
    cells = matrix.expand("[ci]\nmatrix_db = pg sqlite\nmatrix_python = 3.12\n"
                          "matrix_arch = x86_64\n")
    assert names(cells) == ["py3.12-dbpg-archx86_64", "py3.12-dbsqlite-archx86_64"]
    assert cells[0].env == {"CI_DB": "pg", "CI_ARCH": "x86_64"}


def test_a_matrix_without_python_uses_the_runners_interpreter():
    cells = matrix.expand("[ci]\nmatrix_extra = a b\n")
    assert [(c.name, c.python, c.needs) for c in cells] == [
        ("extraa", None, frozenset()), ("extrab", None, frozenset())]


def test_partial_exclusions_and_include_only_matrices():
    cells = matrix.expand("[ci]\nmatrix_python = 3.9 3.12\nmatrix_db = pg my lite\n"
                          "matrix_exclude = db=lite; python=3.9 db=my\n")
    assert names(cells) == ["py3.9-dbpg", "py3.12-dbpg", "py3.12-dbmy"]
    only = matrix.expand("[ci]\nmatrix_include = python=3.11 ; python=3.12 tz=utc\n")
    assert names(only) == ["py3.11", "py3.12-tzutc"]
    again = matrix.expand("[ci]\nmatrix_python = 3.9\nmatrix_include = python=3.9\n")
    assert names(again) == ["py3.9"]   # an inclusion already in the product adds nothing


@pytest.mark.parametrize("text, reason", [
    ("[ci]\nmatrix_python =\n", "matrix_python: the axis is empty"),
    ("[ci]\nmatrix_python = 3.9\nmatrix_python = 3.12\n", "appears twice"),
    ("[ci]\nmatrix_Python = 3.9\nmatrix_python = 3.12\n", "appears twice"),
    ("[ci]\nmatrix_python = 3.9 3.9\n", "listed twice"),
    ("[ci]\nmatrix_python = three\n", "not a version like 3.12"),
    ("[ci]\nmatrix_db = pg/x\n", "must be 1 to 64"),
    ("[ci]\nmatrix_9db = pg\n", "axis names"),
    ("[ci]\nlabels = gpu lin$ux\n", "label 'lin$ux'"),
    ("[ci]\nmatrix_python = 3.9\nlabels_python_3.13 = big\n", "no axis value"),
    ("[ci]\nmatrix_python = 3.9\nlabels_python_3.9 = b/g\n", "labels_python_3.9: label"),
    ("[ci]\nlabels_python_3.9 = big\n", "need a matrix_<axis>"),
    ("[ci]\nmatrix_exclude = python=3.9\n", "need a matrix_<axis>"),
    ("[ci]\nmatrix_python = 3.9\nmatrix_exclude = python=3.9\n", "every combination"),
    ("[ci]\nmatrix_python = 3.9\nmatrix_exclude = python=3.8\n", "not in the matrix"),
    ("[ci]\nmatrix_python = 3.9\nmatrix_exclude = db=pg\n", "not in the matrix"),
    ("[ci]\nmatrix_python = 3.9\nmatrix_include = python=3.10 python=3.11\n",
     "axis 'python' given twice"),
    ("[ci]\nmatrix_python = 3.9\nmatrix_include = python\n", "is not axis=value"),
    ("[ci]\nmatrix_a = 1-b2 1\nmatrix_b = 3 2-b3\n", "both be named"),
    ("[ci]\nmatrix_x = 1 1.xml\nmatrix_include = x=1.xml\n", "ends in .xml"),
])
def test_bad_matrices_say_why(text, reason):
    # A key given twice is the recipe's own error (configparser finds it).
    error = recipe.RecipeError if reason == "appears twice" else MatrixError
    with pytest.raises(error, match=reason.replace("$", r"\$")):
        matrix.expand(text)


def test_max_cells():
    text = "[ci]\nmatrix_python = 3.9 3.10 3.11 3.12\nmatrix_db = a b c\n"
    assert len(matrix.expand(text, max_cells=12)) == 12
    with pytest.raises(MatrixError, match=r"12 cells, more than the 11 allowed \(--max-cells\)"):
        matrix.expand(text, max_cells=11)
    # The observer applies only the cap no --max-cells can pass: it says so.
    big = "[ci]\nmatrix_a = " + " ".join(map(str, range(20))) + "\nmatrix_b = " + \
        " ".join(map(str, range(13))) + "\n"
    with pytest.raises(MatrixError, match=r"260 cells, more than the 256 allowed \(the most"):
        matrix.expand(big, max_cells=matrix.MAX_CELLS_LIMIT)
    huge = "[ci]\n" + "".join(f"matrix_a{i} = " + " ".join(map(str, range(10))) + "\n"
                              for i in range(5))
    with pytest.raises(MatrixError, match="100000 combinations"):
        matrix.expand(huge)
    assert matrix.DEFAULT_MAX_CELLS == 64


def test_the_runner_lets_the_matrix_keys_pass():
    plan = recipe.resolve(FULL, recipe.Limits())
    assert plan.test == ("python", "-m", "pytest")
    with pytest.raises(recipe.RecipeError, match="unknown key 'matrixx'"):
        recipe.resolve("[ci]\nmatrixx = 1\n", recipe.Limits())


def test_labels_and_axes_parse_and_format():
    assert matrix.parse_labels(" gpu  python3.12 ") == {"gpu", "python3.12"}
    with pytest.raises(MatrixError, match="more than 64"):
        matrix.parse_labels(" ".join(f"l{i}" for i in range(65)))
    axes = matrix.parse_axes("django=5.1 db=pg")
    assert matrix.format_axes(axes) == "django=5.1 db=pg"
    assert matrix.is_cell_name("") and matrix.is_cell_name("py3.12-db_x")
    assert not matrix.is_cell_name("a/b") and not matrix.is_cell_name("x" * 161)


AXIS = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True).filter(
    lambda a: a not in matrix.RESERVED_AXES and a != "python")
VALUE = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._]{0,5}", fullmatch=True).filter(
    lambda v: not v.endswith(".xml"))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(AXIS, st.lists(VALUE, min_size=1, max_size=3, unique=True),
                       min_size=1, max_size=3),
       st.lists(st.sampled_from(["3.9", "3.12", "3.13"]), unique=True, max_size=3),
       st.data())
def test_expansion_is_the_product_less_the_exclusions(axes, pythons, data):
    all_axes = ({"python": pythons} if pythons else {}) | axes
    product = [dict(zip(all_axes, combo)) for combo in itertools.product(*all_axes.values())]
    excluded = data.draw(st.lists(st.sampled_from(product), unique_by=lambda c: str(c),
                                  max_size=len(product)))
    text = "[ci]\n" + "".join(f"matrix_{a} = {' '.join(v)}\n" for a, v in all_axes.items())
    if excluded:
        text += "matrix_exclude = " + " ; ".join(
            " ".join(f"{a}={v}" for a, v in c.items()) for c in excluded) + "\n"
    kept = [c for c in product if c not in excluded]
    try:
        cells = matrix.expand(text, max_cells=1000)
    except MatrixError as exc:
        assert not kept and "every combination" in str(exc) or "named" in str(exc)
        return
    assert len(cells) == len(kept) and len(set(names(cells))) == len(cells)
    for cell, combo in zip(cells, kept):
        assert cell.python == combo.get("python")
        assert dict(cell.axes) == {a: v for a, v in combo.items() if a != "python"}
        assert cell.env == {f"CI_{a.upper()}": v for a, v in combo.items() if a != "python"}
        assert matrix.is_cell_name(cell.name)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(AXIS, st.lists(VALUE, min_size=1, max_size=3, unique=True),
                       min_size=1, max_size=4),
       st.data())
def test_partial_repeated_exclusions_and_inclusions_are_what_they_say(axes, data):
    """Against the plain reading of the docs: a combination is dropped if
    any exclusion's pairs are all in it, then each inclusion not already
    there is added, in order (exclusions and inclusions may repeat)."""
    pairs = st.lists(st.sampled_from([(a, v) for a, vs in axes.items() for v in vs]),
                     min_size=1, max_size=3, unique_by=lambda p: p[0]).map(dict)
    excludes = data.draw(st.lists(pairs, max_size=6))
    includes = data.draw(st.lists(pairs.map(lambda c: {**c, "extra": "x"}) | pairs,
                                  max_size=4))
    excludes += excludes[:2]
    text = "[ci]\n" + "".join(f"matrix_{a} = {' '.join(v)}\n" for a, v in axes.items())
    for key, combos in (("matrix_exclude", excludes), ("matrix_include", includes)):
        if combos:
            text += f"{key} = " + " ; ".join(matrix.format_axes(c.items())
                                             for c in combos) + "\n"
    expected = [c for c in (dict(zip(axes, p)) for p in itertools.product(*axes.values()))
                if not any(x.items() <= c.items() for x in excludes)]
    for combo in includes:
        if combo not in expected:
            expected.append(combo)
    try:
        cells = matrix.expand(text, max_cells=1000)
    except MatrixError as exc:
        assert not expected and "every combination" in str(exc) or "named" in str(exc), exc
        return
    assert [dict(c.axes) for c in cells] == expected


def test_hostile_exclusions_and_inclusions_cost_no_time():
    """100 x 100 axes and 8,112 copies of one exclusion in 64 KB took
    60 s in the observer's single poll loop (each of 10,000 combinations
    checked against each exclusion; each inclusion looked for in a list).
    At most 256 of each, once each, matched as bit masks: refused or
    expanded at once (in a child, bounded: the old code takes minutes)."""
    axes = (f"[ci]\nmatrix_x = {' '.join(f'a{i}' for i in range(100))}\n"
            f"matrix_y = {' '.join(f'b{i}' for i in range(100))}\n")
    fill = 65536 - len(axes) - 40
    copies = axes + "matrix_exclude = " + "x=a1 y=b1;" * (fill // 10) + "\n"
    included = axes + "matrix_include = " + "x=a1 y=b1;" * (fill // 10) + "\n"
    # 196 partial exclusions leave 2 x 2; 50 inclusions add a z axis.
    fitting = (axes + "matrix_exclude = " + ";".join(
        [f"x=a{i}" for i in range(2, 100)] + [f"y=b{i}" for i in range(2, 100)])
        + "\nmatrix_include = " + ";".join(f"x=a{i} y=b{j} z=1" for i in range(10)
                                           for j in range(5)) + "\n")
    script = ("import json, sys; from ci import matrix; from ci.observer.commits import "
              "plan_field\nfor text in sys.argv[1:]:\n"
              "    print(json.dumps(plan_field(text.encode())))")
    try:
        printed, _ = run_measured(script, copies, included, fitting, timeout=20, cwd=ROOT)
    except subprocess.TimeoutExpired:
        printed = None    # failed below: the exception would print 200 KB of recipes
    assert printed is not None, "expanding three hostile matrices took over 20 s"
    plans = [matrix.decode_plan(json.loads(line), 256) for line in printed.split()]
    assert [p.error for p in plans[:2]] == [
        ".ci.ini: matrix_exclude: more than 256 combinations",
        ".ci.ini: matrix_include: more than 256 combinations"]
    assert [c.name for c in plans[2].cells[:5]] == [
        "xa0-yb0", "xa0-yb1", "xa1-yb0", "xa1-yb1", "xa0-yb0-z1"]
    assert len(plans[2].cells) == 4 + 50 and plans[2].error is None


def test_commits_that_share_a_recipe_share_its_plan(tmp_path, monkeypatch):
    """A batch of 200 commits with one recipe expanded it 200 times."""
    from ci.observer.commits import plan_fields
    repo = Upstream(tmp_path / "repo")
    first = repo.commit({".ci.ini": "[ci]\nmatrix_python = 3.9 3.12\n"})
    same = [first] + [repo.commit() for _ in range(4)]
    other = repo.commit({".ci.ini": "[ci]\nmatrix_python = 3.13\n"})
    expanded = []
    real = matrix.expand
    monkeypatch.setattr(matrix, "expand", lambda *a, **k: expanded.append(a) or real(*a, **k))
    plans = plan_fields(repo.path, same + [other])
    assert len(expanded) == 2 and len({plans[c] for c in same}) == 1
    assert [c.name for c in matrix.decode_plan(plans[other], 64).cells] == ["py3.13"]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_cells_or_a_reason(text):
    try:
        cells = matrix.expand("[ci]\n" + text)
    except (MatrixError, recipe.RecipeError):
        return
    assert cells and all(isinstance(c, Cell) for c in cells)


def test_the_observer_reads_the_commits_recipe(tmp_path):
    """ci/observer/commits.plan_fields on a real repository (one git
    process for them all): no recipe, a recipe without a matrix, a matrix,
    a bad matrix (the commit's error), a recipe that does not parse (left
    to the runner, as before), a .ci.ini that is a folder."""
    from ci.observer.commits import dispatch_body, plan_fields
    repo = str(tmp_path / "repo")
    subprocess.run(["git", "init", "-q", repo], check=True)

    def commit(text):
        if text is not None:
            (tmp_path / "repo" / ".ci.ini").write_text(text)
        subprocess.run(["git", "-C", repo, "add", "-A"], check=True)
        subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t",
                        "commit", "-q", "--allow-empty", "-m", "c"], check=True)
        return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    none = commit(None)
    plain = commit("[ci]\ntest = python -m pytest\n")
    cells = commit("[ci]\nmatrix_python = 3.9 3.12\n")
    bad = commit("[ci]\nmatrix_python =\n")
    broken = commit("not a recipe\n")
    (tmp_path / "repo" / ".ci.ini").unlink()
    (tmp_path / "repo" / ".ci.ini").mkdir()
    (tmp_path / "repo" / ".ci.ini" / "x").write_text("x\n")
    folder = commit(None)
    plan = plan_fields(repo, [none, plain, cells, bad, broken, folder])
    assert plan[none] == plan[plain] == plan[broken] == plan[folder] == ""
    sent = matrix.decode_plan(plan[cells], 64)
    assert [c.name for c in sent.cells] == ["py3.9", "py3.12"] and sent.error is None
    assert matrix.decode_plan(plan[bad], 64).error == \
        ".ci.ini: matrix_python: the axis is empty"
    assert plan_fields(repo, []) == {}
    body = dispatch_body([cells, none], None, "main", {cells: plan[cells]})
    first, second = body.decode().splitlines()
    assert first.startswith(f"{cells} - main cells=") and second == f"{none} {cells} main"


def test_an_oversized_recipe_is_an_error_and_never_read_whole(tmp_path):
    """A 200 MB .ci.ini packs into some 224 KB; read whole once per commit
    above it, 5 commits took the observer to 2 GiB, then 120 s at every
    poll (never dispatched).  Its size is asked first: past
    MAX_RECIPE_BYTES it is the commit's error, and a recipe is read once
    however many commits share it."""
    from ci.observer.commits import plan_fields
    repo = Upstream(tmp_path / "repo")
    head = b"[ci]\nmatrix_python = 3.12\n"
    fits = repo.commit({".ci.ini": head + b"#" * (recipe.MAX_RECIPE_BYTES - len(head))})
    over = repo.commit({".ci.ini": head + b"#" * (recipe.MAX_RECIPE_BYTES - len(head) + 1)})
    plans = plan_fields(repo.path, [fits, over])
    assert [c.name for c in matrix.decode_plan(plans[fits], 64).cells] == ["py3.12"]
    assert matrix.decode_plan(plans[over], 64).error == ".ci.ini is larger than 65536 bytes"
    big = repo.commit({".ci.ini": b"[ci]\n" + b"#" * (24 << 20)})
    above = [big] + [repo.commit() for _ in range(9)]
    script = ("import json, sys; from ci.observer.commits import plan_fields; "
              "print(json.dumps(plan_fields(sys.argv[1], sys.argv[2:])))")
    printed, peak_mb = run_measured(script, repo.path, *above, timeout=60, cwd=ROOT)
    sent = json.loads(printed)
    assert sent.keys() == set(above) and len(set(sent.values())) == 1
    assert matrix.decode_plan(sent[big], 64).error == ".ci.ini is larger than 65536 bytes"
    assert peak_mb < 48, f"{peak_mb:.0f} MB to plan 10 commits of one oversized recipe"


def test_dispatch_batches_keep_each_body_small_and_chain_the_commits():
    """200 commits of a 256-cell matrix with long labels made a 17 MiB
    body, over the dispatcher's message limit: refused at every poll."""
    from ci.observer.commits import dispatch_batches, dispatch_body
    commits = [f"{n:040x}" for n in range(1, 11)]
    plans = {c: "cells=" + "x" * 300_000 for c in commits}
    batches = list(dispatch_batches(commits, "f" * 40, "main", plans, 200, limit=1_000_000))
    assert [c for batch, _ in batches for c in batch] == commits
    assert all(len(body) <= 1_000_000 for _, body in batches) and len(batches) > 1
    previous = "f" * 40
    for batch, body in batches:
        assert body == dispatch_body(batch, previous, "main", plans)
        previous = batch[-1]
    (single,) = list(dispatch_batches(commits[:1], None, "main", plans, 200, limit=10))
    assert single[0] == commits[:1]          # one commit goes whatever its size


@pytest.mark.parametrize("cells, error", [
    ("[" * 50000, "nested too deep"),         # json's RecursionError was an internal error
    ('[{"name": "x", "python": 3.10}]', "bad python"),   # a number: 3.10 reads as 3.1
])
def test_a_malformed_plan_from_the_observer_is_a_clear_error(cells, error):
    field = matrix.CELLS_FIELD + matrix._b64(cells.encode())
    plan = matrix.decode_plan(field, 64)
    assert plan.cells == () and error in plan.error


def test_a_cells_name_has_one_pattern():
    """The recipe's cell names, the result files named by them and the
    dashboard's reading of both are checked by one pattern, not copies
    that could drift apart (issue 18: repeated pieces written once)."""
    from ci import results
    from ci.dashboard import index
    assert matrix.CELL_RE is results.CELL_NAME_RE is index.CELL_NAME_RE
