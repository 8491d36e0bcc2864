"""``layerprune sweep``: many recipes (a grid over a base recipe) as cells on this machine, Ray or Slurm.

Example::

    layerprune sweep studies/seed-tables.yaml --out runs/seed-tables --workers 2
    layerprune sweep studies/seed-tables.yaml --out runs/seed-tables --executor ray --resume
    layerprune sweep studies/seed-tables.yaml --out runs/seed-tables --resume --only prune.metric=angular
    layerprune sweep studies/seed-tables.yaml --out runs/seed-tables --report
"""

from __future__ import annotations

import argparse

from ..errors import LayerpruneError
from ..sweep import EXECUTORS
from .common import add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a grid of recipes (cells) and report them as one table",
                       description="Each cell is a recipe run in OUT/cells/<fingerprint>/; a re-launch with --resume "
                                   "skips finished cells and resumes interrupted ones; stages that cells share "
                                   "(scores, dense evaluation, pruned and compensated models) are computed once.")
    p.add_argument("sweep", help="sweep YAML file (see docs/sweeps.md)")
    p.add_argument("--out", required=True, help="sweep folder")
    p.add_argument("--executor", default="local", choices=tuple(EXECUTORS),
                   help="where cells run: local processes, a Ray cluster, or Slurm via submitit (default: local)")
    p.add_argument("--workers", type=int, default=None, help="cells at once (default: the sweep file's, else 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key in every cell, repeatable")
    p.add_argument("--data-dir", help="offline data folder (default: $LAYERPRUNE_DATA)")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="run only the cells whose recipes have this value (repeatable: every key must match, a key "
                        "given twice matches either value); the report still covers every cell")
    p.add_argument("--resume", action="store_true", help="continue: finished cells are kept, others run or resume")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep folder")
    p.add_argument("--report", action="store_true", help="only write the report of the cells run so far")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sweep import sweep

    if args.only and args.report:
        raise LayerpruneError("--only selects cells to run and --report runs none: give one of them")
    overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    summary = sweep(args.sweep, args.out, executor=args.executor, workers=args.workers, resume=args.resume,
                    overwrite=args.overwrite, report_only=args.report, overrides=overrides,
                    only=args.only)
    failed = [r for r in summary["cells"] if r["status"].startswith("failed")]
    print(f"report: {args.out}/sweep.md ({len(summary['cells'])} cells, {len(failed)} failed)")
    return 1 if failed else 0
