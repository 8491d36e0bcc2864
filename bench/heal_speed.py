#!/usr/bin/env python
"""Healing throughput and memory: partial(last3), LoRA and full fine-tuning on one pruned model, one run.

SmolLM2-135M-Instruct (the embedded default) with 25% of its layers removed from the tail, the same Alpaca
samples, batch and seed for every method. Each method runs in its own subprocess so peak memory is its own.
Each method trains ``--epochs`` epochs (default 2, the seed's) over ``--steps`` optimizer steps' worth of samples.
Tokens/s counts non-padding input tokens over the optimizer steps after the first ``--warmup``, for the first
epoch alone and for the whole run (partial reuses its frozen layers' outputs after epoch 1, so the two differ).
Prints a table with ratios to LoRA (goal: partial >= 2.0x LoRA tokens/s; the seed measured 1.32x on an A100).

    python bench/heal_speed.py                     # CPU, 1 thread
    python bench/heal_speed.py --device cuda --batch-size 64
    python bench/heal_speed.py --model CONFIG_DIR --random-init   # same shapes, random weights
    # distillation from the teacher cache against partial (its second run reads the cache the first filled):
    python bench/heal_speed.py --methods partial,distill --repeats 2 --epochs 1 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model folder or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--random-init", action="store_true",
                   help="build the model from --model's config.json with random weights (no weights needed)")
    p.add_argument("--remove-frac", type=float, default=0.25, help="fraction of layers removed from the tail")
    p.add_argument("--methods", default="partial,lora,full")
    p.add_argument("--layers", default="last3", help="partial: which layers train")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs over the same samples (default: the seed's 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps at the start")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every method this many times, interleaved, and keep each one's fastest run")
    p.add_argument("--prefix-cache-gb", type=float, default=None,
                   help="partial's frozen-prefix cache budget (default: heal's; 0: off)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                   help="padding-free micro-batches (auto: what heal does by default)")
    p.add_argument("--data", default="alpaca")
    p.add_argument("--data-dir", default=None, help="default: $LAYERPRUNE_DATA or ../shared/data")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads (default 1)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pruned", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS = parse()
# Threads are fixed before torch is imported (the subprocesses inherit the environment).
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> str | None:
    if ARGS.data_dir:
        return ARGS.data_dir
    if os.environ.get("LAYERPRUNE_DATA"):
        return os.environ["LAYERPRUNE_DATA"]
    d = REPO.parent / "shared" / "data"
    return str(d) if d.is_dir() else None


def make_pruned(tmp: Path) -> Path:
    """Prune the model's tail (25% by default) into ``tmp/pruned``."""
    from layerprune.arch import layer_count
    from layerprune.models import resolve_model
    from layerprune.prune import prune_checkpoint

    src = Path(resolve_model(ARGS.model)) if not ARGS.random_init else Path(ARGS.model)
    if ARGS.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = AutoConfig.from_pretrained(src)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        full = tmp / "random"
        model.save_pretrained(full)
        AutoTokenizer.from_pretrained(src).save_pretrained(full)
        del model
        src = full
    n = layer_count(json.loads((src / "config.json").read_text()))
    k = max(1, round(n * ARGS.remove_frac))
    out = tmp / "pruned"
    prune_checkpoint(str(src), out, tail=k)
    print(f"model: {ARGS.model}{' (random init)' if ARGS.random_init else ''}, {n} layers, last {k} removed "
          f"-> {n - k} layers", flush=True)
    return out


def worker() -> None:
    """One method: a short heal run; per-step time and tokens from a callback; memory above the baseline."""
    from transformers import TrainerCallback

    from layerprune.healing import heal
    from layerprune.healing.train import current_rss

    class Steps(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, float, int]] = []
            self.t0 = 0.0
            self.baseline = 0

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() and \
                ARGS.device != "cpu" else current_rss()

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0 = time.perf_counter()
            self.tok0 = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            self.rows.append((state.global_step, time.perf_counter() - self.t0,
                              int(state.num_input_tokens_seen - self.tok0)))

    cb = Steps()
    with tempfile.TemporaryDirectory(prefix="heal-bench-out-") as out:
        r = heal(ARGS.pruned, Path(out) / "healed", callbacks=[cb], method=ARGS.worker, layers=ARGS.layers,
                 data=ARGS.data, data_dir=data_dir(), cutoff_len=ARGS.cutoff_len, val_size=0,
                 epochs=ARGS.epochs, max_train_samples=ARGS.steps * ARGS.batch_size,
                 prefix_cache_gb=ARGS.prefix_cache_gb, batch_size=ARGS.batch_size,
                 micro_batch_size=ARGS.micro_batch_size, warmup_steps=0, lr=1e-5, device=ARGS.device,
                 progress=False, seed=0, packing={"auto": None, "on": True, "off": False}[ARGS.packing])
    if r["steps"] != ARGS.steps * ARGS.epochs:
        raise SystemExit(f"expected {ARGS.steps * ARGS.epochs} steps, ran {r['steps']} (too few samples?)")
    timed = [row for row in cb.rows if row[0] > ARGS.warmup]
    first = [row for row in timed if row[0] <= ARGS.steps]
    secs, toks = sum(t for _, t, _ in timed), sum(n for _, _, n in timed)
    secs1, toks1 = sum(t for _, t, _ in first), sum(n for _, _, n in first)
    res = {"method": ARGS.worker, "trainable_params": r["trainable_params"], "tokens": toks, "seconds": secs,
           "tokens_per_s": toks / secs if secs else 0.0, "epoch1_tokens_per_s": toks1 / secs1 if secs1 else 0.0,
           "prefix_cache": r["prefix_cache"], "peak_memory_bytes": r["peak_memory_bytes"],
           "memory_kind": r["peak_memory_kind"], "baseline_bytes": cb.baseline, "packing": r["packing"]["used"],
           "train_memory_bytes": max(0, r["peak_memory_bytes"] - cb.baseline), "device": r["device"],
           "teacher_cache": r.get("teacher_cache")}
    Path(ARGS.result).write_text(json.dumps(res))


