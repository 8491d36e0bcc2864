"""Every plot layerprune draws (score plots, the report's plots), with matplotlib's object API (no pyplot
state, no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .run_manifest import STAGES

# --------------------------------------------------------------------------------------------------------------


def finite(x: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, strings, bools)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


_num = finite


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    os.replace(tmp, path)
    return path


def plot_layer_scores(scores: dict[str, dict], removed: Iterable[int], path: Path) -> Path | None:
    """One bar chart per metric over original layer indices; removed layers in red."""
    if not scores:
        return None
    removed = set(removed)
    fig = _figure(9, 1.0 + 2.0 * len(scores))
    axes = fig.subplots(len(scores), 1, squeeze=False)[:, 0]
    for ax, (name, entry) in zip(axes, scores.items()):
        vals = [_num(v) for v in entry["scores"]]
        xs = list(range(len(vals)))
        red = removed | set(entry.get("selected") or [])  # scores.json marks each metric's own selection
        colors = ["#d62728" if i in red else "#4c72b0" for i in xs]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], color=colors)
        for i, v in enumerate(vals):
            if v is None:  # e.g. a layer already removed in an earlier iterative round
                ax.text(i, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="#777")
        direction = str(entry.get("direction", "higher_is_more_important")).replace("_", " ")
        ax.set_title(f"{name}  ({direction}; red = removed)", fontsize=10)
        ax.set_xticks(xs[:: max(1, len(xs) // 40)])  # stay legible for 80-layer models
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlim(-0.6, len(xs) - 0.4)
    axes[-1].set_xlabel("original layer index (0-based)")
    return _save(fig, path)


def plot_similarity(matrix: list[list[float]], name: str, removed: Iterable[int], path: Path) -> Path | None:
    """Layer-by-layer similarity heat map (0..1, the seed's coolwarm scale); removed layers' ticks in red."""
    n = len(matrix)
    if n == 0 or any(not isinstance(r, list) or len(r) != n for r in matrix):
        return None
    data = [[_num(v) if _num(v) is not None else float("nan") for v in row] for row in matrix]
    removed = set(removed)
    fig = _figure(6.2, 5.2)
    ax = fig.subplots()
    im = ax.imshow(data, cmap="coolwarm", vmin=0.0, vmax=1.0, origin="upper")
    fig.colorbar(im, ax=ax, shrink=0.85)
    ax.set_title(f"{name} between layer outputs")
    step = max(1, n // 32)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks], fontsize=7, rotation=90)
    ax.set_yticklabels([str(t) for t in ticks], fontsize=7)
    for lab in list(ax.get_xticklabels()) + list(ax.get_yticklabels()):
        if int(lab.get_text()) in removed:
            lab.set_color("#d62728")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    return _save(fig, path)


def plot_accuracy(res: dict[str, dict], path: Path, avg: dict[str, float | None] | None = None) -> Path | None:
    """Grouped bars per task (and Avg Acc) for each stage, with stderr error bars."""
    stages = [s for s in res if isinstance(res[s].get("zero_shot"), dict)]
    tasks: list[str] = []
    for s in stages:
        tasks += [t for t in res[s]["zero_shot"] if t not in tasks]
    if not tasks:
        return None
    labels = tasks + ["Avg Acc"]
    fig = _figure(max(6.0, 1.0 + 0.9 * len(labels)), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(stages)
    palette = dict(zip(STAGES, ("#4c72b0", "#d62728", "#ff7f0e", "#2ca02c"), strict=True))
    for k, s in enumerate(stages):
        zs = res[s]["zero_shot"]
        vals, errs = [], []
        for t in tasks:
            v = zs.get(t) if isinstance(zs.get(t), dict) else {}
            vals.append(_num(v.get("acc")) or 0.0)
            errs.append(_num(v.get("acc_stderr")) or 0.0)
        vals.append((avg or {}).get(s) or 0.0)
        errs.append(0.0)
        xs = [i + (k - (len(stages) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=s, color=palette.get(s))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Zero-shot accuracy")
    return _save(fig, path)


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """Training and evaluation loss against optimizer step (HF Trainer ``log_history`` entries)."""
    train = [(e["step"], e["loss"]) for e in log_history if isinstance(e, dict)
             and _num(e.get("step")) is not None and _num(e.get("loss")) is not None]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if isinstance(e, dict)
             and _num(e.get("step")) is not None and _num(e.get("eval_loss")) is not None]
    if not train and not evals:
        return None
    fig = _figure(7, 3.6)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4c72b0", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728", lw=1.2, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Healing loss")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# Sections


def plot_score_heatmaps(data: dict[str, Any], path: Path) -> Path | None:
    """``layerprune score``'s heat maps: linear CKA between layer outputs, and angular distance d(start, block
    size), one panel each, from a scores.json dict."""
    import numpy as np

    panels = []
    for name, m in data["metrics"].items():
        if m.get("extra", {}).get("matrix") is not None:
            panels.append((f"{name}: linear CKA of layer outputs", np.array(m["extra"]["matrix"], dtype=float),
                           "layer", "layer", m["extra"].get("matrix_layers")))
        if m.get("block_scores"):
            sizes = sorted(int(s) for s in m["block_scores"])
            starts = [i for i in range(data["num_layers"]) if m["block_scores"][str(sizes[0])][i] is not None]
            arr = np.full((len(starts), len(sizes)), np.nan)
            for c, s in enumerate(sizes):
                for r, a in enumerate(starts):
                    v = m["block_scores"][str(s)][a]
                    arr[r, c] = np.nan if v is None else float(v)
            panels.append((f"{name}: distance(start, block size)", arr, "block size n", "start layer", starts))
    if not panels:
        return None
    fig = _figure(5.2 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, arr, xl, yl, labels) in zip(axes[0], panels):
        im = ax.imshow(arr, cmap="coolwarm", aspect="auto", origin="lower")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if labels is not None and len(labels) == arr.shape[0]:
            step = max(1, len(labels) // 16)
            ax.set_yticks(range(0, len(labels), step))
            ax.set_yticklabels([str(v) for v in labels[::step]], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_frontier(result: dict[str, Any], path: Path) -> Path | None:
    """Held-out perplexity (log scale) against parameters, one line per metric, the dense model as a star."""
    rows = result.get("rows") or []
    if not rows:
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    def line(r: dict) -> str:
        return r["metric"] + (f" + {r['compensation']}" if r.get("compensation") else "")

    for name in dict.fromkeys(line(r) for r in rows):
        pts = sorted((r["params"] / 1e6, r["ppl"]) for r in rows if line(r) == name and _num(r["ppl"]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle="--" if " + " in name else "-")
    d = result.get("dense") or {}
    if _num(d.get("ppl")):
        ax.plot([d["params"] / 1e6], [d["ppl"]], marker="*", markersize=12, color="black", linestyle="",
                label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("held-out calibration perplexity")
    ax.set_title("quality against size (no healing)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_search(rec: dict[str, Any], path: Path) -> Path | None:
    """Left: every candidate's size against its proxy KL to dense (hollow: with compensation), the seed's
    reverse cut in red, the winner as a star. Right: proxy KL against KL after the probe's short heal."""
    rows = rec.get("candidates") or []
    if not rows:
        return None
    probes = rec.get("probes") or []
    fig = _figure(11 if probes else 7, 4.5)
    axes = fig.subplots(1, 2 if probes else 1)
    ax = axes[0] if probes else axes
    # Equal-size candidates (uniform layers) would stack on one vertical line: spread them by proxy rank.
    by_size = len({r["params"] for r in rows}) > 1

    def x(r: dict) -> float:
        return r["params"] / 1e6 if by_size else r["proxy_rank"]

    ax.scatter([x(r) for r in rows], [r["plain"]["kl"] for r in rows], s=18, color="tab:blue",
               label="candidate (no compensation)")
    comp = [r for r in rows if r.get("compensated")]
    if comp:
        ax.scatter([x(r) for r in comp], [r["compensated"]["kl"] for r in comp], s=30,
                   facecolors="none", edgecolors="tab:blue", label=f"with {rec['config']['compensation']}")
    rev = rec.get("reverse")
    if rev:
        ax.scatter([x(rev)], [rev["best"]["kl"]], s=60, color="tab:red", marker="s", label="reverse (the seed's cut)")
    w = rec["winner"]
    wr = next(r for r in rows if r["removed"] == w["removed"])
    ax.scatter([x(wr)], [wr["best"]["kl"]], s=200, color="gold", edgecolors="black", marker="*",
               zorder=5, label="winner: " + ", ".join(w["sources"][:2]))
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)" if by_size else
                  f"candidate, by proxy rank (all {rows[0]['params'] / 1e6:.2f}M parameters)")
    ax.set_ylabel("held-out KL(dense ‖ cut), per token")
    ax.set_title(f"candidates for {rec['target']} (k = {rec['k']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if probes:
        bx = axes[1]
        for p in probes:
            r = next(c for c in rows if c["removed"] == p["removed"])
            bx.scatter([r["best"]["kl"]], [p["kl"]], s=40, color="gold" if p["removed"] == w["removed"] else "tab:blue",
                       edgecolors="black")
            bx.annotate(f"{p['sources'][0]} (proxy {p['proxy_rank']}, probe {p['probe_rank']})",
                        (r["best"]["kl"], p["kl"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        bx.set_xlabel("proxy KL (no training)")
        bx.set_ylabel(f"KL after {probes[0]['steps']} probe steps")
        bx.set_title("probe: does the proxy's order hold after healing?")
        bx.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_stability(st: dict[str, Any], path: Path) -> Path | None:
    """Per metric: each layer's mean rank with its 90% bootstrap interval (0 = removed first), the stable set
    in red; then Kendall's tau between metrics (and between calibration sources of the first metric)."""
    metrics = st.get("metrics") or {}
    if not metrics:
        return None
    tau_src = st.get("kendall_tau_sources") or {}
    n_src = len(st.get("sources") or [])
    extra = 1 + (1 if n_src > 1 else 0)
    fig = _figure(9, 2.2 * len(metrics) + 3.2)
    grid = fig.add_gridspec(len(metrics) + 1, max(extra, 1), height_ratios=[1.0] * len(metrics) + [1.5])
    for row, (name, m) in enumerate(metrics.items()):
        ax = fig.add_subplot(grid[row, :])
        mean = m["mean_rank"]
        lo = [mean[i] - iv[0] for i, iv in enumerate(m["rank_interval_90"])]
        hi = [iv[1] - mean[i] for i, iv in enumerate(m["rank_interval_90"])]
        stable = set(m["stable_set"])
        xs = list(range(len(mean)))
        for color, sel in (("#d62728", [i for i in xs if i in stable]), ("#4c72b0", [i for i in xs if i not in stable])):
            if sel:
                ax.errorbar(sel, [mean[i] for i in sel], yerr=[[lo[i] for i in sel], [hi[i] for i in sel]],
                            fmt="o", color=color, markersize=4, capsize=2)
        ax.set_title(f"{name}: rank (0 = removed first), 90% interval over {st['resamples']} resamples; red = "
                     f"stable set at k={st['k']}", fontsize=9)
        ax.set_xticks(xs[:: max(1, len(xs) // 40)])
    labels = st["kendall_tau_metrics"]["metrics"]
    ax = fig.add_subplot(grid[len(metrics), 0])
    im = ax.imshow(st["kendall_tau_metrics"]["matrix"], vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title("Kendall tau between metrics", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    if n_src > 1:
        first = next(iter(tau_src))
        ax2 = fig.add_subplot(grid[len(metrics), 1])
        names = [str(x)[-18:] for x in st["sources"]]
        ax2.imshow(tau_src[first], vmin=-1, vmax=1, cmap="RdBu")
        ax2.set_xticks(range(n_src), names, rotation=45, fontsize=7)
        ax2.set_yticks(range(n_src), names, fontsize=7)
        ax2.set_title(f"Kendall tau between calibration sources ({first})", fontsize=9)
    return _save(fig, path)
