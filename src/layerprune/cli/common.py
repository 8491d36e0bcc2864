"""Flags shared by several sub-commands."""

from __future__ import annotations

import argparse


def add_model_arg(p: argparse.ArgumentParser, name: str = "model") -> None:
    p.add_argument(name, help="local model folder, Hub id (when online), or 'default' (embedded SmolLM2-135M)")


def add_out_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--out", required=required, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")


def add_dtype_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--dtype", default=default, help="float32|bfloat16|float16|auto (default: %(default)s)")


def add_data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like shared/data (default: $LAYERPRUNE_DATA); used instead of the Hub")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
