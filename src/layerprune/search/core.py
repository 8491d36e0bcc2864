"""``search``: the best cut for a budget, chosen by evidence. Stages (each resumable from ``OUT.search/``):

1. **candidates** — every metric's cut that meets the target, contiguous blocks, random controls;
2. **proxy** — held-out KL / perplexity of each, and of the best few with a training-free compensation map
   (kept only where it lowers the KL);
3. **probe** — the top few by proxy each healed for a few steps, then ranked by held-out KL (greedy
   generation agreement with the dense model recorded beside it);
4. **final** — the winner healed with the remaining budget (restarted from its unprobed cut by default).

The result is a vanilla checkpoint plus ``layerprune.json`` whose ``search`` section lists every candidate
and why the winner won, ``search.md`` and ``search.png``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch import parts
from ..budget import Sizes, Target
from ..data.calibration import Calibration, CalibSpec, build_calibration
from ..errors import LayerpruneError
from ..io import atomic_dir, check_out_dir, read_json, write_json
from ..models import build_manifest, count_parameters, load, resolve_model
from ..prune import prune_layers
from .candidates import Candidate, collect, cut_key, needed_k
from .config import SearchConfig
from .proxy import FitCapture, Proxy, evaluate_all, fit_maps, rank

SEARCH_FILE = "search.json"
PROBE_VAL_SIZE = 16  # validation rows of a probe's heal (reported, not ranked on)


class _Stages:
    """Stage results under ``OUT.search/NAME.json``, reused when their inputs (a key) are unchanged."""

    def __init__(self, work: Path, base: dict[str, Any]):
        self.work = work
        self.base = base
        work.mkdir(parents=True, exist_ok=True)

    def key(self, name: str, inputs: Any) -> str:
        raw = json.dumps({"stage": name, "base": self.base, "inputs": inputs}, sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def run(self, name: str, inputs: Any, fn: Callable[[], Any]) -> Any:
        f = self.work / f"{name}.json"
        key = self.key(name, inputs)
        if f.is_file():
            saved = read_json(f)
            if saved.get("key") == key:
                return saved["result"]
        result = fn()
        write_json(f, {"key": key, "result": result})
        return result


def split_windows(tok: Any, cfg: SearchConfig, data_dir: str | None) -> tuple[Calibration, Calibration, Calibration]:
    """(scoring, held-out, fitting) windows, each from its own documents (one draw without replacement), so the
    proxy never reads a document that chose or fitted a cut."""
    total = cfg.nsamples + cfg.heldout + cfg.fit_nsamples
    long = max(cfg.seqlen, cfg.fit_seqlen)
    cal = build_calibration(tok, CalibSpec(source=cfg.calib, nsamples=total, seqlen=long, seed=cfg.seed,
                                           data_dir=data_dir))
    a, b = cfg.nsamples, cfg.nsamples + cfg.heldout

    def part(lo: int, hi: int, seqlen: int, name: str) -> Calibration:
        return Calibration(cal.input_ids[lo:hi, :seqlen].contiguous(), cal.attention_mask[lo:hi, :seqlen].contiguous(),
                           {**cal.info, "part": name})

    return part(0, a, cfg.seqlen, "scoring"), part(a, b, cfg.seqlen, "held-out"), part(b, total, cfg.fit_seqlen, "fit")


def _proxy_stage(model: Any, proxy: Proxy, cands: list[Candidate], fit: Calibration, cfg: SearchConfig,
                 progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows with the uncompensated proxy for all, the compensated one for the best few and the reverse cut;
    plus the fits (by candidate key) of those where compensation lowered the KL."""
    from tqdm.auto import tqdm

    from ..compensation.methods import make_method

    rows = evaluate_all(proxy, cands, progress)
    fits: dict[str, Any] = {}
    if cfg.compensation == "none":
        return rank(rows), fits
    method = make_method(cfg.compensation)
    order = sorted(rows, key=lambda r: r["plain"]["kl"])
    chosen = order[:cfg.compensate_top] + [r for r in order[cfg.compensate_top:] if "reverse" in r["sources"]]
    shared = FitCapture(model, fit, cfg.batch_size) if FitCapture.fits_in_memory(model, fit) else None
    for r in tqdm(chosen, desc=f"search: {cfg.compensation}", disable=not progress, leave=False):
        maps, got = fit_maps(model, r["removed"], fit, method, cfg.batch_size, shared)
        if maps is None:
            r["compensation_refused"] = got  # kept, uncompensated, and said so
            continue
        q = proxy.cut(r["removed"], maps)
        r["compensated"] = {**q, "fit": [f.describe(parts(model).adapter) for f in got]}
        if q["kl"] < r["plain"]["kl"]:
            r["best"] = {**q, "compensated": True}
            fits[cut_key(r["removed"])] = Folded(got, method, fit)
    return rank(rows), fits


