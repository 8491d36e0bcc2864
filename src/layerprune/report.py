"""The run report (markdown + self-contained HTML with plots), the model card and the mergekit / llama.cpp exports.

Everything here reads the run manifest (``layerprune.json`` of a run folder, see :func:`write_report` for the
keys it uses). Every section is optional: a key that is missing or malformed drops its section, never the report,
because the report is written at the end of a long job and must not be the thing that fails it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LayerpruneError

STAGES = ("dense", "pruned", "compensated", "healed")
CITATION = """@article{lu2024reassessing,
  title   = {Reassessing Layer Pruning in LLMs: New Insights and Methods},
  author  = {Lu, Yao and Cheng, Hao and Fang, Yujie and Wang, Zeyu and Wei, Jiaheng and Xu, Dongwei and
             Xuan, Qi and Yang, Xiaoniu and Zhu, Zhaowei},
  journal = {arXiv preprint arXiv:2411.15558},
  year    = {2024}
}"""
# The Hub repository the embedded ``default`` model was converted from (for the model card's base_model).
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_MERGEKIT_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                    "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


# --------------------------------------------------------------------------------------------------------------
# A tiny document model rendered to both markdown and HTML, so the two reports can never disagree.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # `backticks` become inline code


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str | None = None


@dataclass
class Image:
    rel: str  # path relative to the run folder (markdown link)
    path: Path  # file on disk (embedded in the HTML)
    alt: str


@dataclass
class Code:
    text: str
    lang: str = ""


Block = Heading | Para | Bullets | Table | Image | Code


@dataclass
class _Doc:
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Table):
            lines = []
            if b.caption:
                lines.append(f"*{b.caption}*\n")
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(b.headers))) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.rel})")
        elif isinstance(b, Code):
            out.append(f"```{b.lang}\n{b.text.rstrip()}\n```")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    parts = re.split(r"`([^`]*)`", text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
code,pre{background:#f6f6f6;font-family:ui-monospace,Menlo,monospace}pre{padding:.8em;overflow-x:auto}
img{max-width:100%;height:auto;border:1px solid #eee}caption{caption-side:top;font-style:italic;text-align:left}
h1{border-bottom:2px solid #ddd}h2{border-bottom:1px solid #eee;margin-top:1.6em}"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A single HTML file: images are embedded as base64 data URIs so the file can be mailed or archived alone."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            cap = f"<caption>{html.escape(b.caption)}</caption>" if b.caption else ""
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b.rows)
            out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"></figure>')
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text.rstrip())}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, strings, bools)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt_count(n: Any) -> str:
    """134515008 -> '134.52M' (parameters, MACs)."""
    v = _num(n)
    if v is None:
        return "–"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def _fmt(x: Any, digits: int = 2) -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.{digits}f}"


def _fmt_pm(x: Any, se: Any, digits: int = 4) -> str:
    v = _num(x)
    if v is None:
        return "–"
    s = _num(se)
    return f"{v:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def _rel(value: Any, ref: Any) -> str:
    v, r = _num(value), _num(ref)
    if v is None or r is None or r == 0:
        return ""
    return f" ({(v - r) / abs(r) * 100:+.1f}%)"


def _fmt_seconds(s: Any) -> str:
    v = _num(s)
    if v is None:
        return "–"
    h, rem = divmod(int(round(v)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _layers(x: Any) -> list[int]:
    if not isinstance(x, (list, tuple)):
        return []
    return [int(i) for i in x if isinstance(i, int) and not isinstance(i, bool)]


def _layer_list(x: Sequence[int]) -> str:
    return "`[" + ", ".join(str(i) for i in x) + "]`"


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


# --------------------------------------------------------------------------------------------------------------
# Manifest accessors
# --------------------------------------------------------------------------------------------------------------


def _model_name(m: dict) -> str:
    return str(m.get("model") or m.get("source_model") or "model")


def _results(m: dict) -> dict[str, dict]:
    res = m.get("results")
    if not isinstance(res, dict):
        return {}
    ordered = [s for s in STAGES if isinstance(res.get(s), dict)]
    ordered += sorted(s for s in res if s not in STAGES and isinstance(res[s], dict))
    return {s: res[s] for s in ordered}


def _metric_scores(m: dict) -> dict[str, dict]:
    """{metric: {"scores": [float|None], ...}}; a bare list of scores is accepted too."""
    raw = m.get("scores")
    out: dict[str, dict] = {}
    if not isinstance(raw, dict):
        return out
    for name, v in raw.items():
        entry = {"scores": v} if isinstance(v, list) else v
        if isinstance(entry, dict) and isinstance(entry.get("scores"), list) and entry["scores"]:
            out[str(name)] = entry
    return out


def _num_layers(m: dict) -> int | None:
    n = m.get("original_num_layers")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    both = _layers(m.get("removed_layers")) + _layers(m.get("kept_layers"))
    return max(both) + 1 if both else None


def _describe_method(m: dict) -> list[str]:
    """Human-readable lines about how the layers were chosen, from the recipe and the scores."""
    recipe = m.get("recipe") if isinstance(m.get("recipe"), dict) else {}
    prune = recipe.get("prune") if isinstance(recipe.get("prune"), dict) else {}
    lines = []
    if recipe.get("name"):
        lines.append(f"Recipe: `{recipe['name']}`")
    metric = prune.get("metric") or m.get("method")
    if metric:
        how = f"Layer selection metric: `{metric}`"
        extras = [f"{k}={prune[k]}" for k in ("ratio", "k", "num_layers", "block", "contiguous", "protect")
                  if k in prune and _scalar(prune[k])]
        lines.append(how + (f" ({', '.join(extras)})" if extras else ""))
    rounds = m.get("rounds")
    if prune.get("iterative") or (isinstance(rounds, list) and len(rounds) > 1):
        n = len(rounds) if isinstance(rounds, list) else None
        lines.append("Iterative pruning" + (f" in {n} rounds" if n else "")
                     + (f", {prune['step']} layer(s) per round" if prune.get("step") else "")
                     + " (scores recomputed after each removal)")
    elif metric:
        lines.append("One-shot pruning (all layers chosen from one scoring pass)")
    scored = list(_metric_scores(m))
    if scored:
        lines.append("Scores computed: " + ", ".join(f"`{s}`" for s in scored))
    return lines


def compensation_table(m: dict) -> Table | None:
    """One row per removed block: where its map was folded and how well it fits the dense residual."""
    comp = m.get("compensation") if isinstance(m.get("compensation"), dict) else None
    if not comp or not isinstance(comp.get("blocks"), list):
        return None
    rows = []
    for b in comp["blocks"]:
        if not isinstance(b, dict):
            continue
        fit = b.get("fit") if isinstance(b.get("fit"), dict) else {}
        rows.append([_layer_list(_layers(b.get("removed"))), f"`{b.get('fold_point')}`", str(b.get("map")),
                     _fmt(fit.get("relative_error_before"), 4), _fmt(fit.get("relative_error_after"), 4),
                     _fmt(fit.get("cosine_before"), 4), _fmt(fit.get("cosine_after", fit.get("alpha")), 4),
                     str(b.get("note") or "")])
    if not rows:
        return None
    return Table(["Removed block", "Fold point", "Map", "Rel. error before", "Rel. error after", "Cosine before",
                  "Cosine after / scale", "Note"], rows,
                 caption=f"Compensation `{comp.get('method')}` ({comp.get('mode')}), fitted on "
                         f"{(comp.get('calibration') or {}).get('source', '?')} calibration windows; relative error "
                         "= ‖residual − dense‖² / ‖dense‖² on the calibration tokens.")


def _describe_heal(m: dict) -> list[str]:
    heal = m.get("heal") if isinstance(m.get("heal"), dict) else {}
    recipe = m.get("recipe") if isinstance(m.get("recipe"), dict) else {}
    rh = recipe.get("heal") if isinstance(recipe.get("heal"), dict) else {}
    if not heal and not rh:
        return []
    method = heal.get("method") or rh.get("method")
    lines = [f"Method: `{method}`"] if method else []
    for key, label in (("layers", "Trained layers"), ("data", "Data"), ("epochs", "Epochs"), ("lr", "Learning rate"),
                       ("lora_r", "LoRA rank")):
        if key in rh and _scalar(rh[key]):
            lines.append(f"{label}: `{rh[key]}`")
    if _num(heal.get("trainable_params")) is not None:
        lines.append(f"Trainable parameters: {fmt_count(heal['trainable_params'])}")
    if _num(heal.get("steps")) is not None:
        lines.append(f"Steps: {int(heal['steps'])}")
    for key, label in (("final_train_loss", "Final train loss"), ("final_val_loss", "Final validation loss")):
        if _num(heal.get(key)) is not None:
            lines.append(f"{label}: {heal[key]:.4f}")
    if _num(heal.get("tokens_per_s")) is not None:
        lines.append(f"Throughput: {heal['tokens_per_s']:.0f} tokens/s")
    if _num(heal.get("wall_s")) is not None:
        lines.append(f"Wall time: {_fmt_seconds(heal['wall_s'])}")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def summary_table(m: dict) -> Table | None:
    """Dense vs pruned vs healed: size, speed, perplexity, Avg Acc; relative change against dense."""
    res = _results(m)
    if not res:
        return None
    stages = list(res)
    dense = res.get("dense", {})
    n_orig, kept = _num_layers(m), _layers(m.get("kept_layers"))
    rows: list[list[str]] = []

    def add(label: str, get: Callable[[str, dict], Any], fmt: Callable[[Any], str], rel: bool = True) -> None:
        vals = [get(s, r) for s, r in res.items()]
        if all(_num(v) is None for v in vals):
            return
        ref = get("dense", dense) if "dense" in res else None
        rows.append([label] + [fmt(v) + (_rel(v, ref) if rel and s != "dense" else "") for s, v in zip(stages, vals)])

    add("Layers", lambda s, r: r.get("num_layers") or (n_orig if s == "dense" else len(kept) or None),
        lambda v: _fmt(v, 0), rel=False)
    add("Parameters", lambda s, r: r.get("params"), fmt_count)
    add("Non-embedding parameters", lambda s, r: r.get("non_embedding_params"), fmt_count)
    add("MACs", lambda s, r: r.get("macs"), fmt_count)
    add("Prefill latency (ms)", lambda s, r: r.get("prefill_ms"), _fmt)
    add("Decode (tokens/s)", lambda s, r: r.get("decode_tok_s"), lambda v: _fmt(v, 1))
    for ds in _ppl_datasets(res):
        add(f"PPL {ds}", lambda s, r, ds=ds: _ppl_value(r, ds), _fmt)
    add("Avg Acc", lambda s, r: _avg_acc(r), lambda v: _fmt(v, 4))
    if not rows:
        return None
    return Table(["", *stages], rows, caption="Relative change against dense in parentheses.")


def _ppl_datasets(res: dict[str, dict]) -> list[str]:
    seen: list[str] = []
    for r in res.values():
        if isinstance(r.get("ppl"), dict):
            seen += [d for d in r["ppl"] if d not in seen]
    return seen


def _ppl_value(r: dict, ds: str) -> Any:
    v = (r.get("ppl") or {}).get(ds) if isinstance(r.get("ppl"), dict) else None
    return v.get("ppl") if isinstance(v, dict) else v


def _avg_acc(r: dict) -> float | None:
    if _num(r.get("avg_acc")) is not None:
        return float(r["avg_acc"])
    zs = r.get("zero_shot")
    if isinstance(zs, dict):
        accs = [_num(t.get("acc")) for t in zs.values() if isinstance(t, dict)]
        accs = [a for a in accs if a is not None]
        if accs:
            return sum(accs) / len(accs)
    return None


# Card keys that define the measurement; the rest (checkpoint path, dtype, model type) legitimately differ
# between dense, pruned and healed and must not raise a protocol warning.
_PROTOCOL_KEYS = ("preset", "dataset", "split", "seq_len", "stride", "overlapping", "bos_resolved", "join",
                  "text_sha256", "tokens_scored", "windows", "max_tokens", "partial")


def _protocol(card: Any) -> Any:
    if not isinstance(card, dict):
        return card
    known = {k: card[k] for k in _PROTOCOL_KEYS if k in card}
    return known or card


def _card_summary(card: Any) -> str:
    card = _protocol(card)
    if not isinstance(card, dict):
        return str(card)
    items = []
    for k, v in card.items():
        if not (_scalar(v) or isinstance(v, list)):
            continue
        if k == "text_sha256" and isinstance(v, str):
            v = v[:12]  # enough to tell texts apart in a table
        if isinstance(v, str) and not v.strip():
            v = repr(v)  # whitespace such as the "\n\n" join must stay visible and on one line
        items.append(f"{k}={_fmt_value(v)}")
    return "; ".join(items)


def ppl_blocks(m: dict) -> list[Block]:
    res = _results(m)
    datasets = _ppl_datasets(res)
    if not datasets:
        return []
    stages = list(res)
    rows = [[ds] + [_fmt(_ppl_value(res[s], ds)) for s in stages] for ds in datasets]
    blocks: list[Block] = [Heading(2, "Perplexity"), Table(["dataset", *stages], rows)]
    cards = []
    for ds in datasets:
        per_stage = {s: res[s]["ppl"][ds].get("card") for s in stages
                     if isinstance(res[s].get("ppl"), dict) and isinstance(res[s]["ppl"].get(ds), dict)
                     and res[s]["ppl"][ds].get("card") is not None}
        if not per_stage:
            continue
        distinct = {json.dumps(_protocol(c), sort_keys=True, default=str) for c in per_stage.values()}
        first = next(iter(per_stage.values()))
        line = f"`{ds}`: {_card_summary(first)}"
        if len(distinct) > 1:  # numbers measured under different protocols are not comparable
            line += " (WARNING: the protocol differs between " + ", ".join(per_stage) + ")"
        cards.append(line)
    if cards:
        blocks += [Para("Protocol (perplexities are comparable only under the same protocol):"), Bullets(cards)]
    return blocks


def zero_shot_blocks(m: dict) -> list[Block]:
    res = _results(m)
    tasks: list[str] = []
    for r in res.values():
        if isinstance(r.get("zero_shot"), dict):
            tasks += [t for t in r["zero_shot"] if t not in tasks]
    if not tasks:
        return []
    stages = [s for s in res if isinstance(res[s].get("zero_shot"), dict)]

    def cell(s: str, t: str, key: str) -> str:
        v = res[s]["zero_shot"].get(t)
        return _fmt_pm(v.get(key), v.get(f"{key}_stderr")) if isinstance(v, dict) else "–"

    rows = [[t] + [cell(s, t, "acc") for s in stages] for t in tasks]
    rows.append(["Avg Acc"] + [_fmt(_avg_acc(res[s]), 4) for s in stages])
    blocks: list[Block] = [Heading(2, "Zero-shot accuracy"), Table(["task (acc ± stderr)", *stages], rows)]
    has_norm = any(isinstance(res[s]["zero_shot"].get(t), dict) and _num(res[s]["zero_shot"][t].get("acc_norm"))
                   is not None for s in stages for t in tasks)
    if has_norm:
        nrows = [[t] + [cell(s, t, "acc_norm") for s in stages] for t in tasks]
        blocks.append(Table(["task (acc_norm ± stderr)", *stages], nrows))
    return blocks


# --------------------------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects directly: no pyplot, no global backend state)
# --------------------------------------------------------------------------------------------------------------


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
        colors = ["#d62728" if i in removed else "#4c72b0" for i in xs]
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


def plot_accuracy(res: dict[str, dict], path: Path) -> Path | None:
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
    palette = {"dense": "#4c72b0", "pruned": "#d62728", "compensated": "#ff7f0e", "healed": "#2ca02c"}
    for k, s in enumerate(stages):
        zs = res[s]["zero_shot"]
        vals, errs = [], []
        for t in tasks:
            v = zs.get(t) if isinstance(zs.get(t), dict) else {}
            vals.append(_num(v.get("acc")) or 0.0)
            errs.append(_num(v.get("acc_stderr")) or 0.0)
        vals.append(_avg_acc(res[s]) or 0.0)
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
# --------------------------------------------------------------------------------------------------------------


def _section_overview(m: dict, run_dir: Path) -> list[Block]:
    removed, kept = _layers(m.get("removed_layers")), _layers(m.get("kept_layers"))
    n = _num_layers(m)
    items = [f"Model: `{_model_name(m)}`"]
    if n:
        items.append(f"Layers: {n} → {len(kept)} ({len(removed)} removed, {len(removed) / n:.1%} of depth)")
    items.append(f"Removed layers (0-based original indices): {_layer_list(removed)}")
    items.append(f"Kept layers: {_layer_list(kept)}")
    items += _describe_method(m)
    return [Heading(2, "Overview"), Bullets(items)]


def _section_summary(m: dict, run_dir: Path) -> list[Block]:
    t = summary_table(m)
    return [Heading(2, "Dense vs pruned vs healed"), t] if t else []


def _section_scores(m: dict, run_dir: Path) -> list[Block]:
    scores = _metric_scores(m)
    if not scores:
        return []
    removed = set(_layers(m.get("removed_layers")))
    n = max(len(e["scores"]) for e in scores.values())
    rows = []
    for i in range(n):
        cells = [_fmt_value(e["scores"][i]) if i < len(e["scores"]) and _num(e["scores"][i]) is not None else "–"
                 for e in scores.values()]
        rows.append([str(i), "yes" if i in removed else ""] + cells)
    blocks: list[Block] = [Heading(2, "Layer scores"), Table(["layer", "removed", *scores], rows)]
    orders = [f"`{k}` removal order: {_layer_list(_layers(e['removal_order']))}" for k, e in scores.items()
              if _layers(e.get("removal_order"))]
    params = [f"`{k}` parameters: `{json.dumps(e['params'], default=str)}`" for k, e in scores.items()
              if isinstance(e.get("params"), dict) and e["params"]]
    if orders or params:
        blocks.append(Bullets(orders + params))
    p = plot_layer_scores(scores, removed, run_dir / "plots" / "layer_scores.png")
    if p:
        blocks.append(Image("plots/layer_scores.png", p, "layer scores per metric"))
    return blocks


def _section_similarity(m: dict, run_dir: Path) -> list[Block]:
    sim = m.get("similarity")
    if not isinstance(sim, dict):
        return []
    removed = _layers(m.get("removed_layers"))
    blocks: list[Block] = []
    for name, matrix in sim.items():
        if not isinstance(matrix, list):
            continue
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))
        p = plot_similarity(matrix, str(name), removed, run_dir / "plots" / f"similarity_{safe}.png")
        if p:
            blocks.append(Image(f"plots/similarity_{safe}.png", p, f"{name} similarity heat map"))
    return [Heading(2, "Layer similarity"), *blocks] if blocks else []


def _section_zero_shot(m: dict, run_dir: Path) -> list[Block]:
    blocks = zero_shot_blocks(m)
    if blocks:
        p = plot_accuracy(_results(m), run_dir / "plots" / "accuracy.png")
        if p:
            blocks.append(Image("plots/accuracy.png", p, "zero-shot accuracy before and after"))
    return blocks


def _section_compensation(m: dict, run_dir: Path) -> list[Block]:
    table = compensation_table(m)
    return [Heading(2, "Compensation"), table] if table else []


def _section_heal(m: dict, run_dir: Path) -> list[Block]:
    lines = _describe_heal(m)
    heal = m.get("heal") if isinstance(m.get("heal"), dict) else {}
    p = None
    if isinstance(heal.get("log_history"), list):
        p = plot_loss(heal["log_history"], run_dir / "plots" / "loss.png")
    if not lines and not p:
        return []
    blocks: list[Block] = [Heading(2, "Healing")]
    if lines:
        blocks.append(Bullets(lines))
    if p:
        blocks.append(Image("plots/loss.png", p, "training and evaluation loss"))
    return blocks


def _section_rounds(m: dict, run_dir: Path) -> list[Block]:
    rounds = [r for r in m.get("rounds") or [] if isinstance(r, dict)] if isinstance(m.get("rounds"), list) else []
    if not rounds:
        return []
    keys: list[str] = []
    for r in rounds:
        keys += [k for k, v in r.items() if k not in ("round", "removed_layers") and k not in keys and _scalar(v)]
    rows = [[str(r.get("round", i + 1)), _layer_list(_layers(r.get("removed_layers"))).strip("`")]
            + [_fmt_value(r[k]) if k in r else "–" for k in keys] for i, r in enumerate(rounds)]
    return [Heading(2, "Iterative rounds"), Table(["round", "removed layers", *keys], rows)]


def _section_timings(m: dict, run_dir: Path) -> list[Block]:
    t = m.get("timings")
    if not isinstance(t, dict):
        return []
    rows = [[str(k), _fmt(v, 1), _fmt_seconds(v)] for k, v in t.items() if _num(v) is not None]
    if not rows:
        return []
    total = sum(_num(v) for v in t.values() if _num(v) is not None)
    rows.append(["total", f"{total:.1f}", _fmt_seconds(total)])
    return [Heading(2, "Timings"), Table(["stage", "seconds", "h:mm:ss"], rows)]


def _section_environment(m: dict, run_dir: Path) -> list[Block]:
    v = m.get("library_versions")
    if not isinstance(v, dict) or not v:
        return []
    return [Heading(2, "Environment"), Table(["package", "version"], [[str(k), str(x)] for k, x in v.items()])]


def _section_recipe(m: dict, run_dir: Path) -> list[Block]:
    r = m.get("recipe")
    if not isinstance(r, dict) or not r:
        return []
    text = yaml.safe_dump(json.loads(json.dumps(r, default=str)), sort_keys=False, allow_unicode=True)
    return [Heading(2, "Recipe"), Code(text, "yaml")]


def _section_exports(m: dict, run_dir: Path) -> list[Block]:
    ex = run_dir / "exports"
    files = [f for f in ("mergekit.yaml", "llama_cpp_prune_layers.txt", "model_card.md", "README.md")
             if (ex / f).is_file()]
    if not files:
        return []
    return [Heading(2, "Exports"), Para("Reproduce the cut outside layerprune (see `exports/README.md`):"),
            Bullets([f"`exports/{f}`" for f in files])]


SECTIONS: list[tuple[str, Callable[[dict, Path], list[Block]]]] = [
    ("overview", _section_overview), ("summary", _section_summary), ("perplexity", lambda m, d: ppl_blocks(m)),
    ("zero-shot", _section_zero_shot), ("scores", _section_scores), ("similarity", _section_similarity),
    ("compensation", _section_compensation), ("healing", _section_heal), ("rounds", _section_rounds), ("timings", _section_timings),
    ("environment", _section_environment), ("recipe", _section_recipe), ("exports", _section_exports),
]


def build_report(run_dir: Path, manifest: dict) -> list[Block]:
    """The report as blocks; plots are written under ``run_dir/plots`` on the way."""
    blocks: list[Block] = [Heading(1, f"layerprune report: {_model_name(manifest)}")]
    for name, fn in SECTIONS:
        try:
            blocks += fn(manifest, run_dir)
        except Exception as e:  # noqa: BLE001 - one bad section must not cost the whole report
            warnings.warn(f"report section '{name}' skipped: {type(e).__name__}: {e}", stacklevel=2)
            blocks.append(Para(f"(section `{name}` skipped: {type(e).__name__}: {e})"))
    return blocks


def _check_manifest(manifest: Any) -> dict:
    if not isinstance(manifest, dict):
        raise LayerpruneError("run manifest must be a JSON object")
    missing = [k for k in ("removed_layers", "kept_layers") if not isinstance(manifest.get(k), list)]
    if not (manifest.get("model") or manifest.get("source_model")):
        missing.insert(0, "model")
    if missing:
        raise LayerpruneError(f"run manifest lacks {', '.join(missing)}")
    return manifest


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(run_dir: str | os.PathLike, manifest: dict) -> dict[str, Path]:
    """Write ``report.md`` (plots as files under ``plots/``) and a self-contained ``report.html`` into ``run_dir``.

    Manifest keys (all optional but ``model``, ``removed_layers``, ``kept_layers``): ``recipe``,
    ``original_num_layers``, ``scores`` ({metric: {scores, direction, removal_order, params}}), ``similarity``
    ({name: LxL matrix}), ``heal`` (method, trainable_params, log_history, steps, final losses, tokens_per_s,
    wall_s), ``results`` ({dense|pruned|healed: params, non_embedding_params, macs, prefill_ms, decode_tok_s,
    ppl {dataset: {ppl, card}}, zero_shot {task: {acc, acc_stderr, acc_norm, acc_norm_stderr}}, avg_acc}),
    ``timings``, ``library_versions``, ``rounds``.

    Returns ``{"report.md": path, "report.html": path, "plots/<name>.png": path, ...}``.
    """
    run_dir = Path(run_dir)
    manifest = _check_manifest(manifest)
    run_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_report(run_dir, manifest)
    out = {"report.md": _write_text(run_dir / "report.md", render_markdown(blocks)),
           "report.html": _write_text(run_dir / "report.html",
                                      render_html(blocks, f"layerprune report: {_model_name(manifest)}"))}
    out.update({b.rel: b.path for b in blocks if isinstance(b, Image)})
    return out


# --------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not Path(s).exists()


def _base_model(m: dict) -> str | None:
    if m.get("base_model"):
        return str(m["base_model"])
    name = _model_name(m)
    if name == "default":
        return DEFAULT_BASE_MODEL
    return name if _looks_like_hub_id(name) else None


def model_card(manifest: dict, repo_id: str | None = None) -> str:
    """A Hugging Face model card (``README.md``) for the pruned / healed checkpoint, with YAML front matter.

    ``repo_id``: where the checkpoint will live, used in the loading example (a placeholder otherwise).
    """
    m = _check_manifest(manifest)
    removed, kept = _layers(m.get("removed_layers")), _layers(m.get("kept_layers"))
    n = _num_layers(m)
    base = _base_model(m)
    front: dict[str, Any] = {}
    if base:
        front["base_model"] = base
    front.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                  "tags": ["layerprune", "pruned", "depth-pruning"]})
    name = _model_name(m)
    parts = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {Path(name).name if not base else base.split('/')[-1]}, depth-pruned with layerprune", ""]
    parts.append(f"This model is `{base or name}` with {len(removed)} of its {n or '?'} decoder layers removed "
                 f"({len(kept)} remain). It is a plain `transformers` checkpoint: no custom code, the layer count "
                 "and per-layer config entries already match the remaining layers.\n")
    parts += ["## What was removed", "",
              f"- Removed layers (0-based indices in the original model): `{removed}`",
              f"- Kept layers, in order: `{kept}`"]
    if n:
        parts.append(f"- Depth: {n} → {len(kept)} ({len(removed) / n:.1%} removed)")
    parts.append("")
    method = _describe_method(m)
    if method:
        parts += ["## Method", "", *[f"- {x}" for x in method], ""]
    ct = compensation_table(m)
    if ct:
        parts += ["## Compensation", "", render_markdown([ct]).rstrip(), ""]
    heal = _describe_heal(m)
    parts += ["## Healing", ""] + ([f"- {x}" for x in heal] if heal else ["No healing (fine-tuning) after pruning."])
    parts.append("")
    table = summary_table(m)
    zs = zero_shot_blocks(m)
    if table or zs:
        parts += ["## Results", ""]
        if table:
            parts += [render_markdown([table]).rstrip(), ""]
        if zs:
            parts += [render_markdown(zs[1:]).rstrip(), ""]
    load_id = repo_id or "PATH_OR_REPO_ID"
    parts += ["## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{load_id}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")',
              'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}],',
              '                                       add_generation_prompt=True, return_tensors="pt",',
              '                                       return_dict=True)',
              "out = model.generate(**inputs, max_new_tokens=64)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", "", "(Use plain `tokenizer(...)` instead of the chat template if the tokenizer has none.)", ""]
    notes = ["Layer indices are 0-based and refer to the original model throughout.",
             "Zero-shot accuracies come from lm-evaluation-harness; Avg Acc is the mean accuracy over the listed "
             "tasks (the paper's summary number)."]
    ppl = ppl_blocks(m)
    for b in ppl:
        if isinstance(b, Bullets):
            notes += [f"Perplexity protocol: {x}" for x in b.items]
    if any(_num(r.get("prefill_ms")) is not None or _num(r.get("decode_tok_s")) is not None
           for r in _results(m).values()):
        notes.append("Latency and throughput depend on the hardware they were measured on; compare ratios, "
                     "not absolute numbers.")
    versions = m.get("library_versions")
    if isinstance(versions, dict) and versions:
        notes.append("Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    parts += ["## Protocol notes", "", *[f"- {x}" for x in notes], ""]
    parts += ["## Citation", "", "The pruning and healing recipes follow Lu et al. (2024), *Reassessing Layer "
              "Pruning in LLMs: New Insights and Methods*, arXiv:2411.15558.", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Exports: mergekit and llama.cpp
# --------------------------------------------------------------------------------------------------------------


def _check_indices(layers: Iterable[Any], what: str) -> list[int]:
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise LayerpruneError(f"{what} must be non-negative integers, got {i!r}")
        out.append(i)
    if len(set(out)) != len(out):
        raise LayerpruneError(f"{what} contain duplicates: {out}")
    return sorted(out)


def contiguous_runs(layers: Sequence[int]) -> list[tuple[int, int]]:
    """[0,1,2,5,6] -> [(0, 3), (5, 7)]: half-open ranges, as mergekit's ``layer_range`` uses."""
    runs: list[tuple[int, int]] = []
    for i in sorted(layers):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def mergekit_yaml(source_model: str, kept_layers: list[int], dtype: str | None = None) -> str:
    """A mergekit ``passthrough`` config that keeps exactly ``kept_layers`` of ``source_model``.

    One slice per contiguous run of kept layers; ``layer_range: [start, end)`` is end-exclusive (mergekit's
    convention), so ``[0, 22]`` keeps layers 0..21.
    """
    kept = _check_indices(kept_layers, "kept layers")
    if not kept:
        raise LayerpruneError("no kept layers: nothing to export")
    dt = None if dtype in (None, "auto") else _MERGEKIT_DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if dtype not in (None, "auto") and dt is None:
        raise LayerpruneError(f"dtype '{dtype}' has no mergekit equivalent (float32, float16, bfloat16)")
    model = json.dumps(str(source_model))  # a JSON string is a valid YAML scalar, whatever the path holds
    lines = [f"# mergekit passthrough config generated by layerprune: keeps layers {kept}",
             "# Run: mergekit-yaml mergekit.yaml OUTPUT_DIR   (layer_range is [start, end), end exclusive)",
             "slices:"]
    for start, end in contiguous_runs(kept):
        lines += ["  - sources:", f"      - model: {model}", f"        layer_range: [{start}, {end}]"]
    lines.append("merge_method: passthrough")
    if dt:
        lines.append(f"dtype: {dt}")
    return "\n".join(lines) + "\n"


