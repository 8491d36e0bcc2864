"""What the manifest says, as descriptions and tables (summary, perplexity, zero-shot, compensation)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from ..errors import LayerpruneError
from ..run_manifest import STAGES
from .document import Block, Bullets, Heading, Para, Table
from .format import (
    _dict,
    _fmt,
    _fmt_pm,
    _fmt_seconds,
    _fmt_value,
    _layer_list,
    _layers,
    _num,
    _rel,
    _scalar,
    fmt_count,
)

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
    recipe = _dict(m.get("recipe"))
    prune = _dict(recipe.get("prune"))
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
        fit = _dict(b.get("fit"))
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
    heal = _dict(m.get("heal"))
    recipe = _dict(m.get("recipe"))
    rh = _dict(recipe.get("heal"))
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


def summary_table(m: Any) -> Table | None:
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
        add(f"PPL {ds}", functools.partial(lambda s, r, ds: _ppl_value(r, ds), ds=ds), _fmt)
    add("Avg Acc", lambda s, r: _avg_acc(r), lambda v: _fmt(v, 4))
    for ds in sorted({d for r in res.values() for d in (r.get("compare") or {})}):
        for key, label in (("kl_teacher_pruned", "KL(dense‖model)"), ("top1_agreement", "Top-1 agreement")):
            add(f"{label} {ds}", functools.partial(lambda s, r, ds, key: (r.get("compare") or {}).get(ds, {}).get(key),
                                                   ds=ds, key=key), lambda v: _fmt(v, 4), rel=False)
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
    from ..evaluation.harness import avg_acc

    zs = r.get("zero_shot")
    return avg_acc(zs)[0] if isinstance(zs, dict) else None


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

def _check_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise LayerpruneError("run manifest must be a JSON object")
    missing = [k for k in ("removed_layers", "kept_layers") if not isinstance(manifest.get(k), list)]
    if not (manifest.get("model") or manifest.get("source_model")):
        missing.insert(0, "model")
    if missing:
        raise LayerpruneError(f"run manifest lacks {', '.join(missing)}")
    return manifest
