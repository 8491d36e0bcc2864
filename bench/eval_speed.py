"""Benchmark: offline 8-task suite speed on SmolLM2-135M, and pruned-vs-dense speedup against the MAC bound.

Goals (issue 5): the offline suite with ``--limit 100`` per task in <= 10 min on this machine, and the pruned
model's measured prefill/decode speedup >= 0.9 x the analytic bound (dense MACs / pruned MACs).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python bench/eval_speed.py \
        [--data-dir ../shared/data] [--limit 100] [--remove-tail 8] [--skip-eval] [--skip-speed]

All ratios printed come from this one run. Dense and pruned timings are interleaved round by round so that
load drift on a shared machine hits both alike.
"""

from __future__ import annotations

import os

# Single-threaded BLAS before torch is imported: the goal is stated for this machine with one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from layerprune.evaluation.harness import evaluate, markdown_table  # noqa: E402
from layerprune.measurement import analytic_macs, bench_speed, decode_macs  # noqa: E402
from layerprune.models import load  # noqa: E402
from layerprune.prune import prune_layers, tail_layers  # noqa: E402

EVAL_GOAL_S = 600.0
RATIO_GOAL = 0.9


def run_eval(model, tok, data_dir: str, limit: int, scoring: str = "auto") -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    s = evaluate(model, tok, None, data_dir=data_dir, limit=limit, scoring=scoring)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(markdown_table(s))
    # On a shared machine wall time includes waiting for the CPU; with one thread, process CPU time is what
    # the run would take alone.
    print(f"offline 8-task suite, limit {limit} per task ({s['config']['limit_semantics']}), scoring "
          f"{s['config']['scoring']}: {wall:.1f} s wall, {cpu:.1f} s CPU (task loading "
          f"{s['config']['seconds_task_load']:.1f} s); goal <= {EVAL_GOAL_S:.0f} s -> wall/goal "
          f"{wall / EVAL_GOAL_S:.3f}, CPU/goal {cpu / EVAL_GOAL_S:.3f}; load average {os.getloadavg()[0]:.1f}")
    return {"seconds": wall, "cpu_seconds": cpu, "loadavg": os.getloadavg(),
            "summary": {k: s[k] for k in ("tasks", "mean_acc")}}


def run_speed(dense, pruned, seq_len: int, batches: list[int], new_tokens: int, rounds: int, repeats: int) -> dict:
    L, Lp = dense.config.num_hidden_layers, pruned.config.num_hidden_layers
    bound_pre = analytic_macs(dense.config, seq_len)["total"] / analytic_macs(pruned.config, seq_len)["total"]
    ctx = seq_len + new_tokens // 2
    bound_dec = decode_macs(dense.config, ctx) / decode_macs(pruned.config, ctx)
    print(f"\nspeed: {L} -> {Lp} layers, prompt {seq_len} tokens, decode {new_tokens} tokens "
          f"(min_new_tokens = max_new_tokens), {rounds} interleaved rounds x {repeats} repeats")
    print(f"analytic bound: prefill {bound_pre:.3f}x, decode {bound_dec:.3f}x (dense MACs / pruned MACs)")
    out = {"bound_prefill": bound_pre, "bound_decode": bound_dec, "per_batch": []}
    for b in batches:
        runs: dict[str, list[dict]] = {"dense": [], "pruned": []}
        for r in range(rounds):
            order = [("dense", dense), ("pruned", pruned)] if r % 2 == 0 else [("pruned", pruned), ("dense", dense)]
            for name, m in order:
                runs[name].append(bench_speed(m, seq_len=seq_len, batch=b, new_tokens=new_tokens, warmup=1,
                                              repeats=repeats, progress=False))
        med = {n: {"prefill": statistics.median(x["prefill_seconds"]["median"] for x in v),
                   "decode_tps": statistics.median(x["decode_tokens_per_s"] for x in v),
                   "prefill_spread": max(x["prefill_seconds"]["rel_spread"] for x in v),
                   "prefill_cpu": statistics.median(x["prefill_cpu_seconds"]["median"] for x in v),
                   "decode_cpu": statistics.median(x["generate_cpu_seconds"]["median"]
                                                   - x["prefill_cpu_seconds"]["median"] for x in v)}
               for n, v in runs.items()}
        sp_pre = med["dense"]["prefill"] / med["pruned"]["prefill"]
        sp_dec = med["pruned"]["decode_tps"] / med["dense"]["decode_tps"]
        row = {"batch": b, "dense": med["dense"], "pruned": med["pruned"], "prefill_speedup": sp_pre,
               "prefill_ratio_to_bound": sp_pre / bound_pre, "decode_speedup": sp_dec,
               "decode_ratio_to_bound": sp_dec / bound_dec}
        # The same ratios on process CPU time (robust to other jobs on a shared CPU; one thread).
        cpu_pre = med["dense"]["prefill_cpu"] / med["pruned"]["prefill_cpu"]
        cpu_dec = med["dense"]["decode_cpu"] / med["pruned"]["decode_cpu"]
        row.update(prefill_speedup_cpu=cpu_pre, prefill_ratio_to_bound_cpu=cpu_pre / bound_pre,
                   decode_speedup_cpu=cpu_dec, decode_ratio_to_bound_cpu=cpu_dec / bound_dec)
        out["per_batch"].append(row)
        print(f"batch {b}: prefill {med['dense']['prefill'] * 1e3:.1f} -> {med['pruned']['prefill'] * 1e3:.1f} ms "
              f"= {sp_pre:.3f}x (ratio to bound {sp_pre / bound_pre:.3f}); decode "
              f"{med['dense']['decode_tps']:.1f} -> {med['pruned']['decode_tps']:.1f} tok/s = {sp_dec:.3f}x "
              f"(ratio to bound {sp_dec / bound_dec:.3f}); goal ratio >= {RATIO_GOAL}")
        print(f"batch {b} on process CPU time: prefill {cpu_pre:.3f}x (ratio {cpu_pre / bound_pre:.3f}), decode "
              f"{cpu_dec:.3f}x (ratio {cpu_dec / bound_dec:.3f}); load average {os.getloadavg()[0]:.1f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data-dir", default=os.environ.get("LAYERPRUNE_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--remove-tail", type=int, default=8, help="layers removed from the end (reverse order)")
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scoring", default="auto", choices=("auto", "lm-eval", "shared-prefix"))
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}")
    model, tok = load(args.model, "float32", "cpu")
    result: dict = {"model": args.model, "threads": torch.get_num_threads()}
    if not args.skip_eval:
        result["eval"] = run_eval(model, tok, args.data_dir, args.limit, args.scoring)
    if not args.skip_speed:
        pruned = copy.deepcopy(model)
        prune_layers(pruned, tail_layers(pruned.config.num_hidden_layers, args.remove_tail))
        result["speed"] = run_speed(model, pruned, args.seqlen, [int(b) for b in args.batch.split(",")],
                                    args.new_tokens, args.rounds, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
