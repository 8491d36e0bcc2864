"""Streaming prune: peak memory vs the largest tensor, and time vs a plain copy of the kept bytes.

Builds a >= 1 GB random-weight Llama-style checkpoint (sharded, with an index) directly as safetensors, one
layer at a time, then runs `layerprune prune --streaming` in a child process and reads its peak RSS.
Goals (issue 2): peak RSS <= 2 x largest tensor + 300 MB; time <= 1.5 x the plain copy.
Usage: python bench/prune_memory.py [--dir /tmp/lp-bench] [--layers 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# This parent process never imports torch: on Linux a child's peak RSS starts from its parent's at fork, so
# a big parent would inflate the measurement. The checkpoint is built in a child process too.

HIDDEN, INTER, VOCAB, HEADS, KV = 2048, 5632, 32000, 16, 4


def build(folder: Path, layers: int) -> tuple[int, int]:
    """Write the checkpoint; returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    kv = HIDDEN // HEADS * KV
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
                                             "model.norm.weight": torch.ones(HIDDEN),
                                             "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
                  "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                  "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
                  "mlp.down_proj.weight": (HIDDEN, INTER), "input_layernorm.weight": (HIDDEN,),
                  "post_attention_layernorm.weight": (HIDDEN,)}
        shards.append({p + k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()})
    n = len(shards)
    weight_map, total, largest = {}, 0, 0
    for j, tensors in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * 4
            largest = max(largest, t.numel() * 4)
        tensors.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return total, largest


def plain_copy(src: Path, dst: Path, remove: set[int]) -> tuple[float, int]:
    """Copy the bytes of every kept tensor (what streaming must at least do); returns (seconds, bytes)."""
    dst.mkdir(parents=True, exist_ok=True)
    t0, copied = time.perf_counter(), 0
    for f in sorted(src.glob("*.safetensors")):
        header, start = read_header(f)
        with open(f, "rb") as fin, open(dst / f.name, "wb") as fout:
            for k, v in header.items():
                if k == "__metadata__" or any(f"layers.{i}." in k for i in remove):
                    continue
                a, b = v["data_offsets"]
                fin.seek(start + a)
                left = b - a
                while left:
                    chunk = fin.read(min(64 << 20, left))
                    fout.write(chunk)
                    left -= len(chunk)
                copied += b - a
    return time.perf_counter() - t0, copied


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def baseline_rss_mb() -> float:
    """Peak RSS of a child that only imports what the CLI imports (interpreter + torch + transformers)."""
    code = ("import layerprune.cli, layerprune.prune, resource; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lp-bench-prune")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoint")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / "src"
    if args.build_only:
        build(src, args.layers)
        return
    if not (src / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--build-only", "--dir", str(root), "--layers", str(args.layers)],
                       check=True)
    sizes = [(v["data_offsets"][1] - v["data_offsets"][0]) for f in src.glob("*.safetensors")
             for k, v in read_header(f)[0].items() if k != "__metadata__"]
    total, largest = sum(sizes), max(sizes)
    remove = list(range(args.layers // 2, args.layers - 1))  # interior + renumbering of the last layer
    print(f"checkpoint: {total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB, removing layers {remove}")

    copy_s, kept_bytes = plain_copy(src, root / "copy", set(remove))  # also warms the page cache
    shutil.rmtree(root / "copy")
    out = root / "out"
    cmd = [sys.executable, "-m", "layerprune", "prune", str(src), "--streaming", "--remove",
           ",".join(map(str, remove)), "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of exactly this child
    prune_s = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"prune failed with status {proc.returncode}")
    peak_mb = usage.ru_maxrss / 1024
    copy2_s, _ = plain_copy(src, root / "copy", set(remove))
    shutil.rmtree(root / "copy")
    copy_s = (copy_s + copy2_s) / 2
    base_mb = baseline_rss_mb()
    budget = 2 * largest / 2**20 + 300
    print(f"kept bytes: {kept_bytes / 1e9:.2f} GB")
    print(f"streaming prune peak RSS: {peak_mb:.0f} MB (import-only baseline {base_mb:.0f} MB, "
          f"above baseline {peak_mb - base_mb:.0f} MB)")
    print(f"peak RSS / largest tensor = {peak_mb / (largest / 2**20):.2f}x; "
          f"goal <= 2x largest + 300 MB = {budget:.0f} MB: {'PASS' if peak_mb <= budget else 'FAIL'}")
    print(f"time: prune {prune_s:.2f}s (incl. ~interpreter start) vs plain copy {copy_s:.2f}s -> "
          f"ratio {prune_s / copy_s:.2f}x (goal <= 1.5x): {'PASS' if prune_s <= 1.5 * copy_s else 'FAIL'}")
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
