"""``layerprune download``: fetch a model or dataset repository from the Hub into a plain folder."""

from __future__ import annotations

import argparse

from ..download import REPO_TYPES, download
from .common import add_out_args, add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download", help="download a Hub model/dataset repository into a folder (atomic, resumable)",
        description="Download a Hugging Face Hub repository into --out. Set HF_ENDPOINT to use a mirror (e.g. "
                    "HF_ENDPOINT=https://hf-mirror.com) and HF_TOKEN for gated or private repositories. The files "
                    "land in a hidden .NAME.partial folder beside --out, renamed when complete; re-running an "
                    "interrupted download resumes it.")
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    add_out_args(p)
    p.add_argument("--repo-type", choices=REPO_TYPES, default="model", help="default: %(default)s")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--include", nargs="+", metavar="PATTERN", default=None,
                   help="only files matching these glob patterns, e.g. '*.json' '*.safetensors'")
    p.add_argument("--exclude", nargs="+", metavar="PATTERN", default=None,
                   help="skip files matching these glob patterns, e.g. '*.bin' '*.pth'")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = download(args.repo_id, args.out, repo_type=args.repo_type, revision=args.revision, include=args.include,
                   exclude=args.exclude, overwrite=args.overwrite)
    print(out)
    return 0
