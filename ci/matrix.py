"""The build matrix: which cells a commit is tested in, read from the
``[ci]`` section of its recipe (``.ci.ini``).  Pure functions.

    matrix_python = 3.9 3.12 3.13       axis "python": the interpreter
    matrix_django = 4.2 5.1             any other axis: CI_DJANGO=<value>
    matrix_exclude = python=3.9 django=5.1 ; python=3.13 django=4.2
    matrix_include = python=3.12 django=main
    labels = gpu linux                  runner labels every cell needs
    labels_python_3.13 = big            labels the cells with that value need

A cell is one combination of axis values, named by its values in axis
order (``python`` first, as ``py<version>``; then each axis as
``<axis><value>``), e.g. ``py3.12-django5.1``.  A recipe without
``matrix_*`` keys is one cell named "" (empty): exactly a commit as it was
tested before matrices existed.  An exclusion may name some of the axes (it
removes every combination that has those values); an inclusion adds one
combination and may use values (or axes) the product does not have.

Why the observer reads this and not the runner: the dispatcher, which
makes one unit of work per cell, has no clone; the observer has, and the
recipe must come from the commit under test so that a commit changing its
matrix is tested the new way.  Why so strict: a matrix that silently lost a
cell would report a commit as passing on an interpreter it never ran on, so
anything odd is a ``MatrixError`` whose reason becomes the commit's
``error`` verdict.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import json
import math
import re
from typing import Iterable, Mapping

from ci import results, wire
from ci.runner import recipe

AXIS_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
VALUE_RE = LABEL_RE = re.compile(wire.NAME_PATTERN)
# What the python axis takes: a version a runner can advertise as python3.12.
PYTHON_RE = re.compile(r"[0-9]{1,2}\.[0-9]{1,3}")
# A cell's name, as it travels (jobspec, results) and names files
# (test_results/<commit>.cell.<name>): never a path, never ending in
# ".xml" (the XML beside a cell's result is named by adding that).
CELL_RE = results.CELL_NAME_RE   # the one pattern (results.py names cell files with it)
PYTHON = "python"
RESERVED_AXES = ("exclude", "include")
DEFAULT_MAX_CELLS = 64
# The most cells --max-cells may allow (and the observer sends): a dispatch
# of 200 commits' cells must fit in one message.
MAX_CELLS_LIMIT = 256
# Before exclusions: a product this big is a mistake, not a matrix.
MAX_COMBINATIONS = 10_000
MAX_LABELS = 64
MAX_REASON = 300


class MatrixError(ValueError):
    """A matrix that cannot be used; the message is the reason shown as the
    commit's ``error`` verdict."""


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str                                   # "" for a commit without a matrix
    python: str | None = None                   # e.g. "3.12"; None: the runner's own
    axes: tuple[tuple[str, str], ...] = ()      # the other axes, in axis order
    labels: frozenset[str] = frozenset()        # labels the recipe asks for

    @property
    def env(self) -> dict[str, str]:
        """The environment the setup and test commands get for the axes."""
        return axis_env(self.axes)

    @property
    def needs(self) -> frozenset[str]:
        """Every label a runner must have to take this cell: the recipe's
        and, for a python axis value, the interpreter's (``python3.12``)."""
        return self.labels | ({python_label(self.python)} if self.python else frozenset())


SINGLE = Cell("")


def python_label(version: str) -> str:
    """The label a runner with interpreter ``version`` advertises."""
    return f"python{version}"


