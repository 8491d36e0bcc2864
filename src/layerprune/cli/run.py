"""``layerprune run``: execute a recipe (score -> prune -> heal -> evaluate -> measure -> report)."""

from __future__ import annotations

import argparse

from ..recipe import run_recipe
from .common import add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a YAML recipe end to end (resumable)",
                       description="Run a recipe. Any key can be overridden: --set heal.max_steps=50.")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--model", help="override the recipe's model (local folder, Hub id or 'default')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted, YAML value), repeatable")
    p.add_argument("--data-dir", help="offline data folder (default: $LAYERPRUNE_DATA)")
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue a killed run; stages with unchanged inputs are skipped")
    p.add_argument("--heal-processes", type=int, default=1,
                   help="heal under torchrun with N processes (one per GPU; CPU processes join with gloo)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import render_markdown, summary_table

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    manifest = run_recipe(args.recipe, args.out, overrides=overrides, resume=args.resume, overwrite=args.overwrite,
                          heal_processes=args.heal_processes)
    print(f"\nremoved layers (0-based, original): {manifest['removed_layers']} of {manifest['original_num_layers']}")
    table = summary_table(manifest)
    if table is not None:
        print(render_markdown([table]))
    print(f"\nfinal model: {manifest['final_model']}\nreport: {manifest['final_model'].rsplit('/', 1)[0]}/report.md")
    return 0
