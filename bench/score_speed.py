"""Scoring speed on the real SmolLM2-135M (30 layers), all numbers measured in this one run.

1. ``ppl``: remove-one perplexity with prefix reuse vs the naive remove-one loop (layer skipped in place,
   whole model run per removal). Both use the same head/loss code, so the ratio isolates prefix reuse. The
   two library generators are stepped alternately (one removal each, the first step of prefix reuse
   includes its recording forward), so both see the same machine load.
   Prints the time ratio (goal <= 0.65), whether the rankings are identical, the largest relative NLL
   difference, and the ratio predicted from the measured cost of one layer and of the head+loss:
   ``(L + L(L-1)/2 + (L+1)h) / (L(L-1) + Lh)`` with h = head cost in layers (SmolLM2's 49k-vocabulary head
   costs about ten decoder layers, which bounds the achievable ratio).
2. ``bi`` + ``angular`` + ``cka`` in one forward vs each alone (best of --repeat runs each).

Times are CPU seconds of this process (``time.process_time``, one thread), so other jobs on a shared
machine do not distort the ratios; wall-clock seconds are printed alongside.

Usage: python bench/score_speed.py [--model default] [--nsamples 10] [--seqlen 128] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: one thread, comparable timings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from layerprune.arch import parts  # noqa: E402
from layerprune.data.calibration import CalibSpec, build_calibration  # noqa: E402
from layerprune.metrics._forward import capture, finish_fn, nll_from_hidden  # noqa: E402
from layerprune.metrics.perplexity import iter_remove_one_naive, iter_remove_one_prefix  # noqa: E402
from layerprune.models import load  # noqa: E402
from layerprune.scoring import score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


WALL: dict[int, float] = {}


def _timed(fn, *a, **kw):
    """CPU seconds of this process (robust to other processes sharing the cores); wall time kept aside."""
    w, t = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    cpu = time.process_time() - t
    WALL[id(out)] = time.perf_counter() - w
    return cpu, out


def _best(n, fn, *a, **kw):
    """Smallest CPU time of ``n`` runs (and the last result)."""
    times, out = [], None
    for _ in range(n):
        t, out = _timed(fn, *a, **kw)
        times.append(t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--nsamples", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--data-dir", default=os.environ.get("LAYERPRUNE_DATA") or str(REPO.parent / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per hidden-state timing (best is kept)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, tok = load(args.model, dtype="float32")
    cal = build_calibration(tok, CalibSpec("c4", nsamples=args.nsamples, seqlen=args.seqlen,
                                           data_dir=args.data_dir))
    L = parts(model).num_layers
    print(f"model {args.model}: {L} layers; calibration {args.nsamples} x {args.seqlen} tokens (C4 sample); "
          f"torch threads {torch.get_num_threads()}")

    # Warm-up (first-call allocations), then the cost model: one layer vs one head+loss evaluation.
    batches = cal.batches()
    _timed(capture, model, batches)
    t_cap, cap = _best(2, capture, model, batches)
    finish = finish_fn(model)
    with torch.no_grad():
        t_head, _ = _best(2, lambda: [nll_from_hidden(finish, cap.final[b], *batches[b])
                                      for b in range(len(batches))])
    layer = t_cap / L
    h = t_head / layer
    predicted = (L + L * (L - 1) / 2 + (L + 1) * h) / (L * (L - 1) + L * h)
    print(f"cost model: one layer {layer * 1e3:.1f} ms, head+loss {t_head * 1e3:.1f} ms = {h:.1f} layers; "
          f"predicted prefix/naive ratio {predicted:.3f}")

    gen = {"prefix": iter_remove_one_prefix(model, cal), "naive": iter_remove_one_naive(model, cal)}
    cpu = {"prefix": 0.0, "naive": 0.0}
    wall = {"prefix": 0.0, "naive": 0.0}
    steps: dict[str, list] = {"prefix": [], "naive": []}
    for i in range(L):
        for name in (("prefix", "naive") if i % 2 == 0 else ("naive", "prefix")):
            t, st = _timed(next, gen[name])
            cpu[name] += t
            wall[name] += WALL[id(st)]
            steps[name].append(st)
        print(f"  removal {i:2d}: prefix {cpu['prefix']:6.1f} s, naive {cpu['naive']:6.1f} s (cumulative CPU)",
              flush=True)
    t_prefix, t_naive, w_prefix, w_naive = cpu["prefix"], cpu["naive"], wall["prefix"], wall["naive"]
    nll_p = [st.nll for st in steps["prefix"]]
    nll_n = [st.nll for st in steps["naive"]]
    how, how_n = steps["prefix"][0].method, steps["naive"][0].method
    rank_p = sorted(range(L), key=lambda i: (nll_p[i], i))
    rank_n = sorted(range(L), key=lambda i: (nll_n[i], i))
    max_rel = max(abs(a - b) / abs(b) for a, b in zip(nll_p, nll_n))
    ratio = t_prefix / t_naive
    print(f"ppl prefix reuse ({how}): {t_prefix:.1f} s CPU ({w_prefix:.1f} s wall); naive remove-one loop "
          f"({how_n}): {t_naive:.1f} s CPU ({w_naive:.1f} s wall); ratio {ratio:.3f} CPU, "
          f"{w_prefix / w_naive:.3f} wall (goal <= 0.65)")
    print(f"ppl ranking identical: {rank_p == rank_n}; max relative NLL difference {max_rel:.2e}; "
          f"least important first: {rank_p[:8]}")

    # Hidden-state metrics: together in one forward vs each alone (in-memory, no cache).
    score(model, ["bi"], cal, progress=False)  # warm-up
    runs = {"bi": ["bi"], "angular": ["angular"], "cka": ["cka"], "together": ["bi", "angular", "cka"]}
    best: dict[str, float] = {}
    res = None
    for r in range(args.repeat):  # rotate the order each round so load changes hit every variant alike
        order = list(runs)[r % 4:] + list(runs)[:r % 4]
        for name in order:
            t, out = _timed(score, model, runs[name], cal, progress=False)
            best[name] = min(best.get(name, t), t)
            if name == "together":
                res = out
    together = best.pop("together")
    alone = best
    print("alone: " + ", ".join(f"{k} {v:.2f} s" for k, v in alone.items()) +
          f"; sum {sum(alone.values()):.2f} s")
    print(f"bi+angular+cka together (one forward): {together:.2f} s = {together / sum(alone.values()):.2f} x the "
          f"sum of the three, {together / max(alone.values()):.2f} x the slowest alone")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "layers": L, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "layer_ms": layer * 1e3, "head_layers": h, "predicted_ratio": predicted,
            "ppl_prefix_cpu_s": t_prefix, "ppl_naive_cpu_s": t_naive, "ppl_ratio": ratio,
            "ppl_prefix_wall_s": w_prefix, "ppl_naive_wall_s": w_naive,
            "ppl_ranking_identical": rank_p == rank_n, "ppl_max_rel_diff": max_rel,
            "alone_cpu_s": alone, "together_cpu_s": together,
            "removal_order": {k: r.removal_order()[:8] for k, r in res.results.items()}}, indent=2))


if __name__ == "__main__":
    main()
