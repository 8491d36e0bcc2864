#!/usr/bin/env python
"""Healing quality against wall-clock time: {partial, distill, LoRA} x {none, lstsq, reconstruct} x
{alpaca, c4 text}, one run.

SmolLM2-135M-Instruct with the demo's removal (the last 7 of 30 layers; ``--remove`` for another cut, e.g. the
bi cut 12-15,17,25,26). Every cell heals with the same batch, seed and constant learning rate for the same
*training* time budgets (evaluation time is not counted); at each budget it records the validation loss and
wikitext-2 perplexity (seed protocol, first ``--ppl-tokens`` tokens). Compensation's own time is reported
beside it and charged to the compensated cells. Distillation reads the teacher cache (built by the first
distill cell of each data source; its build time is printed, not charged: it is shared by every later run).

A cell is ``method:compensation[:data]`` (data: alpaca or c4; default alpaca). Prints, per cell and budget,
PPL and validation loss; then, as ratios measured in this run:
* the time each cell (its compensation included) needs to reach uncompensated partial's validation loss after
  5 training minutes (or its last budget) on the same data (goal: <= 0.2x partial's time, 0.1x stretch);
* distill (from the cache) / partial tokens/s on the same compensation and data (goal >= 0.95).

    python bench/heal_quality.py                          # budgets 2,5,10 minutes (about 70 minutes in all)
    python bench/heal_quality.py --budgets 1,2 --cells partial:lstsq,distill:lstsq
    # the six cells as two processes side by side (2 cores), then one summary:
    python bench/heal_quality.py --cells partial:none,partial:lstsq,distill:none --json a.json &
    python bench/heal_quality.py --cells distill:lstsq,lora:none,lora:lstsq --json b.json; wait
    python bench/heal_quality.py --merge a.json b.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tail", type=int, default=7, help="layers removed from the tail (the demo's 7 of 30)")
    p.add_argument("--remove", default=None, help="removed layers instead of --tail, e.g. 12-15,17,25,26")
    p.add_argument("--budgets", default="2,5,10", help="training minutes at which quality is recorded")
    p.add_argument("--cells", default="partial:none,partial:lstsq,distill:none,distill:lstsq,lora:none,lora:lstsq",
                   help="method:compensation[:data] cells (compensation none|lstsq|reconstruct, optionally /N "
                        "calibration windows instead of --comp-nsamples, e.g. lstsq/32; data alpaca|c4)")
    p.add_argument("--lr", default="partial=3e-4,distill=3e-4,lora=1e-3,full=5e-5",
                   help="learning rate per method (constant after --warmup-steps)")
    p.add_argument("--layers", default="last3")
    p.add_argument("--tie-mode", default=None, help="partial/distill on the tied SmolLM2 (default: heal's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-every", type=float, default=0.5, help="also evaluate the validation loss every N minutes")
    p.add_argument("--val-size", type=int, default=100)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--comp-nsamples", type=int, default=64)
    p.add_argument("--comp-seqlen", type=int, default=256)
    p.add_argument("--recon", default="", metavar="KEY=VALUE,...",
                   help="reconstruct settings, e.g. recon_steps=100,recon_lr=5e-4 (default: the library's)")
    p.add_argument("--data-dir", default=os.environ.get("LAYERPRUNE_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--work", default=str(REPO / "bench_runs" / "heal_quality"), help="scratch folder")
    p.add_argument("--heal-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra heal option for every cell (YAML value), e.g. train_on_inputs=true")
    p.add_argument("--tag", default="", help="suffix of the cells' output folders (parallel runs)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="print the summary of several --json results (cells run side by side on two cores)")
    return p.parse_args(argv)


def main() -> int:
    args = parse()
    if args.merge:
        merged: dict = {"cells": {}}
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            merged["cells"].update(part["cells"])
            merged.setdefault("ppl", {}).update(part.get("ppl") or {})
        budgets = sorted(float(b) * 60 for b in json.loads(Path(args.merge[0]).read_text())["settings"]["budgets"]
                         .split(","))
        print("PPL " + "  ".join(f"{k} {v:.4g}" for k, v in merged["ppl"].items()))
        _summary(merged, budgets)
        return 0
    import torch
    from transformers import TrainerCallback

    from layerprune.compensation import CompensationConfig, compensate_checkpoint
    from layerprune.evaluation import perplexity
    from layerprune.healing import heal
    from layerprune.models import load
    from layerprune.options import parse_scalar
    from layerprune.prune import prune_checkpoint

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    budgets = sorted(float(b) * 60 for b in args.budgets.split(","))
    lrs = {k: float(v) for k, v in (x.split("=") for x in args.lr.split(","))}

    def ppl(model: torch.nn.Module, tok: object) -> float:
        return float(perplexity(model, tok, "wikitext2", "seed", data_dir=args.data_dir, seq_len=128,
                                max_tokens=args.ppl_tokens, progress=False)["ppl"])

    def ppl_of(path: str | Path) -> float:
        m, tok = load(path, dtype="float32")
        return ppl(m.eval(), tok)

    results: dict = {"settings": vars(args), "cells": {}}
    from layerprune.prune import parse_layer_list

    cut = dict(remove=parse_layer_list(args.remove)) if args.remove else dict(tail=args.tail)
    recon = {k: parse_scalar(v) for k, v in (x.split("=", 1) for x in args.recon.split(",") if x)}
    # The cut's models live in a folder of their own (a cached model of another cut or setting is never read);
    # compensation is redone every run, so its seconds are this run's and this code's.
    key = json.dumps([args.model, cut, args.comp_nsamples, args.comp_seqlen, recon], sort_keys=True)
    cut_dir = work / (f"cut-{hashlib.sha256(key.encode()).hexdigest()[:10]}" + (f"-{args.tag}" if args.tag else ""))
    pruned = cut_dir / "pruned"
    if not pruned.exists():
        prune_checkpoint(args.model, pruned, **cut)
    methods = sorted({c.split(":")[1] for c in args.cells.split(",")} - {"none"})
    comp_dirs: dict[str, Path] = {"none": pruned}
    comp_s: dict[str, float] = {"none": 0.0}
    for name in methods:
        # "lstsq/32": the method fitted on 32 calibration windows instead of --comp-nsamples
        method, _, windows = name.partition("/")
        comp_dirs[name] = cut_dir / name.replace("/", "-")
        compensate_checkpoint(args.model, comp_dirs[name], calib_data_dir=args.data_dir, progress=False, **cut,
                              overwrite=True, config=CompensationConfig(
                                  method=method, nsamples=int(windows or args.comp_nsamples),
                                  seqlen=args.comp_seqlen, **recon))
        comp_s[name] = json.loads((comp_dirs[name] / "layerprune.json").read_text())["compensation"]["seconds"]
    results["compensation_seconds"] = comp_s
    cached = cut_dir / f"ppl-{args.ppl_tokens}.json"
    results["ppl"] = json.loads(cached.read_text()) if cached.is_file() else {}
    for name, d in [("dense", args.model if args.model != "default" else _default()), *comp_dirs.items()]:
        if name not in results["ppl"] or name not in ("dense", "none"):  # compensated models were just redone
            results["ppl"][name] = ppl_of(d)
    cached.write_text(json.dumps(results["ppl"]))
    print("PPL " + "  ".join(f"{k} {v:.4g}" for k, v in results["ppl"].items())
          + "  (compensation seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in comp_s.items() if k != "none") + ")",
          flush=True)

    class Budget(TrainerCallback):
        """Training-time clock; evaluates at each budget (and every --eval-every), stops after the last."""

        def __init__(self, tok: object) -> None:
            self.train_s, self.t = 0.0, None
            self.tok = tok
            self.marks = sorted(set(budgets) | {x * args.eval_every * 60 for x in
                                                range(1, int(budgets[-1] / (args.eval_every * 60)) + 1)})
            self.points: list[dict] = []
            self.pending: float | None = None

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.train_s += time.perf_counter() - self.t
            if self.marks and self.train_s >= self.marks[0]:
                self.pending = self.marks.pop(0)
                control.should_evaluate = True
                if not self.marks:
                    control.should_training_stop = True
            return control

        def on_evaluate(self, a, state, control, metrics=None, model=None, **kw):
            if self.pending is None:
                return
            point = {"minutes": self.pending / 60, "train_s": self.train_s, "step": state.global_step,
                     "val_loss": float(metrics["eval_loss"])}
            if any(abs(self.pending - b) < 1e-6 for b in budgets):
                was = model.training
                model.eval()
                with torch.no_grad():
                    point["ppl"] = ppl(model, self.tok)
                model.train(was)
            self.points.append(point)
            self.pending = None
            print(f"  {point['minutes']:5.1f} min  step {point['step']:4d}  val {point['val_loss']:.4f}"
                  + (f"  ppl {point['ppl']:.1f}" if "ppl" in point else ""), flush=True)

    for cell in args.cells.split(","):
        method, c, data = (cell.split(":") + ["alpaca"])[:3]
        src = comp_dirs[c]
        _, tok = load(src, dtype="float32")
        cb = Budget(tok)
        print(f"{method} + {c} on {data}", flush=True)
        opts = dict(method=method, data=data, data_dir=args.data_dir, max_steps=10**6, lr=lrs[method],
                    lr_scheduler="constant_with_warmup", warmup_steps=args.warmup_steps,
                    batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                    cutoff_len=args.cutoff_len, val_size=args.val_size, eval_steps=10**6, eval_before=True,
                    save_total_limit=1, progress=False, overwrite=True, logging_steps=10)
        if method in ("partial", "distill"):
            opts["layers"] = args.layers
            if args.tie_mode:
                opts["tie_mode"] = args.tie_mode
        opts.update({k: parse_scalar(v) for k, v in (o.split("=", 1) for o in args.heal_opt)})
        if method == "distill":
            opts["teacher"] = str(_default() if args.model == "default" else args.model)
        tag = (f"-{args.tie_mode}" if args.tie_mode else "") + (f"-{args.tag}" if args.tag else "")
        r = heal(src, work / f"healed-{method}-{c.replace('/', '-')}-{data}{tag}", callbacks=[cb], **opts)
        results["cells"][cell] = {"points": cb.points, "val_loss_before": r["val_loss_before"],
                                  "tokens_per_s": r["tokens_per_s"], "steps": r["steps"],
                                  "compensation_s": comp_s[c], "data": data,
                                  "shared_prefix": r.get("distill_shared_prefix"),
                                  "teacher_cache": r.get("teacher_cache"),
                                  "prefix_cache": r["prefix_cache"].get("used")}
        if (r.get("teacher_cache") or {}).get("build_seconds"):
            print(f"  teacher cache built in {r['teacher_cache']['build_seconds']:.0f} s "
                  f"({r['teacher_cache']['bytes'] / 2**20:.0f} MiB, {r['teacher_cache']['kept']})", flush=True)
    _summary(results, budgets)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _default() -> Path:
    from layerprune.models import default_model_path

    return default_model_path()


def _summary(results: dict, budgets: list[float]) -> None:
    cells = results["cells"]
    print("\n| cell | " + " | ".join(f"{b / 60:g} min PPL / val" for b in budgets) + " | tokens/s |")
    print("|---|" + "---:|" * (len(budgets) + 1))
    for cell, r in cells.items():
        row = []
        for b in budgets:
            pt = next((p for p in r["points"] if abs(p["minutes"] * 60 - b) < 1e-6), None)
            row.append(f"{pt['ppl']:.1f} / {pt['val_loss']:.3f}" if pt and "ppl" in pt else "–")
        print(f"| {cell} | " + " | ".join(row) + f" | {r['tokens_per_s']:.0f} |")
    for data in sorted({r.get("data", "alpaca") for r in cells.values()}):
        ref = next((r for c, r in cells.items() if c.split(":")[:2] == ["partial", "none"]
                    and r.get("data", "alpaca") == data), None)
        if not ref or not ref["points"]:
            continue
        # The reference: uncompensated partial's validation loss after 5 training minutes (else its last).
        at = next((p for p in ref["points"] if abs(p["minutes"] - 5) < 1e-6), ref["points"][-1])
        target, t_ref = at["val_loss"], at["train_s"]
        print(f"\n{data}: target = uncompensated partial's validation loss {target:.4f} "
              f"(after {t_ref / 60:.1f} min)")
        for cell, r in cells.items():
            if r.get("data", "alpaca") != data:
                continue
            if r["val_loss_before"] is not None and r["val_loss_before"] <= target:
                t = r["compensation_s"]
            else:
                t = next((p["train_s"] + r["compensation_s"] for p in r["points"] if p["val_loss"] <= target), None)
            print(f"  {cell:28s} reaches it after " + (f"{t / 60:.2f} min = {t / t_ref:.3f}x partial's time"
                                                     if t is not None else "– (not within the budget)"))
    for cell, d in cells.items():
        method, rest = cell.split(":", 1)
        p = cells.get(f"partial:{rest}")
        if method == "distill" and p and p["tokens_per_s"]:
            how = "cache" if (d.get("teacher_cache") or {}).get("used") else "live teacher"
            print(f"distill ({how}) / partial tokens/s ({rest}): {d['tokens_per_s'] / p['tokens_per_s']:.2f}")
    best = min(((p["ppl"], c, p["minutes"]) for c, r in cells.items() for p in r["points"] if "ppl" in p),
               default=None)
    if best and results.get("ppl", {}).get("dense"):
        print(f"best cell: {best[1]} after {best[2]:g} min: PPL {best[0]:.1f} = "
              f"{best[0] / results['ppl']['dense']:.2f}x dense")

if __name__ == "__main__":
    sys.exit(main())
