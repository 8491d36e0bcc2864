"""``layerprune prune``: remove layers (given, the tail, or chosen by a metric) and save a vanilla HF checkpoint.

``--remove`` is an index list (``24,25,26-31``) without ``--metric``; with ``--metric`` it is a COUNT K (a
single integer, also spelled ``--num K``), or give ``--ratio``.
"""

from __future__ import annotations

import argparse

from ..budget import Target
from ..compensation import METHODS as COMP_METHODS
from ..compensation import CompensationConfig
from ..errors import LayerpruneError
from ..pipeline import prune_by_metric
from ..prune import parse_layer_list, prune_checkpoint
from ..scoring import MODES as SCORE_MODES
from .common import (
    add_config_args,
    add_device_arg,
    add_dtype_arg,
    add_model_arg,
    add_out_args,
    add_verbose,
    config_from_args,
)
from .score import (
    add_calib_args,
    add_metric_option_args,
    add_protect_args,
    calib_spec_from_args,
    metric_options_from_args,
    parse_max_memory,
)


def register(sub: argparse._SubParsersAction) -> None:
    from ..metrics import metric_names

    p = sub.add_parser("prune", help="remove decoder layers and save a vanilla HF checkpoint",
                       description="Remove decoder layers (0-based original indices) and save the result: "
                                   "give the indices (--remove 24,25), the tail (--tail K), or a metric that "
                                   "chooses them (--metric taylor --remove 8 | --ratio 0.25), or a budget the "
                                   "metric's order must meet (--metric bi --target params=0.8).")
    add_model_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--remove", help="0-based layer indices, ranges allowed (24,25,26-31); with --metric: the "
                                    "number of layers to remove (a single integer)")
    g.add_argument("--tail", type=int, help="remove the last K layers (reverse-order pruning)")
    g.add_argument("--num", type=int, default=None, metavar="K", help="with --metric: remove K layers")
    g.add_argument("--ratio", type=float, default=None,
                   help="with --metric: remove floor(RATIO * layers) layers")
    g.add_argument("--target", default=None, type=_target, metavar="KIND=VALUE",
                   help="with --metric: the smallest removal that meets a budget: params=100M or 0.8 (of dense), "
                        "non_embedding_params, macs, kv_cache (bytes per token), prefill_speedup=1.25, "
                        "decode_speedup (measured here)")
    add_out_args(p)
    p.add_argument("--streaming", action="store_true",
                   help="rewrite the safetensors shards without loading the model (about one tensor of memory)")
    s = p.add_argument_group("selection by a metric")
    s.add_argument("--metric", default=None, help=f"score layers and remove the least important: "
                                                  f"{', '.join(metric_names())}")
    s.add_argument("--iterative", action="store_true",
                   help="re-score the pruned model after every --step removals (SLEB-style, no healing)")
    s.add_argument("--step", type=int, default=1, help="layers removed per iteration (default: 1)")
    add_protect_args(s)
    s.add_argument("--score-mode", default="memory", choices=SCORE_MODES,
                   help="how scoring holds the model (see 'layerprune score --mode'; default: memory)")
    add_device_arg(s, "device for scoring (default: cuda if any)")
    s.add_argument("--offload-folder", default=None, help="dispatch scoring: folder for disk-offloaded weights")
    s.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="dispatch scoring: memory per device, e.g. '0=20GiB,cpu=60GiB'")
    s.add_argument("--no-cache", action="store_true", help="recompute scores instead of using the cache")
    c = p.add_argument_group("compensation (see 'layerprune compensate')")
    c.add_argument("--compensate", default=None, choices=tuple(COMP_METHODS),
                   help="fold a training-free map for each removed block into the weights")
    add_config_args(c, CompensationConfig, prefix="comp_", skip=("method",))
    add_calib_args(p)
    add_metric_option_args(p)
    add_dtype_arg(p)
    add_verbose(p)
    p.set_defaults(func=run)


def _target(text: str) -> Target:
    try:
        return Target.parse(text)
    except LayerpruneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    t = str(text).strip()
    if not t.isdigit():
        raise LayerpruneError(f"with --metric, --remove is the NUMBER of layers to remove (a single integer), "
                              f"got '{text}'; to remove given indices, drop --metric")
    return int(t)


def _compensation(args: argparse.Namespace) -> CompensationConfig | None:
    if args.compensate is None or args.compensate == "none":
        return None
    if args.streaming and args.comp_mode == "memory":
        args.comp_mode = "layerwise"  # --streaming never loads the model: fit layer by layer as well
    return config_from_args(CompensationConfig, args, prefix="comp_", method=args.compensate)


def run(args: argparse.Namespace) -> int:
    comp = _compensation(args)
    if args.metric is None:
        if args.num is not None or args.ratio is not None or args.target is not None:
            raise LayerpruneError("--num, --ratio and --target choose layers by a metric: add --metric NAME")
        if args.iterative:
            raise LayerpruneError("--iterative needs --metric")
        remove = parse_layer_list(args.remove) if args.remove is not None else None
        if comp is not None:
            from ..compensation import compensate_checkpoint
            from .compensate import print_summary

            man = compensate_checkpoint(args.model, args.out, remove=remove, tail=args.tail, config=comp,
                                        calib_data_dir=args.data_dir, seed=args.seed, dtype=args.dtype,
                                        device=args.device, overwrite=args.overwrite)
            print_summary(man, args.out)
            return 0
        rec = prune_checkpoint(args.model, args.out, remove=remove, tail=args.tail, streaming=args.streaming,
                               dtype=args.dtype, overwrite=args.overwrite)
        print(f"removed layers {rec.removed_layers} of {rec.original_num_layers}; "
              f"{len(rec.kept_layers)} kept -> {args.out}")
        return 0
    if args.tail is not None:
        raise LayerpruneError("--tail is reverse-order pruning; with --metric use --remove K / --num K / --ratio")
    k = _count(args.remove) if args.remove is not None else args.num
    rec, sel = prune_by_metric(args.model, args.out, metric=args.metric, k=k, ratio=args.ratio,
                               metric_options=metric_options_from_args(args), iterative=args.iterative,
                               step=args.step, protect_first=args.protect_first, protect_last=args.protect_last,
                               calib=calib_spec_from_args(args), score_mode=args.score_mode,
                               streaming=args.streaming, dtype=args.dtype, batch_size=args.batch_size,
                               overwrite=args.overwrite, cache=not args.no_cache, device=args.device,
                               offload_folder=args.offload_folder,
                               max_memory=parse_max_memory(args.max_memory), compensation=comp,
                               target=args.target)
    how = f"iterative, step {sel.step}" if sel.iterative else "one-shot"
    print(f"{sel.metric} ({how}): removed layers {rec.removed_layers} of {rec.original_num_layers} "
          f"(removal order {sel.order}); {len(rec.kept_layers)} kept -> {args.out}")
    if args.target is not None:
        print(f"target {args.target.describe()}: met with {len(rec.removed_layers)} layers removed (details in "
              f"{args.out}/layerprune.json, method_params.target)")
    return 0
