"""The sweep's results as a product: one table of every cell (axes, final PPL ± stderr, Avg Acc, parameters,
wall time), the work the cells shared, the comparisons the sweep file asks for, and an accuracy-against-
perplexity plot. Written to ``OUT/sweep.md``, ``sweep.json`` and ``sweep.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import read_json, write_json, write_text
from ..run_manifest import DENSE, STAGES
from .spec import Sweep

CELL_FILE = "cell.json"


def _final(results: dict[str, Any]) -> str | None:
    return next((s for s in reversed(STAGES) if s in results and s != DENSE), None)


def _ppl(stage: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
    for ds, v in (stage.get("ppl") or {}).items():
        return v.get("ppl"), v.get("ppl_stderr"), ds
    return None, None, None


def _shared_counts(cell_dirs: list[Path]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for d in cell_dirs:
        state = d / "run" / "state.json"
        if not state.is_file():
            continue
        for name, st in read_json(state).get("stages", {}).items():
            c = counts.setdefault(name, {"computed": 0, "shared": 0})
            c["shared" if st.get("shared") else "computed"] += 1
    return counts


def _fmt(v: float | None, se: float | None = None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}" + (f" ± {se:.2g}" if se else "")


def rows(sw: Sweep, out: Path, failed: dict[str, Any]) -> list[dict[str, Any]]:
    table = []
    for c in sw.cells:
        d = out / "cells" / c.key
        rec = read_json(d / CELL_FILE) if (d / CELL_FILE).is_file() else failed.get(c.key)
        row: dict[str, Any] = {"key": c.key, "axes": c.axes, "status": "missing"}
        if rec:
            row["status"] = "done" if rec.get("ok") else f"failed: {rec.get('error')}"
            row["seconds"] = rec.get("seconds")
            res = rec.get("results") or {}
            fin = _final(res)
            if fin:
                p, se, ds = _ppl(res[fin])
                row.update(stage=fin, ppl=p, ppl_stderr=se, ppl_data=ds, avg_acc=res[fin].get("avg_acc"),
                           params=res[fin].get("params"))
            if DENSE in res:
                row["dense_ppl"], _, _ = _ppl(res[DENSE])
                row["dense_avg_acc"] = res[DENSE].get("avg_acc")
        table.append(row)
    return table


def findings(sw: Sweep, table: list[dict[str, Any]]) -> list[str]:
    """Per ``compare`` entry: the baseline value's best cell against each other value's best (lower PPL)."""
    out = []
    for cmp in sw.compare:
        axis, base = cmp["axis"], cmp["baseline"]
        by: dict[Any, list[dict[str, Any]]] = {}
        for r in table:
            if r.get("ppl") is not None and axis in r["axes"]:
                by.setdefault(r["axes"][axis], []).append(r)
        if base not in by:
            out.append(f"{axis}: no finished cell with the baseline {base}")
            continue
        b = min(by[base], key=lambda r: r["ppl"])
        for value, cells in by.items():
            if value == base:
                continue
            best = min(cells, key=lambda r: r["ppl"])
            se = math.hypot(best.get("ppl_stderr") or 0, b.get("ppl_stderr") or 0)
            diff = b["ppl"] - best["ppl"]
            verdict = ("beats" if diff > 2 * se else "is worse than" if -diff > 2 * se else "ties with")
            out.append(f"{axis}={value} {verdict} {axis}={base}: best PPL {best['ppl']:.4g} vs {b['ppl']:.4g} "
                       f"(difference {diff:+.4g}, 2×stderr {2 * se:.2g})")
    return out


def write_report(sw: Sweep, out: Path, failed: dict[str, Any], wall: float | None, executor: str) -> dict[str, Any]:
    table = rows(sw, out, failed)
    shared = _shared_counts([out / "cells" / c.key for c in sw.cells])
    stated = findings(sw, table)
    summary = {"name": sw.name, "executor": executor, "wall_s": wall, "cells": table, "shared_work": shared,
               "findings": stated}
    write_json(out / "sweep.json", summary)
    lines = [f"# Sweep: {sw.name}", "", f"{len(table)} cells, executor {executor}"
             + (f", wall time {wall:.0f} s" if wall is not None else ""), ""]
    dense = next((r.get("dense_ppl") for r in table if r.get("dense_ppl") is not None), None)
    if dense is not None:
        lines += [f"Dense model: PPL {dense:.4g}", ""]
    axes = sw.axes
    lines += ["| " + " | ".join([*axes, "model", "PPL", "Avg Acc", "params", "seconds", "status"]) + " |",
              "|" + "---|" * len(axes) + "---|---:|---:|---:|---:|---|"]
    for r in table:
        lines.append("| " + " | ".join([*(str(r["axes"].get(a, "")) for a in axes), str(r.get("stage", "–")),
                                        _fmt(r.get("ppl"), r.get("ppl_stderr")), _fmt(r.get("avg_acc"), None, 3),
                                        f"{r['params']:,}" if r.get("params") else "–",
                                        f"{r['seconds']:.0f}" if r.get("seconds") is not None else "–",
                                        r["status"]]) + " |")
    if shared:
        lines += ["", "## Work shared between cells", "", "| stage | computed | reused |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['computed']} | {v['shared']} |" for k, v in sorted(shared.items())]
    if stated:
        lines += ["", "## Findings", "", *[f"- {f}" for f in stated]]
    png = _plot(table, out / "sweep.png")
    if png:
        lines += ["", "![accuracy against perplexity](sweep.png)"]
    write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return summary


def _plot(table: list[dict[str, Any]], path: Path) -> Path | None:
    pts = [r for r in table if r.get("ppl") and r.get("avg_acc") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pts:
        ax.scatter(r["ppl"], r["avg_acc"])
        ax.annotate(", ".join(str(v) for v in r["axes"].values()), (r["ppl"], r["avg_acc"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (final model)")
    ax.set_ylabel("Avg Acc")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["findings", "rows", "write_report"]
