"""``layerprune prune``: remove layers and save a vanilla HF checkpoint."""

from __future__ import annotations

import argparse

from ..prune import parse_layer_list, prune_checkpoint
from .common import add_dtype_arg, add_model_arg, add_out_args, add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove decoder layers and save a vanilla HF checkpoint",
                       description="Remove decoder layers (0-based original indices) and save the result.")
    add_model_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--remove", help="comma-separated 0-based layer indices, ranges allowed: 24,25,26-31")
    g.add_argument("--tail", type=int, help="remove the last K layers (reverse-order pruning)")
    add_out_args(p)
    p.add_argument("--streaming", action="store_true",
                   help="rewrite the safetensors shards without loading the model (about one tensor of memory)")
    add_dtype_arg(p)
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    remove = parse_layer_list(args.remove) if args.remove is not None else None
    rec = prune_checkpoint(args.model, args.out, remove=remove, tail=args.tail, streaming=args.streaming,
                           dtype=args.dtype, overwrite=args.overwrite)
    print(f"removed layers {rec.removed_layers} of {rec.original_num_layers}; "
          f"{len(rec.kept_layers)} kept -> {args.out}")
    return 0
