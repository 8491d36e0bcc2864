"""Learning-rate pilots: before the cells run, each piloted healing is tried at a grid of rates for a short fixed
budget and the rate with the lowest final validation loss is the one its cells heal at.

::

    pilot:
      lrs: [1.0e-4, 1.0e-3, 3.0e-3]   # the grid
      steps: 20                        # every candidate's budget (warmup_steps of them warm up)
      scope: cell                      # cell: each cell its own rate; method: one rate per heal.method
      max_candidates: 5                # while the best rate is an edge of the grid, the grid grows that way
      recorded: {model: default, rates: {partial: 3.0e-3, lora: 9.0e-3}}   # scope method: an earlier pilot's
                                       # choices, used while the cells' model is that model (else: pilot anew)

Which cells are piloted: every healing cell whose rate the sweep file does not fix (``heal.lr`` neither among
the cell's own keys nor in ``set``). ``scope: cell`` pilots each cell on its own cut and compensation (cells
that differ only in evaluation share one pilot); ``scope: method`` pilots the first cell of each
``heal.method`` and gives every cell of that method its rate (the rule of the project's study of Lu et al.).

A candidate is a recipe run like a cell's (its scores, cut and compensated model come from the sweep's shared
store), stopped after ``steps`` optimizer steps, without evaluation; its folder under ``OUT/pilot/`` is named
by its recipe's fingerprint, so a re-launch skips the candidates already run. Only its record is kept (the
healed weights are deleted). The choices are written to ``OUT/pilot.json`` and stated in the report.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LayerpruneError
from ..io import read_json, write_json

PILOT_FILE = "pilot.json"
SCOPES = ("cell", "method")
PILOT_KEYS = {"lrs", "steps", "warmup_steps", "scope", "max_candidates", "recorded"}


@dataclass
class PilotSpec:
    """The sweep file's ``pilot`` section."""

    lrs: list[float]
    steps: int = 20
    warmup_steps: int = 2
    scope: str = "cell"
    max_candidates: int = 5
    recorded: dict[str, Any] | None = None

    @classmethod
    def parse(cls, data: Any) -> PilotSpec | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise LayerpruneError("sweep: 'pilot' must be a mapping with 'lrs' (and steps, scope, max_candidates)")
        bad = sorted(set(data) - PILOT_KEYS)
        if bad:
            raise LayerpruneError(f"sweep: unknown pilot key(s) {bad}; valid: {', '.join(sorted(PILOT_KEYS))}")
        lrs = data.get("lrs")
        if not isinstance(lrs, list) or not lrs or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                        or v <= 0 for v in lrs):
            raise LayerpruneError("sweep: pilot.lrs must be a non-empty list of positive learning rates")
        spec = cls(sorted({float(v) for v in lrs}), **{k: data[k] for k in PILOT_KEYS - {"lrs"} if k in data})
        for k in ("steps", "max_candidates"):
            v = getattr(spec, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LayerpruneError(f"sweep: pilot.{k} must be a whole number >= 1")
        if isinstance(spec.warmup_steps, bool) or not isinstance(spec.warmup_steps, int) or \
                not 0 <= spec.warmup_steps < spec.steps:
            raise LayerpruneError("sweep: pilot.warmup_steps must be a whole number from 0 to steps - 1")
        if spec.scope not in SCOPES:
            raise LayerpruneError(f"sweep: pilot.scope must be one of {', '.join(SCOPES)}, not {spec.scope!r}")
        if spec.max_candidates < len(spec.lrs):
            raise LayerpruneError("sweep: pilot.max_candidates must be at least the number of pilot.lrs")
        rec = spec.recorded
        if rec is not None and (spec.scope != "method" or not isinstance(rec, dict) or set(rec) != {"model", "rates"}
                                or not isinstance(rec["rates"], dict) or
                                any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                                    for v in rec["rates"].values())):
            raise LayerpruneError("sweep: pilot.recorded must be {model: M, rates: {METHOD: LR, ...}} with "
                                  "scope: method")
        return spec


@dataclass
class Group:
    """The cells that share one pilot: the recipe every candidate starts from and the rates tried."""

    key: str
    label: str
    recipe: dict[str, Any]
    cells: list[str] = field(default_factory=list)  # the cells' keys before the pilot (their labels in reports)
    losses: dict[float, float | None] = field(default_factory=dict)  # lr -> final validation loss (None: failed)
    val_before: float | None = None

    def grid(self, spec: PilotSpec) -> list[float]:
        return sorted(set(spec.lrs) | set(self.losses))

    def best(self) -> float | None:
        ok = {lr: v for lr, v in self.losses.items() if v is not None and math.isfinite(v)}
        return min(ok, key=lambda lr: ok[lr]) if ok else None

    def next_rate(self, spec: PilotSpec) -> float | None:
        """A further candidate while the best finished rate is an edge of the grid (geometric step), so the chosen
        rate is never an untested edge; None when the choice stands (or the grid is full)."""
        grid = self.grid(spec)
        best = self.best()
        if best is None or len(grid) >= spec.max_candidates or len(grid) < 2 or \
                any(lr not in self.losses for lr in grid):
            return None
        if best == grid[-1]:
            return float(f"{grid[-1] * grid[-1] / grid[-2]:.3g}")
        if best == grid[0]:
            return float(f"{grid[0] * grid[0] / grid[1]:.3g}")
        return None


