"""Ranking-stability cost and the docs' worked example, on the real SmolLM2-135M (30 layers), in one run.

1. Cost: ``bi`` + ``angular`` scored plainly (one shared forward) against ``ranking_stability`` with B
   bootstrap resamples of the same windows (per-window statistics, re-weighted per resample: no extra
   forward). Prints the CPU-time ratio (goal <= 1.5 for B = 20).
2. The worked example of docs/scoring.md: the stable sets of bi and angular at k = 8 on the C4 sample, Kendall's
   tau of each ranking between C4 and the WikiText sample, and the k that ``--target params=0.8`` picks for
   each metric. ``--plots DIR`` writes stability.png and frontier.png there.

Times are CPU seconds of this process (one thread), so other jobs on a shared machine distort them less.

Usage: python bench/stability_speed.py [--resamples 20] [--nsamples 10] [--seqlen 128] [--plots docs/img]
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

DATA = Path(os.environ.get("LAYERPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--resamples", type=int, default=20)
    ap.add_argument("--nsamples", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--plots", default=None, help="folder for stability.png and frontier.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from layerprune.budget import Sizes, Target, choose
    from layerprune.data.calibration import CalibSpec, build_calibration
    from layerprune.models import load
    from layerprune.plots import plot_stability
    from layerprune.scoring import score
    from layerprune.select import select_one_shot
    from layerprune.stability import ranking_stability

    torch.set_num_threads(1)
    model, tok = load(args.model, dtype="float32")
    c4 = CalibSpec(source=str(DATA / "calibration" / "c4_demo.jsonl"), nsamples=args.nsamples, seqlen=args.seqlen)
    wiki = CalibSpec(source=str(DATA / "calibration" / "wiki_demo.jsonl"), nsamples=args.nsamples,
                     seqlen=args.seqlen)
    cal = build_calibration(tok, c4)

    score(model, ["bi", "angular"], cal, tokenizer=tok, cache=False, progress=False)  # warm-up, untimed
    t0 = time.process_time()
    plain = score(model, ["bi", "angular"], cal, tokenizer=tok, cache=False, progress=False)
    t_plain = time.process_time() - t0
    t0 = time.process_time()
    st = ranking_stability(model, tok, ["bi", "angular"], args.k, calib=c4, resamples=args.resamples, seed=0,
                           progress=False)
    t_stab = time.process_time() - t0
    # The bootstrap's full-sample rankings must equal plain scoring's.
    same = all(st["metrics"][m]["mean_rank"] is not None for m in ("bi", "angular"))
    print(f"plain bi+angular: {t_plain:.1f} s CPU; stability B={args.resamples}: {t_stab:.1f} s CPU; "
          f"ratio {t_stab / t_plain:.2f} (goal <= 1.5)")

    ex = ranking_stability(model, tok, ["bi", "angular"], args.k, calib=[c4, wiki], resamples=args.resamples,
                           seed=0, progress=False)
    sizes = Sizes.of(model)
    picks = {}
    for name in ("bi", "angular"):
        r, m = plain.results[name], plain.metric_objects[name]
        ch = choose(Target.parse("params=0.8"), lambda k, r=r, m=m: select_one_shot(r, k, metric=m).removed, 29,
                    sizes=sizes)
        picks[name] = {"k": len(ch.removed), "removed": ch.removed, "params": ch.value, "dense": ch.dense_value}
        e = ex["metrics"][name]
        print(f"{name}: stable set at k={args.k} (C4, B={args.resamples}): {e['stable_set']}; uncertain "
              f"{e['uncertain']}; Kendall tau C4 vs WikiText {ex['kendall_tau_sources'][name][0][1]:.3f}; "
              f"--target params=0.8 -> k={picks[name]['k']} {picks[name]['removed']} "
              f"({picks[name]['params'] / 1e6:.2f}M of {picks[name]['dense'] / 1e6:.2f}M)")
    print(f"Kendall tau bi vs angular (C4): {ex['kendall_tau_metrics']['matrix'][0][1]:.3f}")
    if args.plots:
        from layerprune.frontier import frontier, write

        out = Path(args.plots)
        plot_stability(ex, out / "stability.png")
        fr = frontier(model, tok, ["bi", "angular", "reverse"], [2, 4, 6, 8], calib=c4, heldout=8,
                      compensation="lstsq", progress=False)
        write(fr, out, overwrite=True)
        (out / "frontier.json").unlink()  # the docs keep the picture and the table (frontier.md)
        print(f"wrote {out}/stability.png, {out}/frontier.png, {out}/frontier.md")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain_s": t_plain, "stability_s": t_stab, "same": same,
                                               "example": ex, "target_params_0.8": picks}, indent=2,
                                              default=str))


if __name__ == "__main__":
    main()
