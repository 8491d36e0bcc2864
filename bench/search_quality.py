#!/usr/bin/env python
"""The search against the seed recipe at equal compute, one run per model, printing ratios.

For each model: the search (candidates, proxy, probe of the best three, final heal of the winner) at a
``params`` budget equal to removing ``--k`` layers, and the seed recipe — reverse order, ``lstsq``, then the same
healing with the steps the search's probes spent added to its final heal (equal healing compute). Both are
scored on wikitext-2 (seed protocol, first ``--ppl-tokens`` tokens) against the dense model.

Prints per model: dense / search / seed perplexity, the search's winner and its stage times, and the ratios
search ÷ dense, seed ÷ dense, search ÷ seed, search overhead (candidates + proxy + probe) ÷ search wall time.
With ``--final-compare`` the winner is also healed on from its probe (``final: continue``) for the same
number of total steps, to decide the final-heal rule by measurement.

    OMP_NUM_THREADS=1 python bench/search_quality.py                                   # SmolLM2 (7 of 30) and Gemma-3-270m (4 of 18)
    python bench/search_quality.py --models default --final-compare
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# The demo's healing (Makefile DEMO_SET): partial, last three layers, tied head frozen.
HEAL = dict(method="partial", layers="last3", data="alpaca", max_steps=100, batch_size=8, micro_batch_size=4,
            cutoff_len=128, lr=2e-3, warmup_steps=10, eval_steps=50, val_size=100)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default:7,gemma3-270m:4", help="MODEL:K pairs (K layers' worth of params)")
    p.add_argument("--steps", type=int, default=100, help="final healing steps")
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--final-compare", action="store_true", help="also heal the winner on from its probe")
    p.add_argument("--data-dir", default=os.environ.get("LAYERPRUNE_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--work", default=str(REPO / "bench_runs" / "search_quality"))
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def wikitext(path: str | Path, args: argparse.Namespace) -> float:
    from layerprune.evaluation.perplexity import perplexity
    from layerprune.models import load

    m, tok = load(str(path), dtype="float32")
    return float(perplexity(m, tok, "wikitext2", data_dir=args.data_dir, max_tokens=args.ppl_tokens,
                            progress=False)["ppl"])


def target_for(model: str, k: int) -> str:
    """``params=F``: the fraction of dense parameters left after removing any ``k`` (uniform) layers."""
    from layerprune.budget import Sizes
    from layerprune.models import resolve_model

    s = Sizes.of_checkpoint(resolve_model(model))
    frac = s.after(list(range(k)))["params"] / s.after([])["params"]
    return f"params={frac + 1e-6:.6f}"


def run_model(model: str, k: int, args: argparse.Namespace) -> dict:
    from layerprune.compensation import CompensationConfig, compensate_checkpoint
    from layerprune.healing import heal
    from layerprune.models import load, resolve_model
    from layerprune.search import SearchConfig, search_cut
    from layerprune.search.core import final_heal

    work = Path(args.work) / model
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    heal_cfg = {**HEAL, "max_steps": args.steps}
    target = target_for(model, k)
    out: dict = {"model": model, "k": k, "target": target, "dense": wikitext(resolve_model(model), args)}
    # The search's stages as `search()` composes them, kept apart here so that the final heal can be run both
    # ways (restart from the winner's cut, continue from its probe) on the same search.
    cfg = SearchConfig()
    t0 = time.perf_counter()
    mdl, tok = load(resolve_model(model), dtype="float32")
    rec = search_cut(mdl, tok, model, target, cfg, work / "search.work", heal_cfg=heal_cfg, data_dir=args.data_dir,
                     progress=False)
    fits = rec.pop("_fits")
    t1 = time.perf_counter()
    final_heal(mdl, tok, model, rec, fits, heal_cfg, cfg, work / "search.work", work / "search", args.data_dir, False)
    rec["seconds"]["final"] = time.perf_counter() - t1
    out["search_seconds"] = time.perf_counter() - t0
    out["search"] = wikitext(work / "search", args)
    out["stages"] = rec["seconds"]
    out["winner"] = {k2: rec["winner"][k2] for k2 in ("removed", "sources", "compensated", "why")}
    out["candidates"] = [{"rank": r["proxy_rank"], "sources": r["sources"], "removed": r["removed"],
                          "kl": r["plain"]["kl"], "ppl": r["plain"]["ppl"],
                          "comp_kl": (r.get("compensated") or {}).get("kl")} for r in rec["candidates"]]
    out["probes"] = [{k2: p[k2] for k2 in ("sources", "removed", "proxy_rank", "probe_rank", "kl", "ppl",
                                          "agreement", "seconds")} for p in rec["probes"]]
    if args.final_compare:
        t1 = time.perf_counter()
        cont = SearchConfig(final="continue")
        final_heal(mdl, tok, model, rec, fits, heal_cfg, cont, work / "search.work", work / "search-continue",
                   args.data_dir, False)
        out["continue"] = {"ppl": wikitext(work / "search-continue", args), "final": rec.get("final"),
                           "final_seconds": time.perf_counter() - t1}
        out["restart_final_seconds"] = rec["seconds"]["final"]
    del mdl
    probe_steps = sum(p["steps"] for p in rec["probes"])
    # The seed recipe with the same healing compute: the probes' steps go to its final heal.
    t0 = time.perf_counter()
    comp = CompensationConfig(method="lstsq", nsamples=64, seqlen=256)
    compensate_checkpoint(model, work / "seed-cut", tail=k, config=comp, calib_data_dir=args.data_dir, progress=False)
    heal(str(work / "seed-cut"), work / "seed", data_dir=args.data_dir, progress=False,
         **{**heal_cfg, "max_steps": args.steps + probe_steps})
    out["seed_seconds"] = time.perf_counter() - t0
    out["seed"] = wikitext(work / "seed", args)
    out["seed_compensated_only"] = wikitext(work / "seed-cut", args)
    return out


def report(r: dict) -> None:
    s = r["stages"]
    overhead = s["candidates"] + s["proxy"] + s["probe"]
    print(f"\n== {r['model']}: {r['target']} ({r['k']} layers' worth)")
    print(f"winner: {', '.join(r['winner']['sources'])} {r['winner']['removed']}"
          f"{' + lstsq' if r['winner']['compensated'] else ''} — {r['winner']['why']}")
    print("| rank | candidate | removed | proxy KL | proxy PPL | + lstsq KL |")
    print("|---|---|---|---|---|---|")
    for c in r["candidates"][:8]:
        comp = f"{c['comp_kl']:.4f}" if c["comp_kl"] is not None else "–"
        print(f"| {c['rank']} | {', '.join(c['sources'][:3])} | {c['removed']} | {c['kl']:.4f} | {c['ppl']:.1f} | {comp} |")
    for p in r["probes"]:
        print(f"probe: {p['sources'][0]} proxy rank {p['proxy_rank']} -> probe rank {p['probe_rank']}, KL {p['kl']:.4f}, "
              f"PPL {p['ppl']:.1f}, ROUGE-L {(p['agreement'] or {}).get('rouge_l', float('nan')):.3f}")
    print(f"wikitext-2 PPL: dense {r['dense']:.2f} | search {r['search']:.2f} | seed (reverse + lstsq + "
          f"same healing) {r['seed']:.2f} (lstsq only {r['seed_compensated_only']:.1f})")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
    print(f"RATIO search/dense {r['search'] / r['dense']:.3f}  seed/dense {r['seed'] / r['dense']:.3f}  "
          f"search/seed {r['search'] / r['seed']:.3f}  overhead/search-wall {overhead / r['search_seconds']:.3f}  "
          f"search-wall/seed-wall {r['search_seconds'] / r['seed_seconds']:.3f}")
    if "continue" in r:
        c = r["continue"]
        print(f"final rule: restart {r['search']:.2f} in {r['restart_final_seconds']:.0f} s of final heal; "
              f"continue {c['ppl']:.2f} in {c['final_seconds']:.0f} s  (continue/restart PPL "
              f"{c['ppl'] / r['search']:.3f}, time {c['final_seconds'] / r['restart_final_seconds']:.3f})")


def main() -> None:
    args = parse()
    results = []
    for item in args.models.split(","):
        model, k = item.split(":")
        r = run_model(model, int(k), args)
        report(r)
        results.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print("\nNot measured on a GPU (no device was lent to this run).")


if __name__ == "__main__":
    main()