def candidate_recipe(base: dict[str, Any], lr: float, spec: PilotSpec) -> dict[str, Any]:
    """The recipe of one candidate: the group's recipe at rate ``lr``, ``spec.steps`` steps, no evaluation."""
    r = copy.deepcopy(base)
    h = r["heal"]
    h.update(lr=lr, max_steps=spec.steps, warmup_steps=spec.warmup_steps, eval_steps=spec.steps, report_to=[],
             run_name=None)
    r["evaluate"]["models"] = []
    r["measure"]["enabled"] = False
    return r


def _pilot_base(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a candidate depends on: the recipe without its rate and its evaluation settings (cells that differ
    only there share a pilot)."""
    from ..recipe.schema import validate

    r = copy.deepcopy(recipe)
    r["heal"]["lr"] = None
    r["name"] = "pilot"
    r["evaluate"] = validate({})["evaluate"]
    return r


def groups(cells: list[Any], spec: PilotSpec) -> dict[str, Group]:
    """The pilot groups of the sweep's cells (a cell whose rate the sweep file sets is in none)."""
    from ..recipe.state import fingerprint

    out: dict[str, Group] = {}
    for c in cells:
        if c.recipe["heal"]["method"] == "none" or c.lr_fixed:
            continue
        base = _pilot_base(c.recipe)
        key = c.recipe["heal"]["method"] if spec.scope == "method" else fingerprint(base)[:12]
        g = out.setdefault(key, Group(key, key if spec.scope == "method" else c.label(), base))
        g.cells.append(c.key)
    return out


def recorded_choices(spec: PilotSpec, gs: dict[str, Group]) -> dict[str, float]:
    """The recorded rates that apply: those of ``pilot.recorded`` for the groups whose cells use its model."""
    rec = spec.recorded or {}
    return {k: float(rec["rates"][k]) for k, g in gs.items()
            if k in rec.get("rates", {}) and g.recipe["model"] == rec["model"]}


def run_pilot(gs: dict[str, Group], spec: PilotSpec, out: Path, mapper: Callable[[list[dict[str, Any]]],
              list[dict[str, Any]]], log: Callable[[str], None]) -> dict[str, float | None]:
    """Run every group's candidates (through the sweep's executor, ``mapper``) until each choice stands (groups
    with a recorded rate for their model take it without running); returns group key -> chosen rate (None where
    every candidate failed) and writes ``OUT/pilot.json``."""
    from ..recipe.state import fingerprint

    folder = out / "pilot"
    recorded = recorded_choices(spec, gs)
    todo_rates = {k: list(g.grid(spec)) for k, g in gs.items() if k not in recorded}
    while any(todo_rates.values()):
        jobs, where = [], []
        for k, rates in todo_rates.items():
            for lr in rates:
                rec = candidate_recipe(gs[k].recipe, lr, spec)
                d = folder / fingerprint(rec)[:12]
                where.append((k, lr, d))
                if not (d / "cell.json").is_file():
                    jobs.append({"recipe": rec, "cell_dir": str(d), "shared": str(out / "shared"),
                                 "axes": {"pilot": gs[k].label, "heal.lr": lr}})
        if jobs:
            log(f"pilot: {len(jobs)} candidate{'s' if len(jobs) > 1 else ''} ({spec.steps} steps each)")
            for r in mapper(jobs):
                if not r["ok"]:  # a diverged candidate is a result too: a re-launch does not run it again
                    write_json(folder / r["key"] / "cell.json", r)
        for k, lr, d in where:
            rec = read_json(d / "cell.json") if (d / "cell.json").is_file() else {}
            h = rec.get("heal") or {}
            gs[k].losses[lr] = h.get("final_val_loss")
            gs[k].val_before = h.get("val_loss_before", gs[k].val_before)
            if rec:  # only the record (and run.log) is kept; the shared stages stay in OUT/shared
                shutil.rmtree(d / "run", ignore_errors=True)
        todo_rates = {k: [nxt] for k, g in gs.items()
                      if k not in recorded and (nxt := g.next_rate(spec)) is not None}
    chosen: dict[str, float | None] = {k: recorded.get(k, g.best()) for k, g in gs.items()}
    write_pilot(out, gs, spec, chosen, set(recorded))
    for k, g in gs.items():
        log(f"pilot {g.label}: " + (f"lr {chosen[k]:g}" if chosen[k] is not None else "every candidate failed"))
    return chosen


def write_pilot(out: Path, gs: dict[str, Group], spec: PilotSpec, chosen: dict[str, float | None],
                recorded: set[str]) -> None:
    """Add these groups' results to ``OUT/pilot.json`` (a launch with fewer cells keeps the others' choices)."""
    old = read_json(out / PILOT_FILE).get("groups", {}) if (out / PILOT_FILE).is_file() else {}
    new = {k: {"label": g.label, "cells": g.cells, "val_loss_before": g.val_before, "chosen": chosen[k],
               "recorded": k in recorded, "losses": {f"{lr:g}": v for lr, v in sorted(g.losses.items())}}
           for k, g in gs.items()}
    write_json(out / PILOT_FILE, {"scope": spec.scope, "steps": spec.steps, "warmup_steps": spec.warmup_steps,
                                  "groups": {**old, **new}})


def read_choices(out: Path) -> dict[str, float | None]:
    """The choices of a finished pilot (for ``--report``)."""
    p = out / PILOT_FILE
    return {k: g["chosen"] for k, g in read_json(p)["groups"].items()} if p.is_file() else {}


__all__ = ["PILOT_FILE", "Group", "PilotSpec", "candidate_recipe", "groups", "read_choices", "recorded_choices",
           "run_pilot"]
