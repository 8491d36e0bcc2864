"""``layerprune report``: rebuild report.md/html, plots and exports of a run folder from its layerprune.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LayerpruneError
from ..io import read_json
from ..models import MANIFEST
from ..report import write_exports, write_report
from .common import add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="regenerate a run's report, plots and mergekit/llama.cpp exports",
                       description="Regenerate report.md, report.html (self-contained), plots/ and exports/ "
                                   f"(mergekit.yaml, llama.cpp prune list, model card) from RUN_DIR/{MANIFEST}.")
    p.add_argument("run_dir", metavar="RUN_DIR", help=f"run folder holding {MANIFEST} (or the JSON file itself)")
    p.add_argument("--no-exports", action="store_true", help="skip exports/ (report only)")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.run_dir)
    manifest_path = path if path.is_file() else path / MANIFEST
    run_dir = manifest_path.parent
    if not manifest_path.is_file():
        raise LayerpruneError(f"no {MANIFEST} in {path}")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or (run_dir / "config.json").is_file():
        # Report files and exports would be written into the model folder, next to its weights.
        raise LayerpruneError(f"{run_dir} is a model folder, not a run folder; point report at a run of "
                              f"`layerprune run` (or at a copy of its {MANIFEST} elsewhere); nothing was written")
    written = {} if args.no_exports else write_exports(run_dir, manifest)  # first, so the report links them
    written.update(write_report(run_dir, manifest))
    for rel in sorted(written):
        print(run_dir / rel)
    return 0
