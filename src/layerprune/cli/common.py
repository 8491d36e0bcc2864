"""Flags shared by several sub-commands."""

from __future__ import annotations

import argparse
from typing import Any


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


def add_config_args(p: Any, cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Flags generated from a config dataclass: each field's default, type, choices and ``help`` metadata."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        kind = type(f.default)
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": f.default,
                              "help": f"{f.metadata.get('help', '')} (default: %(default)s)"}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
        p.add_argument(flag, **kw)


def config_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **fixed: Any) -> Any:
    """The config dataclass built from flags made by :func:`add_config_args` (``fixed`` overrides)."""
    import dataclasses

    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
              if hasattr(args, prefix + f.name)}
    values.update(fixed)
    return cls.from_kwargs(**values)
