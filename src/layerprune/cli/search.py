"""``layerprune search``: the best cut for a budget, chosen by evidence, then healed.

Flags come from :class:`~layerprune.search.SearchConfig` and, prefixed ``--heal-``, from
:class:`~layerprune.healing.config.HealConfig` (what the probe and the final heal run).
"""

from __future__ import annotations

import argparse

from ..healing.config import HealConfig
from ..search.config import SearchConfig
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

# Heal settings that belong to the search run as a whole, not to its heals.
_HEAL_SKIP = ("data_dir", "checkpoint_dir", "keep_checkpoints", "resume", "progress", "seed", "device", "dtype")


def register(sub: argparse._SubParsersAction) -> None:
    from ..healing.methods import METHODS

    p = sub.add_parser(
        "search", help="the best pruned model for a budget: candidates from every metric, a training-free proxy, "
                       "a short healing probe, then the full heal of the winner",
        description="Candidates: the cut every metric (one-shot and iterative) makes to meet --target, every "
                    "contiguous block of that size, random controls. Proxy: held-out KL to dense and perplexity, "
                    "with and without compensation, on the one loaded model. Probe: the best few healed for a few "
                    "steps, ranked again. Final: the winner healed with the full budget. Writes a vanilla "
                    "checkpoint with layerprune.json (every candidate and why the winner won), search.md and "
                    "search.png. Example: layerprune search default --target params=0.816 --heal-max-steps 100 "
                    "--heal-lr 2e-3 --out runs/best")
    add_model_arg(p)
    p.add_argument("--target", required=True,
                   help="budget KIND=VALUE: params, non_embedding_params, macs, kv_cache (absolute or a fraction "
                        "of dense), prefill_speedup, decode_speedup")
    add_out_args(p)
    add_config_args(p.add_argument_group("search"), SearchConfig)
    g = p.add_argument_group("heal (probe and final)")
    add_config_args(g, HealConfig, prefix="heal_", skip=_HEAL_SKIP,
                    choices={"method": tuple(METHODS), "distill_base": tuple(m for m in METHODS if m != "distill")})
    p.add_argument("--no-heal", action="store_true", help="no probe and no final heal: the proxy decides and the "
                                                          "winner is written as cut (with its compensation)")
    add_device_arg(p)
    add_dtype_arg(p, default="float32")
    add_data_dir_arg(p)
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..budget import Target
    from ..models import resolve_model
    from ..search import search
    from ..search.core import markdown

    cfg = config_from_args(SearchConfig, args)
    Target.parse(args.target)  # a malformed target is one line before the load
    heal = None
    if not args.no_heal:
        heal = {f.name: getattr(args, "heal_" + f.name) for f in dataclasses.fields(HealConfig)
                if hasattr(args, "heal_" + f.name)}
        HealConfig.from_kwargs(**heal)  # every heal option checked before any work
    resolve_model(args.model)
    rec = search(args.model, args.out, args.target, config=cfg, heal=heal, data_dir=args.data_dir,
                 dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    print(markdown(rec), end="")
    print(f"wrote {args.out}")
    return 0
