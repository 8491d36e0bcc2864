"""Flags shared by several sub-commands."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import field_default


def add_model_arg(p: argparse.ArgumentParser, name: str = "model") -> None:
    p.add_argument(name, help="local model folder, Hub id (when online), 'default' (embedded SmolLM2-135M) or "
                   "'gemma3-270m'")


def device_arg(text: str) -> str:
    """argparse type for ``--device``: checked against this machine at parse time, before any work."""
    from ..errors import LayerpruneError
    from ..models import resolve_device

    try:
        return resolve_device(text)
    except LayerpruneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_arg(p: Any, help: str = "cpu, cuda, cuda:N, mps (default: cuda if available)") -> None:
    p.add_argument("--device", default=None, type=device_arg, help=help)


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


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def batch_size_arg(text: str) -> str:
    """argparse type for lm-eval's batch size: a whole number >= 1, ``auto`` or ``auto:N``."""
    t = text.strip().lower()
    if t == "auto" or (t.startswith("auto:") and t[5:].isdigit() and int(t[5:]) >= 1):
        return t
    return str(positive_int(t)) if t.lstrip("-").isdigit() else _bad_batch(text)


def _bad_batch(text: str) -> str:
    raise argparse.ArgumentTypeError(f"'{text}' is not a batch size (a whole number >= 1, auto or auto:N)")


def _number(text: str) -> int | float:
    """An int, or a float strictly between 0 and 1 (a fraction)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    return v if 0 < v < 1 else int(v)


def _comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _flag_kwargs(hint: Any) -> dict[str, Any]:
    """argparse settings for a field's type hint (``X | None`` takes X's)."""
    import types
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else [hint]
    if args == [bool]:
        return {"action": argparse.BooleanOptionalAction}
    if set(args) == {int, float}:
        return {"type": _number}
    first = args[0]
    if typing.get_origin(first) is list:
        return {"type": _comma_list}
    if first in (int, float, str):
        return {"type": first}
    return {"type": str}


def add_config_args(p: Any, cls: type, prefix: str = "", skip: tuple[str, ...] = (),
                    choices: dict[str, tuple[str, ...]] | None = None, groups: dict[str, Any] | None = None) -> None:
    """Flags generated from a config dataclass: each field's default, type hint, choices and ``help`` metadata.

    ``choices`` overrides a field's choices (e.g. from a registry); ``groups`` maps a field's ``group`` metadata
    to the argparse group it is added to (default ``p``); fields with ``cli=False`` metadata are skipped.
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        default = field_default(f)
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": default, **_flag_kwargs(hints[f.name])}
        kw["help"] = f"{f.metadata.get('help', '')} (default: %(default)s)"
        ch = (choices or {}).get(f.name) or f.metadata.get("choices")
        if ch:
            kw["choices"] = tuple(ch)
        target = (groups or {}).get(str(f.metadata.get("group")), p)
        target.add_argument("--" + (prefix + f.name).replace("_", "-"), **kw)


def config_from_args(cls: Any, args: argparse.Namespace, prefix: str = "", **fixed: Any) -> Any:
    """The config dataclass built from flags made by :func:`add_config_args` (``fixed`` overrides)."""
    import dataclasses

    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
              if hasattr(args, prefix + f.name)}
    values.update(fixed)
    return cls.from_kwargs(**values)
