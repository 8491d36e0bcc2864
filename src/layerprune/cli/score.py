"""``layerprune score``: compute layer-importance metrics and write scores.json / .csv / .png.

Also home of the calibration and metric flags that ``layerprune prune --metric`` shares.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.calibration import DEFAULT_SOURCE, CalibSpec
from ..errors import LayerpruneError
from ..scoring import MODES as SCORE_MODES
from .common import add_data_dir_arg, add_device_arg, add_dtype_arg, add_model_arg, add_out_args, add_verbose


def add_calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", action="append", default=None,
                   help="preset (c4, wikitext2, ptb, bookcorpus), local .jsonl/.json/.txt/.parquet file or "
                        f"folder, or a Hub dataset id (default: {DEFAULT_SOURCE}; offline: the local C4 sample); "
                        "'score --stability' takes it repeated (the first is the primary source)")
    g.add_argument("--nsamples", type=int, default=10, help="number of calibration windows (default: 10)")
    g.add_argument("--seqlen", type=int, default=128, help="tokens per window (default: 128)")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of the calibration sampler and of the random metric (default: 42)")
    g.add_argument("--calib-split", default=None, help="dataset split (default: train)")
    g.add_argument("--calib-field", default=None, help="text field of JSON/Parquet rows (default: text)")
    g.add_argument("--calib-config", default=None, help="dataset config name for a Hub dataset id")
    g.add_argument("--calib-mode", default="auto", choices=("auto", "documents", "stream"),
                   help="documents: random long document then a window (the seed's sampler); stream: join all "
                        "rows and take windows (default for wikitext2/ptb)")
    g.add_argument("--allow-eval-overlap", action="store_true",
                   help="allow calibrating on a dataset's evaluation split (test)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="calibration samples per forward (default: all in one batch)")
    add_data_dir_arg(g)  # type: ignore[arg-type]


def add_metric_option_args(p: argparse.ArgumentParser) -> None:
    """One flag per metric parameter, generated from the metric classes' dataclass fields (their ``help``,
    ``choices`` and ``flag`` metadata); the default None leaves each metric its own default."""
    from ..metrics.base import metric_options

    g = p.add_argument_group("metric parameters (each metric takes the ones it has)")
    for name, (f, owners) in metric_options().items():
        flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": None,
                              "help": f"{'/'.join(sorted(owners))}: {f.metadata.get('help', name)}"}
        if f.type in ("bool", bool):
            # A flag that names the non-default setting: --seed-compat (True), --no-norms (False).
            kw["action"] = "store_false" if f.default is True else "store_true"
        else:
            kw["type"] = type(f.default)
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        g.add_argument(flag, **kw)


def add_protect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protect-first", type=int, default=0, metavar="M",
                   help="never remove the first M layers (all metrics but random/reverse)")
    p.add_argument("--protect-last", type=int, default=0, metavar="N",
                   help="never remove the last N layers (all metrics but random/reverse)")


def add_mode_args(p: argparse.ArgumentParser, flag: str = "--mode") -> None:
    p.add_argument(flag, dest="score_mode", default="memory", choices=SCORE_MODES,
                   help="memory: load the model; dispatch: accelerate device_map=auto with CPU/disk offload; "
                        "layerwise: read one decoder layer at a time from safetensors (default: memory)")
    add_device_arg(p, "device for memory/layerwise modes (default: cuda if any)")
    p.add_argument("--offload-folder", default=None, help="dispatch mode: folder for disk-offloaded weights")
    p.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="dispatch mode: memory per device, e.g. '0=20GiB,cpu=60GiB' (beyond it: disk)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of using the score cache")


def parse_max_memory(spec: str | None) -> dict[Any, Any] | None:
    """'0=20GiB,cpu=60GiB' -> {0: '20GiB', 'cpu': '60GiB'} (accelerate's max_memory; bare numbers = bytes)."""
    if not spec:
        return None
    out: dict[Any, Any] = {}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise LayerpruneError(f"--max-memory: expected DEVICE=SIZE pairs, got '{part}'")
        key = key.strip()
        val = val.strip()
        out[int(key) if key.isdigit() else key] = int(val) if val.isdigit() else val
    return out


def calib_specs_from_args(args: argparse.Namespace) -> list[CalibSpec]:
    """One spec per ``--calib`` (the same window settings for each)."""
    return [CalibSpec(source=src, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                      split=args.calib_split, field=args.calib_field, mode=args.calib_mode, data_dir=args.data_dir,
                      allow_eval_overlap=args.allow_eval_overlap, hub_config=args.calib_config)
            for src in (args.calib or [DEFAULT_SOURCE])]


def calib_spec_from_args(args: argparse.Namespace) -> CalibSpec:
    """The calibration spec of a command that takes one ``--calib``."""
    specs = calib_specs_from_args(args)
    if len(specs) > 1 and not getattr(args, "stability", None):
        raise LayerpruneError("--calib is given several times; only 'score --stability' compares sources")
    return specs[0]


def metric_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from ..metrics.base import metric_options

    opts = {k: getattr(args, k, None) for k in metric_options()}
    opts["seed"] = args.seed
    return {k: v for k, v in opts.items() if v is not None}


def register(sub: argparse._SubParsersAction) -> None:
    from ..metrics import metric_names

    p = sub.add_parser("score", help="compute layer-importance scores (bi, angular, ppl, taylor, ...)",
                       description="Score every decoder layer with one or more metrics and write scores.json, "
                                   "scores.csv, scores.png (and similarity.png for cka/angular). Scores are "
                                   "indexed by 0-based original layer; higher = more important. How stable a "
                                   "ranking is: --stability 20 --calib c4 --calib FILE (see docs/scoring.md).")
    add_model_arg(p)
    p.add_argument("--metric", action="append", required=True,
                   help=f"metric name, repeatable or comma-separated: {', '.join(metric_names())}")
    add_out_args(p)
    k = p.add_mutually_exclusive_group()
    k.add_argument("--remove", "--num", dest="num", type=int, default=None, metavar="K",
                   help="highlight the K layers one-shot selection would remove (default: --ratio 0.25)")
    k.add_argument("--ratio", type=float, default=None, help="highlight this fraction of layers")
    p.add_argument("--stability", type=int, default=None, metavar="B",
                   help="ranking stability: B bootstrap resamples of the calibration windows (and Kendall's tau "
                        "between repeated --calib sources and between metrics); adds 'stability' to scores.json "
                        "and writes stability.png")
    add_protect_args(p)
    add_calib_args(p)
    add_metric_option_args(p)
    add_mode_args(p)
    add_dtype_arg(p)
    add_verbose(p)
    p.set_defaults(func=run)


MAX_RESAMPLES = 1000  # bootstrap resamples: beyond this the interval estimates no longer move


def _stability(args: argparse.Namespace, metrics: list[Any], k: int | None, out: Path) -> None:

    from ..io import read_json, write_json
    from ..models import load
    from ..plots import plot_stability
    from ..stability import ranking_stability

    assert k is not None
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    st = ranking_stability(model, tok, metrics, k, calib=calib_specs_from_args(args), resamples=args.stability,
                           seed=args.seed, protect_first=args.protect_first, protect_last=args.protect_last,
                           batch_size=args.batch_size, metric_options=metric_options_from_args(args))
    data = read_json(out / "scores.json")
    data["stability"] = st
    write_json(out / "scores.json", data)
    plot_stability(st, out / "stability.png")
    for name, m in st["metrics"].items():
        print(f"{name} stability (B={st['resamples']}, k={k}): stable set {m['stable_set']}, uncertain "
              f"{m['uncertain']} [{m['cost']}]")
    print(f"wrote stability into scores.json and stability.png -> {args.out}")


def run(args: argparse.Namespace) -> int:
    from ..metrics import parse_metric_list
    from ..scoring import score_and_write

    metrics = parse_metric_list(args.metric)
    if args.stability is not None:
        if not 2 <= args.stability <= MAX_RESAMPLES:
            raise LayerpruneError(f"--stability takes 2 to {MAX_RESAMPLES} resamples, got {args.stability}")
        if args.num is None and args.ratio is None:
            raise LayerpruneError("--stability needs the removal count: give --num K or --ratio")
        from ..data.calibration import load_texts

        for spec in calib_specs_from_args(args)[1:]:
            texts, _ = load_texts(spec)  # every source readable, and not empty, before any scoring
            if not any(t and t.strip() for t in texts):
                raise LayerpruneError(f"calibration source {spec.source} has no text")
    from ..io import atomic_dir, check_out_dir
    from ..models import resolve_model

    check_out_dir(args.out, args.overwrite, (resolve_model(args.model),))
    # Written whole or not at all: scores and stability go to a temporary folder renamed at the end (a kill
    # anywhere leaves the target as it was; the next run removes the dead run's folder).
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        res, k = score_and_write(args.model, metrics, tmp, calib=calib_spec_from_args(args), k=args.num,
                                 ratio=args.ratio, protect_first=args.protect_first,
                                 protect_last=args.protect_last, overwrite=True, mode=args.score_mode,
                                 batch_size=args.batch_size, cache=not args.no_cache, dtype=args.dtype,
                                 device=args.device, offload_folder=args.offload_folder,
                                 max_memory=parse_max_memory(args.max_memory),
                                 metric_options=metric_options_from_args(args))
        sel = res.selections(k, args.protect_first, args.protect_last)
        if args.stability is not None:
            _stability(args, metrics, k, tmp)
    for name, r in res.results.items():
        tag = " (cached)" if r.cached else f" ({r.elapsed_s:.1f}s)"
        print(f"{name}{tag}: removal order {r.removal_order()[:12]}{' ...' if r.num_layers > 12 else ''}; "
              f"k={k} -> {sel.get(name)}")
    print(f"wrote scores.json, scores.csv, scores.png -> {args.out}")
    return 0