def llama_cpp_prune_list(removed_layers: Iterable[int]) -> str:
    """'3,7,11': the 0-based original indices as ``llama-quantize --prune-layers`` takes them."""
    return ",".join(str(i) for i in _check_indices(removed_layers, "removed layers"))


def _export_source(m: dict) -> str:
    name = _model_name(m)
    if name == "default":
        # The embedded model's weights are the GGUF de-quantised into the cache, not the Hub repository's.
        from .models import _DEFAULT_NAME, cache_dir

        return str(cache_dir() / _DEFAULT_NAME)
    return name


def _dtype_of(m: dict) -> str | None:
    recipe = m.get("recipe") if isinstance(m.get("recipe"), dict) else {}
    d = m.get("dtype") or recipe.get("dtype")
    return str(d) if d and str(d).lower().removeprefix("torch.") in _MERGEKIT_DTYPES else None


def write_exports(run_dir: str | os.PathLike, manifest: dict) -> dict[str, Path]:
    """Write ``exports/{mergekit.yaml, llama_cpp_prune_layers.txt, model_card.md, README.md}`` into ``run_dir``."""
    m = _check_manifest(manifest)
    ex = Path(run_dir) / "exports"
    source = _export_source(m)
    removed, kept = _layers(m.get("removed_layers")), _layers(m.get("kept_layers"))
    prune_list = llama_cpp_prune_list(removed)
    out = {"exports/mergekit.yaml": _write_text(ex / "mergekit.yaml", mergekit_yaml(source, kept, _dtype_of(m))),
           "exports/llama_cpp_prune_layers.txt": _write_text(ex / "llama_cpp_prune_layers.txt", prune_list + "\n"),
           "exports/model_card.md": _write_text(ex / "model_card.md", model_card(m))}
    healed = isinstance(m.get("heal"), dict) or isinstance(_results(m).get("healed"), dict)
    readme = [
        "# Exports", "",
        f"Reproduce this cut of `{source}` with other tools. Removed layers (0-based original indices): "
        f"`{prune_list or 'none'}`.", "",
    ]
    if healed:
        readme += ["These files reproduce the *cut* only: the healed (fine-tuned) weights exist only in the "
                   "checkpoint layerprune saved.", ""]
    readme += [
        "## mergekit", "", "From the run folder:", "", "```bash", "mergekit-yaml exports/mergekit.yaml OUTPUT_DIR", "```", "",
        "`layer_range: [start, end)` is end-exclusive, as mergekit reads it. mergekit updates only the layer count "
        "in `config.json`; per-layer config entries (for example `layer_types` or sliding-window schedules) are "
        "copied unchanged, so check them for models that have any. layerprune's own checkpoint slices them.", "",
        "## llama.cpp", "",
        "`llama-quantize --prune-layers` removes blocks from the *unpruned* model while it quantizes, so convert "
        "the dense model first:", "",
        "```bash",
        *([] if Path(source).exists() else [f"layerprune download {source} --out dense-model  # convert needs a folder"]),
        f"python convert_hf_to_gguf.py {source if Path(source).exists() else 'dense-model'} --outtype f16 "
        "--outfile model-f16.gguf",
        f"llama-quantize --prune-layers {prune_list or '<none>'} model-f16.gguf model-pruned-Q8_0.gguf Q8_0",
        "```", "",
        "Options go before the file names. The list (also in `llama_cpp_prune_layers.txt`) uses the same 0-based "
        "indices as the GGUF `blk.N` tensors; the remaining blocks are renumbered.", "",
        "## Model card", "", "`model_card.md` is a Hugging Face `README.md` for the saved checkpoint.", "",
    ]
    out["exports/README.md"] = _write_text(ex / "README.md", "\n".join(readme))
    return out


__all__ = ["CITATION", "contiguous_runs", "fmt_count", "llama_cpp_prune_list", "mergekit_yaml", "model_card",
           "render_html", "render_markdown", "summary_table", "write_exports", "write_report"]
