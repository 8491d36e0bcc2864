"""The sweep's results as a product: one table per group of cells (axes, the pilot's learning rate, final PPL ±
stderr, Avg Acc ± stderr over the tasks, each task group such as MMLU beside it, KL and top-1 agreement with
dense, parameters, wall time), the perplexity protocol card, the learning-rate pilot's candidates and choices,
the work the cells shared, the comparisons the sweep file asks for with the noise rule's verdicts, a plot of
accuracy against perplexity and one of the validation curves per healing method. Written to ``OUT/sweep.md``,
``sweep.json``, ``sweep.png`` and ``sweep-curves.png``.

Noise rule: a difference is within noise when it is smaller than twice the combined standard error
``sqrt(se1² + se2²)``; for perplexity it is applied to log-perplexity (the mean NLL, whose stderr is
``ppl_stderr / ppl``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..io import read_json, write_json, write_text
from ..run_manifest import DENSE, STAGES
from .pilot import PILOT_FILE
from .spec import Sweep, recipe_value

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


def _accuracy(stage: dict[str, Any]) -> dict[str, Any]:
    """Avg Acc ± stderr over the single tasks (their stderrs combined as for a mean of independent estimates);
    each task group (MMLU) on its own, as the paper reports it."""
    tasks = stage.get("zero_shot") or {}
    single = [t for t in tasks.values() if t.get("kind") != "group" and t.get("acc") is not None]
    out: dict[str, Any] = {"groups": {name: (t.get("acc"), t.get("acc_stderr")) for name, t in tasks.items()
                                      if t.get("kind") == "group"}}
    if single:
        n = len(single)
        out["avg"] = sum(t["acc"] for t in single) / n
        out["avg_stderr"] = math.sqrt(sum((t.get("acc_stderr") or 0) ** 2 for t in single)) / n
        out["avg_tasks"] = n
    return out


def _compare(stage: dict[str, Any]) -> tuple[float | None, float | None]:
    for c in (stage.get("compare") or {}).values():
        return c.get("kl_teacher_pruned"), c.get("top1_agreement")
    return None, None


def verdict(diff: float, se: float) -> str:
    """The noise rule on a difference (positive: better) with combined stderr ``se``."""
    return "better" if diff > 2 * se else "worse" if -diff > 2 * se else "within noise"


def changes(ref: dict[str, Any], got: dict[str, Any], stages: Iterable[str] | None = None,
            ref_name: str = "reference") -> list[str]:
    """How results ``got`` differ from ``ref`` (both a cell's ``results``: stage -> ppl / zero_shot) for the
    models in ``stages`` (default: all of ``ref``'s): each perplexity as printed (one decimal) and each accuracy
    exactly, with the noise rule's verdict on the change (perplexity on log-PPL)."""
    out = []
    for stage in stages or ref:
        r, g = ref[stage], got[stage]
        for ds, a in (r.get("ppl") or {}).items():
            b = g["ppl"][ds]
            if round(a["ppl"], 1) != round(b["ppl"], 1):
                out.append(f"{stage} PPL {b['ppl']:.1f} ({ref_name} {a['ppl']:.1f}: {verdict(*_ppl_change(b, a))})")
        for t, a in (r.get("zero_shot") or {}).items():
            b = g["zero_shot"][t]
            if abs(a["acc"] - b["acc"]) > 1e-9:
                se = math.hypot(a.get("acc_stderr") or 0, b.get("acc_stderr") or 0)
                out.append(f"{stage} {t} {b['acc']} ({ref_name} {a['acc']}: {verdict(b['acc'] - a['acc'], se)})")
    return out


def rows(sw: Sweep, out: Path, failed: dict[str, Any]) -> list[dict[str, Any]]:
    table = []
    for c in sw.cells:
        d = out / "cells" / c.key
        rec = read_json(d / CELL_FILE) if (d / CELL_FILE).is_file() else failed.get(c.key)
        row: dict[str, Any] = {"key": c.key, "axes": c.axes, "group": c.group, "status": "not run",
                               "pilot_lr": c.pilot_lr, "method": c.recipe["heal"]["method"]}
        if rec:
            row["status"] = "done" if rec.get("ok") else f"failed: {rec.get('error')}"
            row["seconds"] = rec.get("seconds")
            res = rec.get("results") or {}
            fin = _final(res)
            if fin:
                p, se, ds = _ppl(res[fin])
                acc = _accuracy(res[fin])
                kl, top1 = _compare(res[fin])
                row.update(stage=fin, ppl=p, ppl_stderr=se, ppl_data=ds, avg_acc=acc.get("avg"),
                           avg_acc_stderr=acc.get("avg_stderr"), avg_tasks=acc.get("avg_tasks"),
                           groups=acc["groups"], kl=kl, top1=top1, params=res[fin].get("params"),
                           card=(res[fin].get("ppl") or {}).get(ds, {}).get("card") if ds else None)
            if DENSE in res:
                row["dense_ppl"], _, _ = _ppl(res[DENSE])
                row["dense_avg_acc"] = res[DENSE].get("avg_acc")
        table.append(row)
    return table


def findings(sw: Sweep, table: list[dict[str, Any]]) -> list[str]:
    """Per ``compare`` entry: the baseline value's best cell (lowest PPL) against each other value's best, by
    perplexity and by Avg Acc, with the noise rule's verdicts."""
    out = []
    for cmp in sw.compare:
        axis, base, where, stage = cmp["axis"], cmp["baseline"], cmp.get("where") or {}, cmp.get("stage")
        # The axis and ``where`` are read from the cells' recipes, so a cell that inherits a value counts with it.
        recipes = {c.key: c.recipe for c in sw.cells if all(recipe_value(c.recipe, k) == v for k, v in where.items())}
        by: dict[Any, list[dict[str, Any]]] = {}
        for r in table:
            if r.get("ppl") is not None and r["key"] in recipes and (stage is None or r.get("stage") == stage):
                by.setdefault(_key(recipe_value(recipes[r["key"]], axis)), []).append(r)
        base = _key(base)
        scope = "".join(f", {k}={v}" for k, v in where.items()) + (f", {stage} models" if stage else "")
        if base not in by:
            out.append(f"{axis}: no finished cell with the baseline {base}{scope}")
            continue
        b = min(by[base], key=lambda r: r["ppl"])
        for value, cells in by.items():
            if value == base:
                continue
            best = min(cells, key=lambda r: r["ppl"])
            text = f"{axis}={value} against {axis}={base} (best cell of each{scope}): " + _ppl_verdict(best, b)
            if best.get("avg_acc") is not None and b.get("avg_acc") is not None:
                se = math.hypot(best.get("avg_acc_stderr") or 0, b.get("avg_acc_stderr") or 0)
                diff = best["avg_acc"] - b["avg_acc"]
                text += (f"; Avg Acc {100 * best['avg_acc']:.1f} vs {100 * b['avg_acc']:.1f} ({100 * diff:+.1f} "
                         f"points, 2σ = {200 * se:.1f}): **{verdict(diff, se)}**")
            out.append(text)
    return out


def _key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# What makes two perplexities comparable (the card's other fields, e.g. the tokenizer's path, may differ).
PROTOCOL_KEYS = ("dataset", "split", "preset", "seq_len", "stride", "bos_resolved", "windows", "tokens_scored",
                 "max_tokens", "file_sha256")
NOISE_RULE = "Noise rule: a difference is within noise below 2 × the combined stderr (on log-PPL for perplexity)."


def protocol(row: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """A cell's perplexity protocol (None: no card, e.g. a record from before cards)."""
    card = row.get("card")
    return tuple((k, card[k]) for k in PROTOCOL_KEYS if k in card) if card else None


def _protocol_lines(table: list[dict[str, Any]]) -> list[str]:
    """The perplexity protocol of the cells: stated once when every cell used the same, else each with its
    cells (perplexities under different protocols are not compared)."""
    by: dict[tuple[tuple[str, Any], ...], list[dict[str, Any]]] = {}
    for r in table:
        p = protocol(r)
        if p is not None:
            by.setdefault(p, []).append(r)
    text = [", ".join(f"{k} {v}" for k, v in p) for p in by]
    if len(by) == 1:
        return ["", f"Perplexity protocol card (the same for every cell; each cell's full card is in its "
                    f"eval.json): {text[0]}. {NOISE_RULE}"]
    if not by:
        return ["", NOISE_RULE]
    return ["", f"**The cells' perplexity protocols differ** ({len(by)} protocols): perplexities under different "
                "protocols are not comparable, and the findings do not compare them.", "",
            *[f"- {t}: {'; '.join(_label(r) for r in rs)}" for t, rs in zip(text, by.values())], "", NOISE_RULE]


def _label(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in row["axes"].items()) or "base"


def _ppl_verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Perplexity of ``a`` against ``b`` by the noise rule on log-perplexity."""
    if protocol(a) and protocol(b) and protocol(a) != protocol(b):
        return f"PPL {a['ppl']:.4g} vs {b['ppl']:.4g}: **not comparable** (different perplexity protocols)"
    return (f"PPL {a['ppl']:.4g} vs {b['ppl']:.4g} (ratio {a['ppl'] / b['ppl']:.2f}): "
            f"**{verdict(*_ppl_change(a, b))}**")


def _ppl_change(new: dict[str, Any], old: dict[str, Any]) -> tuple[float, float]:
    """How much lower ``new``'s perplexity is than ``old``'s on log-PPL (positive: better), and its stderr."""
    se = math.hypot((new.get("ppl_stderr") or 0) / new["ppl"], (old.get("ppl_stderr") or 0) / old["ppl"])
    return math.log(old["ppl"]) - math.log(new["ppl"]), se


def write_report(sw: Sweep, out: Path, failed: dict[str, Any], wall: float | None, executor: str) -> dict[str, Any]:
    table = rows(sw, out, failed)
    shared = _shared_counts([out / "cells" / c.key for c in sw.cells])
    stated = findings(sw, table)
    summary = {"name": sw.name, "executor": executor, "wall_s": wall, "cells": table, "shared_work": shared,
               "findings": stated}
    write_json(out / "sweep.json", summary)
    lines = [f"# Sweep: {sw.name}", "", f"{len(table)} cells, executor {executor}"
             + (f", wall time {wall:.0f} s" if wall is not None else "")
             + ". A blank in an axis column: the cell keeps the base recipe's value.", ""]
    dense = next((r.get("dense_ppl") for r in table if r.get("dense_ppl") is not None), None)
    if dense is not None:
        lines += [f"Dense model: PPL {dense:.4g}", ""]
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in table:
        by_group.setdefault(r["group"], []).append(r)
    for group, cells in by_group.items():
        if len(by_group) > 1:
            lines += [f"## {group}", ""]
        axes = [a for a in sw.axes if any(a in r["axes"] for r in cells)]
        # An axis every row of the table sets to one value is said once above it, not repeated in a column.
        same = [a for a in axes if len(cells) > 1 and len({repr(r["axes"].get(a, "<unset>")) for r in cells}) == 1]
        if same:
            lines += ["Every cell here: " + ", ".join(f"{a}={cells[0]['axes'][a]}" for a in same) + ".", ""]
        lines += [*_table([a for a in axes if a not in same], cells), ""]
    lines += _protocol_lines(table)
    pilot = read_json(out / PILOT_FILE) if sw.pilot and (out / PILOT_FILE).is_file() else None
    if pilot:
        summary["pilot"] = pilot
        lines += ["", *_pilot_lines(pilot)]
    if shared:
        lines += ["", "## Work shared between cells", "", "| stage | computed | reused |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['computed']} | {v['shared']} |" for k, v in sorted(shared.items())]
    if stated:
        lines += ["", "## Findings", "", *[f"- {f}" for f in stated]]
    png = _plot(table, out / "sweep.png")
    if png:
        lines += ["", "![accuracy against perplexity](sweep.png)"]
    if _plot_curves(sw, out, out / "sweep-curves.png"):
        lines += ["", "![validation loss during healing, per method](sweep-curves.png)"]
    write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return summary


def _pilot_lines(pilot: dict[str, Any]) -> list[str]:
    """The pilot's candidates and choices, one row per group; says when no rate lowers the starting loss."""
    rates = sorted({float(lr) for g in pilot["groups"].values() for lr in g["losses"]})
    lines = ["## Learning-rate pilot", "",
             f"Each candidate healed {pilot['steps']} steps ({pilot['warmup_steps']} warm-up), scope "
             f"{pilot['scope']}; final validation loss per rate, the lowest chosen.", "",
             "| pilot | cells | val loss before | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
             "|---|---:|---:|" + "---:|" * len(rates) + "---|"]
    notes = []
    for g in pilot["groups"].values():
        losses = {float(k): v for k, v in g["losses"].items()}
        vals = [("failed" if losses[lr] is None else f"{losses[lr]:.4f}") if lr in losses else "" for lr in rates]
        chosen = g["chosen"]
        pick = "–" if chosen is None else f"{chosen:g}" + (" (recorded pilot)" if g.get("recorded") else "")
        lines.append(f"| {g['label']} | {len(g['cells'])} | {_fmt(g.get('val_loss_before'))} | "
                     + " | ".join(vals) + f" | {pick} |")
        before, best = g.get("val_loss_before"), losses.get(chosen) if chosen is not None else None
        if before is not None and best is not None and best >= before:
            notes.append(f"{g['label']}: no rate lowers the validation loss it starts from ({before:.4f}): "
                         "healing at any of these rates makes this model worse on its healing data")
    return lines + (["", *[f"- {n}" for n in notes]] if notes else [])


def _pct(v: float | None, se: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se else "")


def _table(axes: list[str], table: list[dict[str, Any]]) -> list[str]:
    groups = sorted({g for r in table for g in (r.get("groups") or {})})
    n = sorted({r["avg_tasks"] for r in table if r.get("avg_tasks")})
    avg = "Avg Acc %" + (f" ({'/'.join(map(str, n))} tasks)" if n else "")
    compare = any(r.get("kl") is not None for r in table)
    piloted = any(r.get("pilot_lr") is not None for r in table)
    head = [*axes, *(["lr (pilot)"] if piloted else []), "model", "PPL", avg, *(f"{g} %" for g in groups), *(["KL", "top-1 %"] if compare else []),
            "params", "seconds", "status"]
    lead = len(axes) + 1 + piloted
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * lead + "---:|" * (len(head) - lead - 1) + "---|"]
    for r in table:
        cells = [*(str(r["axes"].get(a, "")) for a in axes),
                 *([f"{r['pilot_lr']:g}" if r.get("pilot_lr") is not None else ""] if piloted else []),
                 str(r.get("stage", "–")),
                 _fmt(r.get("ppl"), r.get("ppl_stderr")), _pct(r.get("avg_acc"), r.get("avg_acc_stderr")),
                 *(_pct(*(r.get("groups") or {}).get(g, (None, None))) for g in groups)]
        if compare:
            cells += [_fmt(r.get("kl")), _pct(r.get("top1"), None)]
        cells += [f"{r['params']:,}" if r.get("params") else "–",
                  f"{r['seconds']:.0f}" if r.get("seconds") is not None else "–", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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


def _plot_curves(sw: Sweep, out: Path, path: Path) -> Path | None:
    """Validation loss against step for every healed cell, one panel per healing method."""
    curves: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {}
    for c in sw.cells:
        man = out / "cells" / c.key / "run" / "layerprune.json"
        if not (out / "cells" / c.key / CELL_FILE).is_file() or not man.is_file():
            continue
        hist = (read_json(man).get("heal") or {}).get("log_history") or []
        pts = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
        if len(pts) > 1:
            curves.setdefault(c.recipe["heal"]["method"], []).append((c.label(), pts))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (method, lines) in zip(axs[0], sorted(curves.items())):
        for label, pts in lines:
            ax.plot(*zip(*pts), marker=".", label=label)
        ax.set_title(f"heal.method={method}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["findings", "rows", "verdict", "write_report"]
