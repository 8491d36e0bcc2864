#!/usr/bin/env python
"""`reconstruct` against `lstsq` alone (no healing), one run, printing ratios.

For each cut (default: the demo's reverse cut, the last 7 of SmolLM2's 30 layers, and the bi cut of the same
size, 12-15,17,25,26): compensate a fresh copy of the loaded model with ``lstsq`` and with ``reconstruct``
(each timed from the calibration windows to the folded, pruned model), then wikitext-2 perplexity (seed
protocol, first ``--ppl-tokens`` tokens). Prints PPL, seconds, and the ratios reconstruct ÷ lstsq (goal on
the demo cut: PPL <= 0.5x in <= 2 CPU-minutes). ``--recon`` tries other settings (e.g. steps=50,lr=1e-3).

    OMP_NUM_THREADS=1 python bench/recon_quality.py
    python bench/recon_quality.py --cuts tail7 --recon steps=50,lr=1e-3 --recon steps=200,batch=4
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CUTS = {"tail7": "23-29", "bi7": "12-15,17,25,26"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--cuts", default="tail7,bi7", help=f"names ({', '.join(CUTS)}) or layer lists like 3-5,9")
    p.add_argument("--recon", action="append", default=[], metavar="KEY=VALUE,...",
                   help="ReconSpec settings to try (repeatable; default: the library's defaults)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--data-dir", default=os.environ.get("LAYERPRUNE_DATA") or str(REPO.parent / "shared" / "data"))
    return p.parse_args()


def main() -> None:
    from layerprune.compensation import compensate
    from layerprune.compensation.methods import ReconSpec, make_method
    from layerprune.data.calibration import CalibSpec, build_calibration
    from layerprune.evaluation.perplexity import perplexity
    from layerprune.models import load, resolve_model
    from layerprune.options import parse_scalar
    from layerprune.prune.surgery import parse_layer_list

    args = parse()
    dense, tok = load(resolve_model(args.model), dtype="float32")
    cal = build_calibration(tok, CalibSpec(source="c4", nsamples=args.nsamples, seqlen=args.seqlen,
                                           data_dir=args.data_dir))

    def ppl(m: object) -> float:
        return float(perplexity(m, tok, "wikitext2", data_dir=args.data_dir, max_tokens=args.ppl_tokens,
                                progress=False)["ppl"])

    specs = [{k: parse_scalar(v) for k, v in (kv.split("=", 1) for kv in s.split(",") if kv)} for s in (args.recon or [""])]
    print(f"dense wikitext-2 PPL {ppl(dense):.2f}")
    for cut in args.cuts.split(","):
        removed = parse_layer_list(CUTS.get(cut, cut))
        runs = [("lstsq", make_method("lstsq"))] + [
            (f"reconstruct {s or 'defaults'}", make_method("reconstruct", recon=ReconSpec(**s))) for s in specs]
        base = None
        for name, method in runs:
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            compensate(m, removed, cal, method=method, progress=False)
            secs = time.perf_counter() - t0
            p = ppl(m)
            base = base or (p, secs)
            print(f"{cut} {removed} {name}: PPL {p:.1f} in {secs:.0f} s  "
                  f"(RATIO PPL/lstsq {p / base[0]:.3f}, time/lstsq {secs / base[1]:.2f})", flush=True)
            del m


if __name__ == "__main__":
    main()
