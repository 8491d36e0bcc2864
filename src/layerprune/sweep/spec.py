"""A sweep file and its cells: a base recipe, axes (a grid and/or a list of overrides), settings for every cell,
executor resources and the comparisons to state.

::

    name: metrics-x-healing
    base: ../recipes/best-practice.yaml   # a recipe file (relative to this file) or an inline mapping
    grid:                                 # every combination is a cell
      prune.metric: [reverse, bi, taylor]
      heal.method: [partial, lora]
    cells:                                # more cells, each a mapping of overrides (or a mapping of
      - {prune.metric: angular}           # group names to such lists: one report table per group)
    set: {evaluate.tasks: [piqa]}         # applied to every cell
    pilot: {lrs: [1.0e-4, 1.0e-3], steps: 20, scope: cell}   # learning-rate pilots (sweep/pilot.py)
    executor: {workers: 2, cpus_per_cell: 1, gpus_per_cell: 0, slurm: {partition: gpu, time_min: 120}}
                                          # heal_processes: N heals each cell under torchrun (default: its GPUs)
    compare:                              # findings stated in the report
      - {axis: prune.metric, baseline: reverse, where: {heal.method: lora}, stage: healed}

Each cell is a validated recipe; its folder is named by the recipe's fingerprint, so a re-launch finds the
cells already run, and two cells that resolve to the same recipe are one.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import LayerpruneError
from .pilot import PilotSpec

TOP_KEYS = {"name", "base", "grid", "cells", "set", "executor", "compare", "pilot"}
COMPARE_KEYS = {"axis", "baseline", "where", "stage"}
GRID = "grid"  # the report group of the grid's cells
EXECUTOR_KEYS = {"workers", "cpus_per_cell", "gpus_per_cell", "heal_processes", "address", "slurm"}
SLURM_KEYS = {"partition", "time_min", "gpus_per_node", "cpus_per_task", "mem_gb", "cluster"}


@dataclass
class Cell:
    """One recipe of the sweep: its axis values (what distinguishes it) and the validated recipe."""

    axes: dict[str, Any]
    recipe: dict[str, Any]
    group: str = GRID  # the report table it is listed in
    lr_fixed: bool = False  # the sweep file sets its heal.lr (no pilot)
    pilot_lr: float | None = None  # the rate the pilot chose for it

    @property
    def key(self) -> str:
        from ..recipe.state import fingerprint

        return fingerprint(self.recipe)[:12]

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.axes.items()) or "base"


@dataclass
class Sweep:
    name: str
    cells: list[Cell]
    executor: dict[str, Any] = field(default_factory=dict)
    compare: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    pilot: PilotSpec | None = None

    @property
    def axes(self) -> list[str]:
        return _axes(self.cells)

    @property
    def groups(self) -> dict[str, list[Cell]]:
        """Report groups in file order (the grid's cells first)."""
        out: dict[str, list[Cell]] = {}
        for c in self.cells:
            out.setdefault(c.group, []).append(c)
        return out


def _axes(cells: list[Cell]) -> list[str]:
    seen: dict[str, None] = {}
    for c in cells:
        for k in c.axes:
            seen.setdefault(k, None)
    return list(seen)


def _override(key: str, value: Any) -> str:
    """``key=value`` for :func:`~layerprune.recipe.schema.apply_overrides` (the value as YAML)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()
    return f"{key}={text}"


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LayerpruneError(f"sweep: '{where}' must be a mapping of recipe keys to values")
    return value


def load_sweep(path: str | os.PathLike, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file and validate every cell's recipe (before anything runs)."""
    from ..io import read_yaml

    p = Path(path)
    data = read_yaml(p, "sweep file")
    if not isinstance(data, dict):
        raise LayerpruneError(f"sweep {p}: expected a mapping with 'base' and 'grid' or 'cells'")
    return build_sweep(data, p.parent, overrides or [], str(p))


def build_sweep(data: dict[str, Any], root: Path, overrides: list[str], source: str = "<dict>") -> Sweep:
    from ..recipe.schema import apply_overrides, validate

    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise LayerpruneError(f"sweep: unknown key(s) {unknown}; valid: {', '.join(sorted(TOP_KEYS))}")
    base = data.get("base")
    if isinstance(base, str):
        from ..io import read_yaml

        base = read_yaml((root / base) if not Path(base).is_absolute() else Path(base), "sweep: base recipe") or {}
    if not isinstance(base, dict):
        raise LayerpruneError("sweep: 'base' must be a recipe file or a recipe mapping")
    grid = _mapping(data.get("grid"), "grid")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise LayerpruneError(f"sweep: grid axis '{k}' must be a non-empty list of values")
    extra = _cell_groups(data.get("cells"))
    common_set = _mapping(data.get("set"), "set")
    common = [_override(k, v) for k, v in common_set.items()] + list(overrides)
    lr_set = "heal.lr" in common_set or any(o.split("=", 1)[0].strip() == "heal.lr" for o in overrides)
    combos = [(GRID, dict(zip(grid, vals))) for vals in itertools.product(*grid.values())] if grid else []
    if not combos and not extra:
        combos = [(GRID, {})]
    cells: dict[str, Cell] = {}
    for group, axes in combos + extra:
        try:
            rec = validate(apply_overrides(base, common + [_override(k, v) for k, v in axes.items()]))
        except LayerpruneError as e:
            what = ", ".join(f"{k}={v}" for k, v in axes.items()) or "base"
            raise LayerpruneError(f"sweep cell [{what}]: {e}") from None
        if rec["heal"].get("report_to") and not rec["heal"].get("run_name"):
            # Tracked runs are named (tagged) by the cell's axes.
            rec["heal"]["run_name"] = ", ".join(f"{k}={v}" for k, v in axes.items()) or "base"
        cell = Cell(dict(axes), rec, group, lr_set or "heal.lr" in axes)
        cells.setdefault(cell.key, cell)  # two cells that resolve to the same recipe run once
    ex = _mapping(data.get("executor"), "executor")
    bad = sorted(set(ex) - EXECUTOR_KEYS) + sorted(set(_mapping(ex.get("slurm"), "executor.slurm")) - SLURM_KEYS)
    if bad:
        raise LayerpruneError(f"sweep: unknown executor key(s) {bad}; valid: {', '.join(sorted(EXECUTOR_KEYS))}, "
                              f"slurm: {', '.join(sorted(SLURM_KEYS))}")
    for k in ("workers", "cpus_per_cell", "heal_processes"):
        if k in ex and (not isinstance(ex[k], int) or ex[k] < 1):
            raise LayerpruneError(f"sweep: executor.{k} must be a whole number >= 1")
    if "gpus_per_cell" in ex and (not isinstance(ex["gpus_per_cell"], (int, float)) or ex["gpus_per_cell"] < 0):
        raise LayerpruneError("sweep: executor.gpus_per_cell must be >= 0")
    compare = _compare(data.get("compare"), {k for cell in cells.values() for k in cell.axes})
    pilot = PilotSpec.parse(data.get("pilot"))
    name = str(data.get("name") or Path(source).stem)
    return Sweep(name, list(cells.values()), ex, compare, source, pilot)


def _cell_groups(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """``cells``: a list of override mappings, or a mapping of group names to such lists."""
    if value is None:
        return []
    named = value.items() if isinstance(value, dict) else [("cells", value)]
    out = []
    for group, items in named:
        if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
            raise LayerpruneError("sweep: 'cells' must be a list of mappings of recipe keys to values, or a mapping "
                                  "of group names to such lists")
        out += [(str(group), c) for c in items]
    return out


def _compare(value: Any, axes: set[str]) -> list[dict[str, Any]]:
    """``compare``: a list of {axis, baseline, where (axis values the cells must have), stage (final model)}."""
    from ..run_manifest import STAGES

    compare = value or []
    if not isinstance(compare, list) or any(not isinstance(c, dict) or "axis" not in c or "baseline" not in c
                                            for c in compare):
        raise LayerpruneError("sweep: 'compare' must be a list of {axis: KEY, baseline: VALUE}")
    for c in compare:
        bad = sorted(set(c) - COMPARE_KEYS)
        if bad:
            raise LayerpruneError(f"sweep: unknown compare key(s) {bad}; valid: {', '.join(sorted(COMPARE_KEYS))}")
        if c["axis"] not in axes:
            raise LayerpruneError(f"sweep: compare axis '{c['axis']}' is not an axis of the sweep")
        if not isinstance(c.get("where", {}), dict):
            raise LayerpruneError("sweep: compare 'where' must be a mapping of axes to values")
        if c.get("stage") is not None and c["stage"] not in STAGES:
            raise LayerpruneError(f"sweep: compare 'stage' must be one of {', '.join(STAGES)}")
    return compare


_MISSING = object()


def recipe_value(recipe: dict[str, Any], key: str, default: Any = None) -> Any:
    """A recipe's value at a dotted key (``heal.method``); ``default`` where the recipe has no such key."""
    value: Any = recipe
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def select(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """The cells whose recipes match every ``KEY=VALUE`` of ``only`` (a key given twice: either value); all of
    them when ``only`` is empty. Raises on a malformed item, a key no recipe has, or a selection of no cell."""
    from ..options import parse_scalar

    wanted: dict[str, list[Any]] = {}
    for item in only or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LayerpruneError(f"--only '{item}' must look like KEY=VALUE (e.g. prune.metric=angular)")
        wanted.setdefault(key.strip(), []).append(parse_scalar(value))
    for key in wanted:
        if all(recipe_value(c.recipe, key, _MISSING) is _MISSING for c in cells):
            raise LayerpruneError(f"--only: no cell's recipe has the key '{key}'")
    chosen = [c for c in cells if all(recipe_value(c.recipe, k) in vs for k, vs in wanted.items())]
    if not chosen:
        raise LayerpruneError(f"--only {' '.join(only or [])}: no cell of the sweep matches")
    return chosen


__all__ = ["Cell", "Sweep", "build_sweep", "load_sweep", "recipe_value", "select"]
