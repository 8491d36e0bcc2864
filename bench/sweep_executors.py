#!/usr/bin/env python
"""Executor overhead: the same 4-cell tiny sweep (a random 4-layer model with SmolLM2's tokenizer, reverse and
magnitude cuts of 1 and 2 layers, wikitext-2 perplexity on 2,048 tokens) on each executor, one run, 2 workers.

Prints each executor's wall time and its ratio to ``local`` (goal: ray <= 1.5x local), and checks that every
executor wrote the same records.

    OMP_NUM_THREADS=1 python bench/sweep_executors.py [--executors local,ray,slurm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--executors", default="local,ray,slurm")
    p.add_argument("--data-dir", default=os.environ.get("LAYERPRUNE_DATA") or str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerprune.models import copy_aux_files, default_model_path
    from layerprune.sweep import sweep

    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    cfg = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "m")
    copy_aux_files(default_model_path(), work / "m", overwrite=False)
    base = {"name": "bench", "model": str(work / "m"), "prune": {"metric": "reverse", "num_layers": 1},
            "compensate": {"method": "none"}, "heal": {"method": "none"}, "measure": {"enabled": False},
            "evaluate": {"tasks": [], "ppl": ["wikitext2"], "ppl_max_tokens": 2048, "batch_size": 4}}
    f = work / "sweep.yaml"
    f.write_text(yaml.safe_dump({"base": base, "grid": {"prune.metric": ["reverse", "magnitude"],
                                                        "prune.num_layers": [1, 2]},
                                 "executor": {"slurm": {"cluster": "local", "time_min": 30}}}))
    times, tables = {}, {}
    for ex in args.executors.split(","):
        t0 = time.perf_counter()
        s = sweep(f, work / ex, executor=ex, workers=2, overrides=[f"data_dir={args.data_dir}"], log=lambda m: None)
        times[ex] = time.perf_counter() - t0
        tables[ex] = {json.dumps(r["axes"], sort_keys=True): r.get("ppl") for r in s["cells"]}
        print(f"{ex:7s} {times[ex]:6.1f} s  ({sum(r['status'] == 'done' for r in s['cells'])} of 4 cells done; "
              f"cell seconds {[r.get('seconds') for r in s['cells']]})",
              flush=True)
    ref = times.get("local")
    for ex, t in times.items():
        if ref and ex != "local":
            print(f"{ex} / local wall time: {t / ref:.2f}")
    same = all(t == tables[next(iter(tables))] for t in tables.values())
    print(f"same records on every executor: {same}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