@dataclass
class Folded:
    """A candidate's compensation as it is written: the fitted maps, the method (``reconstruct`` also trains
    the kept layers beside each block when the cut is written; the proxy ranked it by its lstsq maps) and the
    windows it was fitted on."""

    fits: list[Any]
    method: Any
    calib: Calibration


def materialize(model: Any, tok: Any, source: str, removed: list[int], comp: Folded | None, out_dir: Path,
                info: dict[str, Any]) -> Path:
    """Write the cut (its compensation folded in) as a vanilla checkpoint, from a copy of the loaded model."""
    from ..compensation import fold_and_train
    from ..models import save_pruned

    m = copy.deepcopy(model)
    if comp is not None:
        trained = fold_and_train(m, removed, comp.fits, comp.method, comp.calib, progress=False)
        info = {**info, "compensation": comp.method.name, **({"reconstruct": trained} if trained else {})}
    before = count_parameters(m)
    record = prune_layers(m, removed)
    manifest = build_manifest(source, record, method="search", params=info, params_before=before,
                              params_after=count_parameters(m), mode="in-memory")
    save_pruned(m, tok, out_dir, manifest, overwrite=True, copy_from=resolve_model(source))
    del m
    return out_dir


def _probe_stage(model: Any, tok: Any, source: str, proxy: Proxy, rows: list[dict[str, Any]], fits: dict,
                 heal_cfg: dict[str, Any], steps: int, cfg: SearchConfig, work: Path, data_dir: str | None,
                 prompts: list[str], progress: bool) -> list[dict[str, Any]]:
    """Heal each of the top candidates for ``steps`` steps; held-out KL/PPL and generation agreement after."""
    from ..evaluation.agreement import generation_agreement
    from ..healing import heal
    from ..models import load_model

    out = []
    dense_text: dict[tuple[str, int], list[int]] = {}  # the dense model's continuations, generated once
    for r in rows[:cfg.probe_top]:
        key = cut_key(r["removed"])
        tag = hashlib.sha256(key.encode()).hexdigest()[:8]
        cut = materialize(model, tok, source, r["removed"], fits.get(key), work / f"cut-{tag}",
                          {"search": "probe start", "candidate": r["sources"]})
        t0 = time.perf_counter()
        # The probe is ranked by held-out KL, not by its validation loss: a small validation set keeps the
        # end-of-run evaluation from costing as much as the probe's training.
        res = heal(str(cut), work / f"probe-{tag}", data_dir=data_dir, overwrite=True, progress=progress,
                   checkpoint_dir=str(work / f".probe-{tag}.checkpoints"),
                   **{**heal_cfg, "max_steps": steps, "eval_steps": steps, "save_steps": None, "eval_before": False,
                      "val_size": PROBE_VAL_SIZE})
        secs = time.perf_counter() - t0
        healed = load_model(work / f"probe-{tag}", dtype="float32")
        q = proxy.other(healed)
        agree = generation_agreement(healed, model, tok, prompts, new_tokens=cfg.probe_new_tokens, samples=1,
                                     progress=False, memo=dense_text) if prompts else None
        del healed
        out.append({"removed": r["removed"], "sources": r["sources"], "proxy_rank": r["proxy_rank"],
                    "kl": q["kl"], "ppl": q["ppl"], "val_loss": res.get("final_val_loss"), "steps": steps,
                    "seconds": secs, "seconds_per_step": secs / max(steps, 1),
                    "agreement": agree and {k: agree[k] for k in ("exact_match", "mean_common_prefix_tokens",
                                                                  "rouge_l")},
                    "compensated": key in fits, "cut": str(cut), "healed": str(work / f"probe-{tag}")})
    for i, p in enumerate(sorted(out, key=lambda p: p["kl"])):
        p["probe_rank"] = i + 1
    return sorted(out, key=lambda p: p["probe_rank"])


