"""``layerprune heal``: fine-tune or distil a pruned model and save a standard HF checkpoint.

Every flag is generated from :class:`~layerprune.healing.config.HealConfig` (its fields' defaults, types and
help); the method choices come from the method registry.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LayerpruneError
from ..healing.config import HealConfig
from .common import add_config_args, add_model_arg, add_out_args, add_verbose, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from ..healing.methods import METHODS

    p = sub.add_parser(
        "heal", help="recover a pruned model: partial-layer / LoRA / DoRA / QLoRA / full fine-tuning, distillation",
        description="Fine-tune (or distil into) a pruned model on instruction data and save a standard HF "
                    "checkpoint with heal.json. Defaults follow the seed: AdamW, lr 1e-5, 100 warm-up steps, "
                    "2 epochs, batch 64 (micro 4), eval every 100 steps, best validation checkpoint kept. "
                    "Example: layerprune heal runs/p25 --method partial --layers last3 --out runs/p25-healed")
    add_model_arg(p)
    add_out_args(p)
    groups = {g: p.add_argument_group(g) for g in ("method", "data", "training")}
    add_config_args(p, HealConfig, groups=groups,
                    choices={"method": tuple(METHODS), "distill_base": tuple(m for m in METHODS if m != "distill")})
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import resolve_model

    if args.method != "distill" and args.teacher is None and args.distill_base != "partial":
        raise LayerpruneError("--distill-base applies to --method distill only")
    cfg = config_from_args(HealConfig, args, overwrite=args.overwrite)
    resolve_model(args.model)  # a wrong path is one line before the training engine (seconds of imports) loads
    from ..healing import heal

    try:
        r = heal(args.model, args.out, **cfg.to_dict())
    except KeyboardInterrupt:
        print("layerprune: heal stopped; the same command with --resume continues from the last checkpoint",
              file=sys.stderr)
        raise

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    print(f"healed with {r['method']}: {r['trainable_params']:,} trainable parameters, {r['steps']} steps, "
          f"{r['tokens_per_s']:.0f} tokens/s")
    print(f"validation loss {f(r['val_loss_before'])} -> {f(r['final_val_loss'])} (best, step {r['best_step']})"
          f" -> {args.out}")
    return 0
