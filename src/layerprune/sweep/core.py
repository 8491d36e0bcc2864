"""Run a sweep: each cell a recipe run in ``OUT/cells/<fingerprint>/``, stage outputs that cells share kept once
in ``OUT/shared/``, then the report (``OUT/sweep.md``, ``sweep.json``, ``sweep.png``).

A cell that finished (``cell.json`` written) is never run again; one that was interrupted resumes where its
recipe run stopped (``--resume``). Cells fail alone: the others go on, the report lists the failure.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import LayerpruneError
from ..io import write_json
from .executors import Executor, make_executor
from .pilot import groups, read_choices, recorded_choices, run_pilot
from .report import CELL_FILE, write_report
from .spec import Cell, Sweep, load_sweep, select

PLAN_FILE = "plan.json"
HEAL_KEYS = ("method", "steps", "val_loss_before", "final_val_loss", "best_step", "wall_s", "tokens_per_s")


def run_cell(recipe: dict[str, Any], cell_dir: str, shared: str, axes: dict[str, Any],
             heal_processes: int = 1) -> dict[str, Any]:
    """Run one cell (in whatever process the executor gives it); returns its record (a failure too): raises
    only on Ctrl-C or SIGTERM, which stop the sweep."""
    out = Path(cell_dir)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "run.log"
    try:
        from ..recipe.runner import run_recipe

        with log_file.open("a") as fh:
            def log(msg: str) -> None:
                fh.write(msg + "\n")
                fh.flush()

            manifest = run_recipe(recipe, out / "run", resume=True, log=log, shared=shared,
                                  heal_processes=heal_processes)
        heal = manifest.get("heal") or {}
        rec = {"key": out.name, "axes": axes, "ok": True, "seconds": round(time.perf_counter() - t0, 1),
               "results": manifest.get("results", {}), "removed_layers": manifest.get("removed_layers"),
               "heal": {k: heal.get(k) for k in HEAL_KEYS} if heal else None}
        write_json(out / CELL_FILE, rec)  # the marker of a finished cell
        return rec
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the sweep stops (the cell resumes on --resume)
        with log_file.open("a") as fh:
            fh.write(traceback.format_exc())
        raise
    except Exception as e:  # noqa: BLE001 - a cell fails alone
        with log_file.open("a") as fh:
            fh.write(traceback.format_exc())
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {"key": out.name, "axes": axes, "ok": False, "error": msg,
                "seconds": round(time.perf_counter() - t0, 1)}


def plan(sw: Sweep, out: Path) -> list[tuple[Cell, Path, bool]]:
    """(cell, folder, finished) for every cell."""
    return [(c, out / "cells" / c.key, (out / "cells" / c.key / CELL_FILE).is_file()) for c in sw.cells]


def sweep(path: str | os.PathLike, out_dir: str | os.PathLike, *, executor: str = "local", workers: int | None = None,
          resume: bool = False, overwrite: bool = False, report_only: bool = False,
          overrides: list[str] | None = None, only: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    """Run (or, with ``report_only``, only report) the sweep in ``path`` into ``out_dir``; returns the summary.
    ``only`` (``KEY=VALUE`` items, :func:`~layerprune.sweep.spec.select`) runs part of the cells (and the pilots
    they need); the report covers every cell, finished or not."""
    from ..io import check_out_dir

    sw = load_sweep(path, overrides)
    selected = select(sw.cells, only)
    chosen = {id(c) for c in selected}  # by identity: a cell's key changes when the pilot gives it its rate
    out = Path(out_dir)
    n_workers = int(workers or sw.executor.get("workers", 1))
    if n_workers < 1:
        raise LayerpruneError("--workers must be >= 1")
    ex = make_executor(executor, sw.executor, n_workers, out)
    if not report_only:
        if out.exists() and not resume and any(out.iterdir()):
            check_out_dir(out, overwrite)  # refuses a non-empty folder without --overwrite
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        failed = _pilot(sw, out, ex, log, {c.key for c in selected})
        cells = [(c, d, done_) for c, d, done_ in plan(sw, out) if c.key not in failed]
        write_json(out / PLAN_FILE, {"name": sw.name, "source": sw.source, "executor": executor,
                                     "cells": [{"key": c.key, "axes": c.axes} for c, _, _ in cells]})
        todo = [(c, d) for c, d, finished in cells if not finished and id(c) in chosen]
        if failed:
            log(f"  {len(failed)} cell(s) not run: their learning-rate pilot failed (see {out / 'pilot'})")
        done = sum(finished for _, _, finished in cells)
        log(f"sweep {sw.name}: {len(cells)} cells, {done} finished, {len(todo)} to run"
            + (f" ({len(selected)} selected by --only)" if only else "")
            + f" ({executor}, {n_workers} worker{'s' if n_workers > 1 else ''})")
        n = heal_processes(sw)
        jobs = [{"recipe": c.recipe, "cell_dir": str(d), "shared": str(out / "shared"), "axes": c.axes,
                 "heal_processes": n} for c, d in todo]
        results = ex.map(run_cell, jobs, _done(log)) if jobs else []
        wall = time.perf_counter() - t0
        failed.update({r["key"]: r for r in results if not r["ok"]})
    else:
        if not (out / PLAN_FILE).is_file():
            raise LayerpruneError(f"{out} holds no sweep (no {PLAN_FILE}): run the sweep first")
        wall = None
        failed = resolve_pilot(sw, out)
    summary = write_report(sw, out, failed, wall, executor)
    return summary


def heal_processes(sw: Sweep) -> int:
    """Processes a cell heals with: ``executor.heal_processes``, else one per GPU a cell is given."""
    return int(sw.executor.get("heal_processes") or max(1, int(sw.executor.get("gpus_per_cell", 0))))


def _done(log: Any) -> Any:
    def done(r: dict[str, Any]) -> None:
        what = ", ".join(f"{k}={v}" for k, v in r["axes"].items()) or "base"
        log(f"  [{'done' if r['ok'] else 'FAILED'}] {what} ({r['seconds']:.0f} s)"
            + ("" if r["ok"] else f": {r['error']}"))

    return done


def _pilot(sw: Sweep, out: Path, ex: Executor, log: Any, keys: set[str]) -> dict[str, Any]:
    """Run the learning-rate pilots of the groups that hold any of the cells ``keys`` (if the sweep file asks for
    pilots) and give those groups' cells their rates; returns the failure records of the cells whose every
    candidate failed (they are not run)."""
    if sw.pilot is None:
        return {}
    gs = {k: g for k, g in groups(sw.cells, sw.pilot).items() if keys & set(g.cells)}
    if not gs:
        return {}
    n = heal_processes(sw)
    chosen = run_pilot(gs, sw.pilot, out, lambda jobs: ex.map(run_cell, [{**j, "heal_processes": n} for j in jobs],
                                                               _done(log)), log)
    return apply_pilot(sw, gs, chosen)


def resolve_pilot(sw: Sweep, out: Path) -> dict[str, Any]:
    """Give the piloted cells the rates of the pilot already run into ``out`` (else the sweep file's recorded
    ones), without running anything; returns the failure records of cells whose pilot found no rate."""
    if sw.pilot is None:
        return {}
    gs = groups(sw.cells, sw.pilot)
    chosen: dict[str, float | None] = {**recorded_choices(sw.pilot, gs), **read_choices(out)}
    return apply_pilot(sw, gs, chosen)


def apply_pilot(sw: Sweep, gs: dict[str, Any], chosen: dict[str, float | None]) -> dict[str, Any]:
    """Give each piloted cell its group's chosen rate; returns failure records for the groups without one."""
    by_cell = {key: k for k, g in gs.items() for key in g.cells}
    failed = {}
    for c in sw.cells:
        k = by_cell.get(c.key)
        if k is None or k not in chosen:
            continue
        if chosen[k] is None:
            failed[c.key] = {"key": c.key, "axes": c.axes, "ok": False, "seconds": 0.0,
                             "error": "learning-rate pilot: every candidate failed (see OUT/pilot/*/run.log)"}
            continue
        c.recipe["heal"]["lr"] = c.pilot_lr = chosen[k]
    return failed


__all__ = ["CELL_FILE", "apply_pilot", "resolve_pilot", "run_cell", "sweep"]