def _winner(rows: list[dict[str, Any]], probes: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The winning row and why it won."""
    if probes:
        best = probes[0]
        row = next(r for r in rows if r["removed"] == best["removed"])
        flips = [p for p in probes if p["probe_rank"] != p["proxy_rank"]]
        why = (f"lowest held-out KL to dense after a {best['steps']}-step probe ({best['kl']:.4f}, perplexity "
               f"{best['ppl']:.1f}; proxy rank {best['proxy_rank']} of {len(rows)})"
               + (f"; the probe reordered {len(flips)} of {len(probes)} probed candidates" if flips else
                  "; the probe confirmed the proxy's order"))
        return row, why
    row = rows[0]
    return row, f"lowest held-out KL to dense without training ({row['best']['kl']:.4f}; no probe)"


def probe_steps_for(cfg: SearchConfig, heal_cfg: dict[str, Any] | None) -> int:
    """``probe_steps``, else a tenth of the final heal's steps (at least 5; 20 when it runs by epochs)."""
    if cfg.probe_steps:
        return cfg.probe_steps
    final = (heal_cfg or {}).get("max_steps")
    return max(5, int(final) // 10) if final else 20


def search_cut(model: Any, tok: Any, source: str, target: str | Target, cfg: SearchConfig, work: Path, *,
               heal_cfg: dict[str, Any] | None = None, data_dir: str | None = None,
               measure_opts: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Stages 1–3 on a loaded model: returns the search record (``winner``: removed layers, compensated or not,
    and the probe's healed checkpoint). ``heal_cfg`` (HealConfig keyword arguments) is what the probe runs;
    without it the proxy decides."""
    t0 = time.perf_counter()
    tgt = Target.parse(target) if isinstance(target, str) else target
    n = parts(model).num_layers
    max_k = n - 1 - cfg.protect_first - cfg.protect_last
    if max_k < 1:
        raise LayerpruneError("the protected layers leave nothing to remove")
    sizes = Sizes.of(model)
    stages = _Stages(work, {"model": source, "target": tgt.describe(), "search": cfg.to_dict(), "n": n})
    k = stages.run("k", {}, lambda: needed_k(model, tgt, sizes, max_k, measure_opts))
    scoring, held, fit = split_windows(tok, cfg, data_dir)

    def propose() -> dict[str, Any]:
        found, dropped = collect(model, tok, k, scoring, cfg, tgt, sizes, progress)
        return {"candidates": [c.to_dict() for c in found], "dropped": dropped}

    cands_raw = stages.run("candidates", {"k": k, "scoring": scoring.fingerprint}, propose)
    cands = [Candidate(tuple(c["removed"]), c["sources"]) for c in cands_raw["candidates"]]
    if not cands:
        raise LayerpruneError(f"no candidate cut meets {tgt.describe()}")
    t_cand = time.perf_counter() - t0
    # Batches of an eighth of the held-out windows: the successive halving's first round reads one of them.
    proxy = Proxy(model, held, min(cfg.batch_size, max(1, cfg.heldout // 8)))
    rows, fits = _proxy_stage(model, proxy, cands, fit, cfg, progress)
    t_proxy = time.perf_counter() - t0 - t_cand
    probes: list[dict[str, Any]] = []
    if cfg.probe_top and heal_cfg is not None:
        from ..data.instruct import heldout_prompts

        data = str(heal_cfg.get("data", "alpaca"))
        # Self-generated healing text starts from C4 openings: the held-out C4 documents prompt the probe.
        prompts = heldout_prompts("c4" if data.startswith("self:") else data, cfg.probe_prompts,
                                  data_dir=data_dir) if cfg.probe_prompts else []
        steps = probe_steps_for(cfg, heal_cfg)
        probes = stages.run("probe", {"rows": [(r["removed"], r["best"]) for r in rows[:cfg.probe_top]],
                                      "heal": heal_cfg, "steps": steps},
                            lambda: _probe_stage(model, tok, source, proxy, rows, fits, heal_cfg, steps, cfg, work,
                                                 data_dir, prompts, progress))
    row, why = _winner(rows, probes)
    key = cut_key(row["removed"])
    sizes_after = sizes.after(row["removed"])
    rows = [{**r, **sizes.after(r["removed"])} for r in rows]
    return {
        "target": tgt.describe(), "k": k, "num_layers": n, "dense": {**proxy.dense, **sizes.after([])},
        "candidates": rows, "dropped": cands_raw["dropped"],
        "probes": probes,
        "winner": {"removed": row["removed"], "sources": row["sources"], "compensated": key in fits,
                   "compensation": cfg.compensation if key in fits else None, "why": why, **sizes_after,
                   "probe": next((p for p in probes if p["removed"] == row["removed"]), None)},
        "reverse": next((r for r in rows if "reverse" in r["sources"]), None),
        "calibration": {"scoring": scoring.describe(), "heldout": held.describe(), "fit": fit.describe()},
        "seconds": {"candidates": t_cand, "proxy": t_proxy,
                    "probe": sum(p["seconds"] for p in probes), "total": time.perf_counter() - t0},
        "config": cfg.to_dict(), "_fits": fits,
    }


def search(model: str, out_dir: str | Path, target: str, *, config: SearchConfig | None = None,
           heal: dict[str, Any] | None = None, data_dir: str | None = None, dtype: str = "float32",
           device: str | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Search the best cut of ``model`` for ``target`` and heal it (``heal``: HealConfig keyword arguments; None
    skips probe and final heal). Writes a vanilla checkpoint to ``out_dir``; returns the search record."""
    from ..healing import HealConfig

    cfg = config or SearchConfig()
    cfg.validate()
    tgt = Target.parse(target)
    heal_cfg = HealConfig.from_kwargs(**heal).to_dict() if heal is not None else None
    if heal_cfg is not None:
        heal_cfg = {k: v for k, v in heal_cfg.items() if k not in ("data_dir", "overwrite", "checkpoint_dir",
                                                                   "resume", "progress", "extra")}
    path = resolve_model(model)
    out = Path(out_dir)
    check_out_dir(out, overwrite, (path,))
    work = out.resolve().with_name(out.resolve().name + ".search")
    mdl, tok = load(path, dtype=dtype, device=device)
    fresh = not work.exists()
    try:
        rec = search_cut(mdl, tok, model, tgt, cfg, work, heal_cfg=heal_cfg, data_dir=data_dir, progress=progress)
    except LayerpruneError:
        if fresh:  # a refusal (unmeetable target, bad calibration) leaves nothing that blocks the fix
            shutil.rmtree(work, ignore_errors=True)
        raise
    fits = rec.pop("_fits")
    w = rec["winner"]
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if heal_cfg is None:
            materialize(mdl, tok, model, w["removed"], fits.get(cut_key(w["removed"])), tmp / "m",
                        {"search": "winner"})
        else:
            final_heal(mdl, tok, model, rec, fits, heal_cfg, cfg, work, tmp / "m", data_dir, progress)
        rec["seconds"]["final"] = time.perf_counter() - t0
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()
        man = read_json(tmp / "layerprune.json")
        man["search"] = rec
        write_json(tmp / "layerprune.json", man)
        write_report(rec, tmp)
    shutil.rmtree(work, ignore_errors=True)
    return rec


def final_heal(mdl: Any, tok: Any, source: str, rec: dict[str, Any], fits: dict, heal_cfg: dict[str, Any],
               cfg: SearchConfig, work: Path, out: Path, data_dir: str | None, progress: bool) -> None:
    """Heal the winner: from its unprobed cut (``restart``) or on from its probe (``continue``, the probe's
    steps counted against the final budget); ``budget_minutes`` turns the time left into steps."""
    from ..healing import heal

    w = rec["winner"]
    probe = w.get("probe")
    steps = heal_cfg.get("max_steps")
    if cfg.budget_minutes is not None and probe:
        left = cfg.budget_minutes * 60 - rec["seconds"]["total"]
        steps = max(1, int(left / probe["seconds_per_step"]))
        rec["budget"] = {"minutes": cfg.budget_minutes, "final_steps": steps,
                         "seconds_per_step": probe["seconds_per_step"]}
    if cfg.final == "continue" and probe:
        start, steps = probe["healed"], max(1, int(steps or 0) - probe["steps"]) if steps else steps
    elif probe:
        start = probe["cut"]
    else:
        key = cut_key(w["removed"])
        start = str(materialize(mdl, tok, source, w["removed"], fits.get(key), work / "cut-winner",
                                {"search": "winner"}))
    opts = {**heal_cfg, **({"max_steps": steps} if steps else {})}
    heal(start, out, data_dir=data_dir, progress=progress, checkpoint_dir=str(work / ".final.checkpoints"), **opts)
    rec["final"] = {"mode": cfg.final if probe else "restart", "from": start, "steps": steps}


def markdown(rec: dict[str, Any]) -> str:
    """The candidates table (proxy and probe), the winner and the seed's reverse cut."""
    d = rec["dense"]
    probes = {tuple(p["removed"]): p for p in rec["probes"]}
    lines = [f"Target {rec['target']}: remove {rec['k']} of {rec['num_layers']} layers. Held-out dense "
             f"perplexity {d['ppl']:.2f} ({d['tokens']} tokens).", "",
             "| proxy rank | candidate | removed | KL | PPL | + compensation KL | probe rank | probe KL | probe PPL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["candidates"]:
        p = probes.get(tuple(r["removed"]))
        comp = r.get("compensated")
        lines.append(f"| {r['proxy_rank']} | {', '.join(r['sources'])} | {r['removed']} | {r['plain']['kl']:.4f} | "
                     f"{r['plain']['ppl']:.1f} | {comp['kl']:.4f} |" if comp else
                     f"| {r['proxy_rank']} | {', '.join(r['sources'])} | {r['removed']} | {r['plain']['kl']:.4f} | "
                     f"{r['plain']['ppl']:.1f} | {'refused' if r.get('compensation_refused') else '–'} |")
        lines[-1] += (f" {p['probe_rank']} | {p['kl']:.4f} | {p['ppl']:.1f} |" if p else " – | – | – |")
    w = rec["winner"]
    lines += ["", f"**Winner**: {', '.join(w['sources'])} — layers {w['removed']}"
              f"{' with ' + w['compensation'] if w['compensated'] else ''}: {w['why']}."]
    s = rec["seconds"]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items())]
    return "\n".join(lines) + "\n"


def write_report(rec: dict[str, Any], out: Path) -> None:
    """search.json, search.md and search.png into ``out``."""
    from ..plots import plot_search

    write_json(out / SEARCH_FILE, rec)
    (out / "search.md").write_text("# Search\n\n" + markdown(rec), encoding="utf-8")
    plot_search(rec, out / "search.png")


__all__ = ["SEARCH_FILE", "final_heal", "markdown", "materialize", "probe_steps_for", "search", "search_cut",
           "split_windows", "write_report"]
