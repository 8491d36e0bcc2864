"""``layerprune compensate``: remove layers and fold a training-free map for each removed block into the weights.

Example::

    layerprune compensate default --tail 7 --method lstsq --out runs/smollm2-23l-lstsq
"""

from __future__ import annotations

import argparse

from ..compensation import CompensationConfig, compensate_checkpoint
from ..prune import parse_layer_list
from .common import (
    add_config_args,
    add_data_dir_arg,
    add_device_arg,
    add_dtype_arg,
    add_model_arg,
    add_out_args,
    add_verbose,
    config_from_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compensate", help="prune with a training-free compensation map folded into the weights",
                       description="Remove layers and, for every removed contiguous block, fit a map on calibration "
                                   "activations (lstsq: least squares onto the dense residual; cosine: ReplaceMe's "
                                   "cosine objective; scale: magnitude compensation) and fold it into the last "
                                   "kept layer's MLP output projection. The result is a vanilla checkpoint; "
                                   "layerprune.json records the fit error per block. Example: layerprune "
                                   "compensate default --tail 7 --method lstsq --out smollm2-23l")
    add_model_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--remove", help="0-based layer indices, ranges allowed (24,25,26-31)")
    g.add_argument("--tail", type=int, help="remove the last K layers (reverse-order pruning)")
    add_out_args(p)
    add_config_args(p.add_argument_group("compensation"), CompensationConfig)
    p.add_argument("--seed", type=int, default=42, help="calibration sampler seed")
    add_device_arg(p, "device (default: cuda if any)")
    add_data_dir_arg(p)
    add_dtype_arg(p)
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(CompensationConfig, args)
    remove = parse_layer_list(args.remove) if args.remove is not None else None
    man = compensate_checkpoint(args.model, args.out, remove=remove, tail=args.tail, config=cfg,
                                calib_data_dir=args.data_dir, seed=args.seed, dtype=args.dtype, device=args.device,
                                overwrite=args.overwrite)
    print_summary(man, args.out)
    return 0


def print_summary(man: dict, out: str) -> None:
    comp = man.get("compensation") or {}
    print(f"removed layers {man['removed_layers']} of {man['original_num_layers']}; "
          f"{len(man['kept_layers'])} kept -> {out}")
    for b in comp.get("blocks", []):
        fit = b.get("fit") or {}
        if "relative_error_after" in fit:
            what = f"relative error {fit['relative_error_before']:.4g} -> {fit['relative_error_after']:.4g}"
        elif "alpha" in fit:
            what = f"scale {fit['alpha']:.4g}"
        else:
            what = "no map"
        print(f"  block {b['removed'][0]}-{b['removed'][-1]}: {comp['method']} at {b['fold_point']}: {what}")
