"""The report's sections in order, and ``write_report``."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..io import write_text
from ..plots import plot_accuracy, plot_layer_scores, plot_loss, plot_similarity
from ..run_manifest import RunManifest
from .document import Block, Bullets, Code, Heading, Image, Para, Table, render_html, render_markdown
from .format import _dict, _fmt, _fmt_seconds, _fmt_value, _layer_list, _layers, _num, _scalar
from .tables import (
    _avg_acc,
    _check_manifest,
    _describe_heal,
    _describe_method,
    _metric_scores,
    _model_name,
    _num_layers,
    _results,
    compensation_table,
    ppl_blocks,
    summary_table,
    zero_shot_blocks,
)

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


def _section_selection(m: dict, run_dir: Path) -> list[Block]:
    """The budget target that chose k, and how stable the ranking is."""
    blocks: list[Block] = []
    t = m.get("target")
    if isinstance(t, dict):
        tt = t.get("target")
        text = tt.get("text") if isinstance(tt, dict) else tt
        blocks += [Heading(2, "Budget target"),
                   Para(f"Target `{text}`: met with {len(_layers(m.get('removed_layers')))} layers removed "
                        f"(value {_fmt_value(t.get('value'))}, dense {_fmt_value(t.get('dense_value'))}).")]
    st = m.get("stability")
    if isinstance(st, dict) and isinstance(st.get("metrics"), dict):
        rows = [[name, _layer_list(_layers(e.get("stable_set"))), _layer_list(_layers(e.get("uncertain"))),
                 str(e.get("cost", ""))] for name, e in st["metrics"].items()]
        blocks += [Heading(2, "Ranking stability"),
                   Para(f"{st.get('resamples')} bootstrap resamples of the calibration windows (seed "
                        f"{st.get('seed')}), k = {st.get('k')}: the stable set is removed in at least "
                        f"{_fmt_value(st.get('stable_threshold'))} of them."),
                   Table(["metric", "stable set", "uncertain", "cost"], rows)]
        from ..plots import plot_stability

        p = plot_stability(st, run_dir / "plots" / "stability.png")
        if p:
            blocks.append(Image("plots/stability.png", p, "rank intervals and Kendall tau"))
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
        res = _results(m)
        p = plot_accuracy(res, run_dir / "plots" / "accuracy.png", {s: _avg_acc(r) for s, r in res.items()})
        if p:
            blocks.append(Image("plots/accuracy.png", p, "zero-shot accuracy before and after"))
    return blocks


def _section_generative(m: dict, run_dir: Path) -> list[Block]:
    """Generative tasks (exact match) and greedy agreement with the dense model, next to the MC results."""
    res = _results(m)
    blocks: list[Block] = []
    gen_tasks = sorted({t for r in res.values() for t in (r.get("generative") or {})})
    if gen_tasks:
        rows = [[stage] + [_fmt_value((r.get("generative") or {}).get(t, {}).get("exact_match")) for t in gen_tasks]
                for stage, r in res.items() if r.get("generative")]
        blocks += [Heading(2, "Generative evaluation"),
                   Para("Exact match after lm-eval's strict answer extraction (generate_until, greedy)."),
                   Table(["model", *gen_tasks], rows)]
    agree = {stage: r["generation"] for stage, r in res.items() if isinstance(r.get("generation"), dict)}
    if agree:
        first = next(iter(agree.values()))
        blocks += [Heading(2 if not gen_tasks else 3, "Generation agreement with the dense model"),
                   Para(f"Greedy continuations ({first.get('new_tokens')} tokens) of {first.get('prompts')} held-out "
                        "instructions; ROUGE-L F1 of the model's text against the dense model's."),
                   Table(["model", "exact match", "common prefix [tokens]", "ROUGE-L"],
                         [[stage, _fmt_value(g.get("exact_match")), _fmt_value(g.get("mean_common_prefix_tokens")),
                           _fmt_value(g.get("rouge_l"))] for stage, g in agree.items()])]
        for stage, g in agree.items():
            for smp in (g.get("samples") or [])[:2]:
                blocks.append(Bullets([f"**{stage}** — prompt: {smp.get('prompt', '')[:200]!r}",
                                       f"dense: {smp.get('dense', '')[:300]!r}",
                                       f"{stage}: {smp.get('pruned', '')[:300]!r}"]))
    return blocks


def _section_compensation(m: dict, run_dir: Path) -> list[Block]:
    table = compensation_table(m)
    return [Heading(2, "Compensation"), table] if table else []


def _section_heal(m: dict, run_dir: Path) -> list[Block]:
    lines = _describe_heal(m)
    heal = _dict(m.get("heal"))
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
    total = sum(x for x in (_num(v) for v in t.values()) if x is not None)
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


def _section_search(m: dict, run_dir: Path) -> list[Block]:
    """The search stage: every candidate's proxy (and probe) numbers, the winner and why, the seed's cut."""
    f = run_dir / "search" / "search.json"
    if not f.is_file():
        return []
    rec = json.loads(f.read_text(encoding="utf-8"))
    probes = {tuple(p["removed"]): p for p in rec.get("probes") or []}
    shown = [r for r in rec["candidates"] if r["proxy_rank"] <= 10 or "reverse" in r["sources"]]
    rows = []
    for r in shown:
        p = probes.get(tuple(r["removed"]))
        comp = r.get("compensated")
        rows.append([str(r["proxy_rank"]), ", ".join(r["sources"]), _layer_list(r["removed"]),
                     f"{r['plain']['kl']:.4f}", f"{r['plain']['ppl']:.1f}", f"{comp['kl']:.4f}" if comp else "–",
                     str(p["probe_rank"]) if p else "–", f"{p['kl']:.4f}" if p else "–",
                     f"{p['agreement']['rouge_l']:.3f}" if p and p.get("agreement") else "–"])
    w = rec["winner"]
    blocks: list[Block] = [
        Heading(2, "Search"),
        Para(f"Target `{rec['target']}`: {rec['k']} of {rec['num_layers']} layers, {len(rec['candidates'])} "
             f"candidates. Winner: {', '.join(w['sources'])} (layers {_layer_list(w['removed'])}"
             f"{', with ' + str(w['compensation']) if w['compensated'] else ''}) — {w['why']}."),
        Table(["proxy rank", "candidate", "removed", "KL", "PPL", "+ comp. KL", "probe rank", "probe KL",
               "probe ROUGE-L"], rows)]
    img = run_dir / "search" / "search.png"
    if img.is_file():
        blocks.append(Image("search/search.png", img, "candidates: size against proxy KL; probe"))
    return blocks


SECTIONS: list[tuple[str, Callable[[dict, Path], list[Block]]]] = [
    ("overview", _section_overview), ("summary", _section_summary), ("perplexity", lambda m, d: ppl_blocks(m)),
    ("zero-shot", _section_zero_shot), ("generative", _section_generative), ("search", _section_search), ("scores", _section_scores), ("selection", _section_selection),
    ("similarity", _section_similarity),
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






def write_report(run_dir: str | os.PathLike, manifest: RunManifest | dict[str, Any]) -> dict[str, Path]:
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
    m = _check_manifest(manifest)
    run_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_report(run_dir, m)
    out = {"report.md": write_text(run_dir / "report.md", render_markdown(blocks)),
           "report.html": write_text(run_dir / "report.html",
                                      render_html(blocks, f"layerprune report: {_model_name(m)}"))}
    out.update({b.rel: b.path for b in blocks if isinstance(b, Image)})
    return out


# --------------------------------------------------------------------------------------------------------------
# Model card
