"""``layerprune frontier``: quality against size for several metrics and removal counts, on one loaded model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..compensation import METHODS as COMP_METHODS
from ..errors import LayerpruneError
from .common import add_device_arg, add_dtype_arg, add_model_arg, add_verbose, positive_int
from .score import (
    add_calib_args,
    add_metric_option_args,
    add_protect_args,
    calib_spec_from_args,
    metric_options_from_args,
)


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers, got '{text}'") from None
    if not ks:
        raise argparse.ArgumentTypeError("--ks is empty")
    return ks


def register(sub: argparse._SubParsersAction) -> None:
    from ..metrics import metric_names

    p = sub.add_parser("frontier", epilog="example:\n  layerprune frontier default --metric bi,angular,reverse --ks 2,4,6,8 --compensate lstsq --out runs/frontier",
                       formatter_class=argparse.RawDescriptionHelpFormatter, help="held-out perplexity, KL, size (and speed) for each metric and k",
                       description="Score the model with each metric, then evaluate the cut of every k on the "
                                   "same loaded model (layers skipped in place, restored after): size, MACs, "
                                   "held-out calibration perplexity, KL to dense, optionally measured speed. "
                                   "Writes frontier.json, frontier.md and frontier.png.")
    add_model_arg(p)
    p.add_argument("--metric", required=True, help=f"comma-separated: {', '.join(metric_names())}")
    p.add_argument("--ks", required=True, type=_ks, help="removal counts, e.g. 2,4,6,8")
    p.add_argument("--heldout", type=positive_int, default=8,
                   help="held-out calibration windows for the quality proxy (default: %(default)s)")
    p.add_argument("--measure", action="store_true", help="also time prefill and decode of every k")
    p.add_argument("--compensate", default=None, choices=tuple(k for k, c in COMP_METHODS.items() if not c.trains),
                   help="also evaluate every cut with this training-free compensation (fitted per cut on the "
                        "scoring windows, applied through hooks)")
    p.add_argument("--out", required=True, help="folder for frontier.json/.md/.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing frontier.json")
    add_protect_args(p)
    add_device_arg(p)
    add_dtype_arg(p)
    add_calib_args(p)
    add_metric_option_args(p)
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..arch import layer_count
    from ..frontier import frontier, markdown, write
    from ..io import check_results_target
    from ..metrics import make_metric
    from ..models import load, read_config, resolve_model

    check_results_target(args.out, "frontier", args.overwrite, (resolve_model(args.model),))
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    if not metrics:
        raise LayerpruneError("--metric is empty")
    for m in metrics:
        make_metric(m)  # an unknown name fails before the load
    path = resolve_model(args.model)
    if Path(path).is_dir():
        max_k = layer_count(read_config(path)) - 1 - args.protect_first - args.protect_last
        if any(not 1 <= k <= max_k for k in args.ks):
            raise LayerpruneError(f"--ks must be between 1 and {max_k} for this model (got {args.ks})")
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    res = frontier(model, tok, metrics, args.ks, calib=calib_spec_from_args(args), heldout=args.heldout,
                   protect_first=args.protect_first, protect_last=args.protect_last,
                   batch_size=args.batch_size or 4, measure_speed=args.measure,
                   metric_options=metric_options_from_args(args), compensation=args.compensate)
    res["model"] = args.model
    print(markdown(res), end="")
    for written in write(res, args.out, args.overwrite).values():
        print(f"wrote {written}")
    return 0