def main() -> None:
    methods = [m.strip() for m in ARGS.methods.split(",") if m.strip()]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="heal-bench-") as tmp_s:
        tmp = Path(tmp_s)
        pruned = make_pruned(tmp)
        passthrough = [a for a in sys.argv[1:]]
        for rep in range(ARGS.repeats):
            for m in methods:
                res_file = tmp / f"{m}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", m, "--pruned",
                       str(pruned), "--result", str(res_file)]
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0 or not res_file.is_file():
                    print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
                    raise SystemExit(f"{m} failed (exit {proc.returncode})")
                r = json.loads(res_file.read_text())
                print(f"  {m} (run {rep + 1}): {r['epoch1_tokens_per_s']:.1f} tokens/s in epoch 1, "
                      f"{r['tokens_per_s']:.1f} over the run ({time.perf_counter() - t:.0f} s)", flush=True)
                if m in results and m == "distill" and (r.get("teacher_cache") or {}).get("hit"):
                    results[m] = r  # a warm teacher cache: this run is the one that counts
                    continue
                if m in results:  # the fastest of the repeats, per speed; memory of the first run
                    for key in ("epoch1_tokens_per_s", "tokens_per_s"):
                        r[key] = max(r[key], results[m][key])
                    r.update({k: results[m][k] for k in r if "memory" in k or "baseline" in k})
                results[m] = r
    ref = results.get("lora")
    dev = next(iter(results.values()))["device"]
    kind = next(iter(results.values()))["memory_kind"]
    print(f"\ndevice {dev}, {ARGS.threads} thread(s), batch {ARGS.batch_size} (micro {ARGS.micro_batch_size}), "
          f"cutoff {ARGS.cutoff_len}, {ARGS.epochs} epoch(s) of {ARGS.steps} steps, the first {ARGS.warmup} "
          f"untimed, best of {ARGS.repeats} interleaved run(s); memory: {kind}; packing: "
          f"{', '.join(sorted({'on' if r['packing'] else 'off' for r in results.values()}))}")
    hdr = f"{'method':<10}{'trainable':>12}{'epoch-1 tok/s':>14}{'x lora':>8}{'run tok/s':>10}{'x lora':>8}" \
          f"{'peak MiB':>10}{'x lora':>8}{'train MiB':>11}{'x lora':>8}"
    print(hdr)
    print("-" * len(hdr))
    for m, r in results.items():
        def ratio(key: str, r: dict = r) -> str:
            return f"{r[key] / ref[key]:.2f}" if ref and ref[key] else "-"

        print(f"{m:<10}{r['trainable_params']:>12,}{r['epoch1_tokens_per_s']:>14.1f}"
              f"{ratio('epoch1_tokens_per_s'):>8}{r['tokens_per_s']:>10.1f}{ratio('tokens_per_s'):>8}"
              f"{r['peak_memory_bytes'] / 2**20:>10.0f}{ratio('peak_memory_bytes'):>8}"
              f"{r['train_memory_bytes'] / 2**20:>11.0f}{ratio('train_memory_bytes'):>8}")
    toks = {r["tokens"] for r in results.values()}
    if len(toks) > 1:
        print(f"warning: methods saw different token counts {sorted(toks)}")
    print("train MiB = peak minus the memory held when training began (weights, optimizer not yet allocated)")
    for m, r in results.items():
        pc = r["prefix_cache"]
        if pc.get("used"):
            print(f"{m}: frozen-prefix cache {pc['bytes'] / 2**20:.0f} MiB for {pc['samples']} samples, "
                  f"{pc['micro_batches_replayed']} micro-batches replayed, {pc['micro_batches_computed']} computed")
    d, p = results.get("distill"), results.get("partial")
    if d and p:
        tc = d.get("teacher_cache") or {}
        print(f"distill ({'warm teacher cache' if tc.get('hit') else 'teacher cache filled in this run' if tc else 'live teacher'}) "
              f"/ partial tokens/s: epoch 1 {d['epoch1_tokens_per_s'] / p['epoch1_tokens_per_s']:.3f}, "
              f"run {d['tokens_per_s'] / p['tokens_per_s']:.3f} (goal >= 0.95 from a warm cache)")
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps({"args": vars(ARGS), "results": results}, indent=2))


if __name__ == "__main__":
    if ARGS.worker:
        worker()
    else:
        main()
