"""``layerprune bench``: parameters, analytic MACs, memory, prefill latency and decode throughput."""

from __future__ import annotations

import argparse

from ..errors import LayerpruneError
from .common import add_device_arg, add_dtype_arg, add_model_arg, add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="params, MACs, memory, prefill latency, decode tokens/s (vs a dense model)",
                       description="Efficiency of a model; with --compare, the measured speedup next to the "
                                   "analytic bound (dense MACs / pruned MACs). MACs formula: docs/evaluation.md.")
    add_model_arg(p)
    p.add_argument("--compare", default=None, metavar="DENSE", help="dense reference model to compare against")
    p.add_argument("--seqlen", type=int, default=64, help="prompt tokens (default: %(default)s, the seed's 64)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="decode length; min_new_tokens = max_new_tokens (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; median and spread (default: %(default)s)")
    p.add_argument("--no-timing", action="store_true", help="only parameters, MACs and weight memory")
    add_dtype_arg(p)
    add_device_arg(p, "cpu, cuda ... (default: cuda if available)")
    p.add_argument("--out", default=None, help="folder for bench.json and bench.md (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bench.json")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import check_results_target, write_results
    from ..measurement import markdown, measure, speedup
    from ..models import load_for_eval

    if args.out:
        check_results_target(args.out, "bench", args.overwrite)  # before the work
    try:
        batches = tuple(int(b) for b in str(args.batch).split(",") if b.strip())
    except ValueError:
        raise LayerpruneError(f"--batch must be comma-separated integers, got '{args.batch}'") from None
    if not batches or min(batches) < 1 or args.seqlen < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise LayerpruneError("--batch, --seqlen, --new-tokens and --repeats must be positive")
    kw = dict(seq_len=args.seqlen, batches=batches, new_tokens=args.new_tokens, warmup=args.warmup,
              repeats=args.repeats, timing=not args.no_timing)
    model, _ = load_for_eval(args.model, args.dtype, args.device)
    res = {"model": args.model, "result": measure(model, **kw)}
    dense = None
    sp = None
    if args.compare:
        del model  # one model in memory at a time keeps the timings and memory peaks clean
        dmodel, _ = load_for_eval(args.compare, args.dtype, args.device)
        dense = measure(dmodel, **kw)
        res["dense_model"] = args.compare
        res["dense"] = dense
        sp = speedup(dense, res["result"])
        res["speedup"] = sp
    table = markdown(res["result"], dense, sp)
    print(table, end="")
    if args.out:
        path = write_results(args.out, "bench", res, f"# Efficiency: {args.model}\n\n{table}", args.overwrite)
        print(f"wrote {path}")
    return 0