def axis_env(axes: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {f"CI_{axis.upper()}": value for axis, value in axes}


def is_cell_name(name: str) -> bool:
    return name == "" or (bool(CELL_RE.fullmatch(name)) and not name.endswith(".xml"))


def parse_labels(text: str, what: str = "labels") -> frozenset[str]:
    """Space-separated labels; MatrixError naming the first odd one."""
    labels = text.split()
    if len(labels) > MAX_LABELS:
        raise MatrixError(f"{what}: more than {MAX_LABELS} labels")
    for label in labels:
        if not LABEL_RE.fullmatch(label):
            raise MatrixError(f"{what}: label {_quote(label)} must be 1 to 64 letters, "
                              "digits, '.', '_' or '-'")
    return frozenset(labels)


def parse_axes(text: str, what: str = "axes") -> tuple[tuple[str, str], ...]:
    """``k=v k=v`` pairs (the jobspec's ``axes``, one include or exclude
    combination); MatrixError for a malformed or repeated axis."""
    pairs: list[tuple[str, str]] = []
    for word in text.split():
        axis, sep, value = word.partition("=")
        if not sep or not AXIS_RE.fullmatch(axis) or not VALUE_RE.fullmatch(value):
            raise MatrixError(f"{what}: {_quote(word)} is not axis=value (axis: a-z, 0-9, _; "
                              "value: 1 to 64 letters, digits, '.', '_' or '-')")
        if axis in dict(pairs):
            raise MatrixError(f"{what}: axis {axis!r} given twice")
        pairs.append((axis, value))
    return tuple(pairs)


def format_axes(axes: Iterable[tuple[str, str]]) -> str:
    return " ".join(f"{axis}={value}" for axis, value in axes)


def expand(source: str | Mapping[str, str], max_cells: int = DEFAULT_MAX_CELLS) -> list[Cell]:
    """The cells of a recipe (its text, or the ``[ci]`` values
    ``recipe.parse`` read), in a stable order; MatrixError (or, for a
    malformed file, recipe.RecipeError) with the reason."""
    values = recipe.parse(source) if isinstance(source, str) else dict(source)
    values = {k.lower(): v for k, v in values.items() if recipe.is_matrix_key(k.lower())}
    axes = _axes(values)
    common = parse_labels(values.get("labels", ""), "labels")
    if not axes and "matrix_include" not in values:
        if "matrix_exclude" in values or any(k.startswith("labels_") for k in values):
            raise MatrixError("matrix_exclude and labels_<axis>_<value> need a matrix_<axis>")
        return [Cell("", labels=common)]
    combos = _combinations(axes, values, max_cells)
    order = _axis_order(axes, combos)
    per_value = _value_labels(values, axes, combos)
    cells = [_cell(combo, order, common, per_value) for combo in combos]
    _check_names(cells)
    return cells


def _axes(values: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """``matrix_<axis>`` keys in file order, python first."""
    axes: dict[str, tuple[str, ...]] = {}
    for key, text in values.items():
        if not key.startswith("matrix_") or key[len("matrix_"):] in RESERVED_AXES:
            continue
        axis = key[len("matrix_"):]
        if not AXIS_RE.fullmatch(axis):
            raise MatrixError(f"{key}: axis names are a letter then up to 31 of a-z, 0-9, _")
        axes[axis] = _axis_values(axis, text)
    if PYTHON in axes:
        axes = {PYTHON: axes[PYTHON], **axes}
    return axes


def _axis_values(axis: str, text: str) -> tuple[str, ...]:
    values = text.split()
    if not values:
        raise MatrixError(f"matrix_{axis}: the axis is empty")
    for value in values:
        _check_value(axis, value, f"matrix_{axis}")
    if len(set(values)) != len(values):
        raise MatrixError(f"matrix_{axis}: a value is listed twice")
    return tuple(values)


def _check_value(axis: str, value: str, what: str) -> None:
    if not VALUE_RE.fullmatch(value):
        raise MatrixError(f"{what}: value {_quote(value)} must be 1 to 64 letters, digits, "
                          "'.', '_' or '-'")
    if axis == PYTHON and not PYTHON_RE.fullmatch(value):
        raise MatrixError(f"{what}: python {_quote(value)} is not a version like 3.12")


def _combinations(axes: dict, values: Mapping[str, str], max_cells: int) -> list[dict]:
    """The product less the exclusions, plus the inclusions (each once)."""
    total = math.prod(len(axis_values) for axis_values in axes.values())
    if total > MAX_COMBINATIONS:
        raise MatrixError(f"the matrix has {total} combinations before exclusions "
                          f"(at most {max_cells} cells are tested)")
    excludes = _combos(values.get("matrix_exclude", ""), "matrix_exclude")
    for combo in excludes:
        for axis, value in combo.items():
            if value not in axes.get(axis, ()):
                raise MatrixError(f"matrix_exclude: {axis}={value} is not in the matrix")
    every = [dict(zip(axes, picked)) for picked in itertools.product(*axes.values())] \
        if axes else []
    removed = format(_excluded(axes, total, excludes), f"0{total}b")[::-1] if axes else ""
    combos = [combo for combo, bit in zip(every, removed) if bit == "0"]
    seen = {frozenset(combo.items()) for combo in combos}
    for combo in _combos(values.get("matrix_include", ""), "matrix_include"):
        if frozenset(combo.items()) not in seen:
            seen.add(frozenset(combo.items()))
            combos.append(combo)
    if not combos:
        raise MatrixError("the matrix has no cells: every combination is excluded")
    if len(combos) > max_cells:
        limit = "--max-cells" if max_cells < MAX_CELLS_LIMIT else "the most --max-cells allows"
        raise MatrixError(f"the matrix has {len(combos)} cells, more than the "
                          f"{max_cells} allowed ({limit})")
    return combos


def _excluded(axes: dict[str, tuple[str, ...]], total: int,
              excludes: list[dict[str, str]]) -> int:
    """The positions in the product (``itertools.product``'s order) that
    an exclusion removes, as the bits of one int.  Each (axis, value) is
    the mask of the positions that have it, an exclusion the AND of its
    pairs' masks: a few word operations per pair, where checking every
    combination against every exclusion took 60 s (100 x 100 axes, 8,112
    copies of one exclusion) in the observer's single poll loop."""
    everything = (1 << total) - 1
    strides, stride = {}, 1
    for axis in reversed(axes):            # the last axis changes fastest
        strides[axis] = stride
        stride *= len(axes[axis])
    masks: dict[tuple[str, str], int] = {}

    def mask(axis: str, value: str) -> int:
        if (axis, value) not in masks:
            run, period = strides[axis], strides[axis] * len(axes[axis])
            block = ((1 << run) - 1) << (axes[axis].index(value) * run)
            # ``everything // (2**period - 1)`` is 1 + 2**period + 2**(2*period)
            # + ...: the product repeats the block once in every period.
            masks[axis, value] = block * (everything // ((1 << period) - 1))
        return masks[axis, value]
    removed = 0
    for combo in excludes:
        matched = everything
        for axis, value in combo.items():
            matched &= mask(axis, value)
        removed |= matched
    return removed


def _combos(text: str, what: str) -> list[dict[str, str]]:
    """The ``;``-separated combinations of an exclude or include key, each
    once; at most MAX_CELLS_LIMIT of them (a longer list is no matrix)."""
    parts = [part for part in text.split(";") if part.strip()]
    if len(parts) > MAX_CELLS_LIMIT:
        raise MatrixError(f"{what}: more than {MAX_CELLS_LIMIT} combinations")
    combos: dict[frozenset, dict[str, str]] = {}
    for part in parts:
        combo = dict(parse_axes(part, what))
        for axis, value in combo.items():
            _check_value(axis, value, what)
        combos.setdefault(frozenset(combo.items()), combo)
    return list(combos.values())


def _axis_order(axes: dict, combos: list[dict]) -> list[str]:
    """Declared axes, then any an inclusion added; python always first."""
    order = list(axes)
    for combo in combos:
        order += [a for a in combo if a not in order]
    return sorted(order, key=lambda a: a != PYTHON)


def _value_labels(values: Mapping[str, str], axes: dict,
                  combos: list[dict]) -> dict[tuple[str, str], frozenset[str]]:
    """``labels_<axis>_<value>`` keys: (axis, value as lowered by the
    recipe's case-blind keys) -> labels."""
    known = {(a, v.lower()) for combo in combos for a, v in combo.items()}
    names = sorted({a for a, _ in known}, key=len, reverse=True)
    table = {}
    for key, text in values.items():
        if not key.startswith("labels_"):
            continue
        rest = key[len("labels_"):]
        axis = next((a for a in names if rest.startswith(a + "_")), None)
        if axis is None or (axis, rest[len(axis) + 1:]) not in known:
            raise MatrixError(f"{key}: no axis value of the matrix is called that "
                              "(labels_<axis>_<value>)")
        table[(axis, rest[len(axis) + 1:])] = parse_labels(text, key)
    return table


def _cell(combo: dict, order: list[str], common: frozenset, per_value: dict) -> Cell:
    labels = common.union(*(per_value.get((a, v.lower()), ()) for a, v in combo.items()))
    parts = [f"py{combo[a]}" if a == PYTHON else f"{a}{combo[a]}" for a in order if a in combo]
    axes = tuple((a, combo[a]) for a in order if a in combo and a != PYTHON)
    return Cell("-".join(parts), combo.get(PYTHON), axes, frozenset(labels))


def _check_names(cells: list[Cell]) -> None:
    seen = set()
    for cell in cells:
        if not is_cell_name(cell.name):
            raise MatrixError(f"cell name {_quote(cell.name)} is too long or ends in .xml")
        if cell.name in seen:
            raise MatrixError(f"two cells would both be named {cell.name!r}")
        seen.add(cell.name)
        if len(cell.needs) > MAX_LABELS:
            raise MatrixError(f"cell {cell.name} needs more than {MAX_LABELS} labels")


# ---- the dispatch line's matrix field (observer -> dispatcher) ------------

# The dispatch body's per-commit fields (after ``<commit> <previous|-> <branch>``).
CELLS_FIELD, ERROR_FIELD = "cells=", "error="


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the observer said a commit is to be tested as: its cells, or
    the reason its matrix cannot be used (then it is not run)."""
    cells: tuple[Cell, ...] = (SINGLE,)
    error: str | None = None


SINGLE_PLAN = Plan()


def encode_plan(plan: Plan) -> str:
    """The dispatch line's extra field for a commit: ``cells=<base64 JSON>``
    or ``error=<base64 reason>``; "" for a commit without a matrix."""
    if plan.error is not None:
        return ERROR_FIELD + _b64(plan.error.encode())
    if plan.cells == (SINGLE,):
        return ""
    data = [{"name": c.name, "python": c.python, "axes": format_axes(c.axes),
             "labels": " ".join(sorted(c.labels))} for c in plan.cells]
    return CELLS_FIELD + _b64(json.dumps(data, separators=(",", ":")).encode())


def decode_plan(field: str, max_cells: int) -> Plan:
    """The inverse of ``encode_plan``; a malformed field or too many cells
    is a Plan with the reason as its error (the commit's verdict)."""
    try:
        if field.startswith(ERROR_FIELD):
            reason = _unb64(field[len(ERROR_FIELD):]).decode()
            return Plan((), wire.one_line(reason, MAX_REASON))
        if not field.startswith(CELLS_FIELD):
            raise ValueError("unknown field")
        cells = tuple(_sent_cell(item)
                      for item in json.loads(_unb64(field[len(CELLS_FIELD):])))
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        return Plan((), f"the observer sent a malformed matrix: {wire.one_line(str(exc), 120)}")
    except RecursionError:      # json recurses: "[" * 50000 went past its depth
        return Plan((), "the observer sent a malformed matrix: nested too deep")
    if not cells or len({c.name for c in cells}) != len(cells):
        return Plan((), "the observer sent a matrix without cells or with a cell twice")
    if any(not c.name for c in cells) and (len(cells) > 1 or cells[0].python or cells[0].axes):
        return Plan((), "the observer sent an unnamed cell that is not the commit's only one")
    if len(cells) > max_cells:
        return Plan((), f"the matrix has {len(cells)} cells, more than the {max_cells} "
                        "allowed (--max-cells)")
    return Plan(cells)


def _sent_cell(item: dict) -> Cell:
    name, python = item["name"], item.get("python")
    # "": a commit without a matrix whose recipe asks for ``labels``.
    if not isinstance(name, str) or not is_cell_name(name):
        raise ValueError(f"bad cell name {str(name)[:40]!r}")
    # A string: a JSON number 3.10 would read as 3.1.
    if python is not None and not (isinstance(python, str) and PYTHON_RE.fullmatch(python)):
        raise ValueError(f"bad python {str(python)[:20]!r}")
    return Cell(name, python, parse_axes(item.get("axes", "")),
                parse_labels(item.get("labels", "")))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii"))


def _quote(text: str) -> str:
    return repr(text[:80])
