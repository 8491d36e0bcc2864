"""Option metadata shared by every configurable stage: a config dataclass's fields are the single source of
each option's default, type, choices and help; the CLI flags (``cli/common.py``) and the recipe schema
(``recipe/schema.py``) are generated from them."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import field
from typing import Any

# YAML 1.1 (PyYAML) reads 1e-3 as a string: a float needs a dot there (1.0e-3). Users type 1e-3.
_EXP_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_scalar(text: str) -> Any:
    """A ``key=value`` value from the command line as YAML reads it, with ``1e-3`` a float as users mean it."""
    import yaml

    if _EXP_FLOAT.match(text.strip()):
        return float(text)
    return yaml.safe_load(text) if text.strip() else ""


def opt(default: Any, help: str, group: str = "training", choices: tuple[str, ...] | None = None,
        recipe: bool = True, **extra: Any) -> Any:
    """A config field with its help text, argparse group, choices and whether recipes accept it
    (``recipe=False``: command line only; ``cli=False`` in ``extra``: API only)."""
    meta = {"help": help, "group": group, "recipe": recipe, **extra}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its default factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def from_kwargs(cls: Any, what: str, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)`` validated; an unknown key is a one-line error listing the valid ones."""
    from .errors import LayerpruneError

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise LayerpruneError(f"unknown {what} option(s) {unknown}; valid: {', '.join(sorted(names))}")
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


__all__ = ["field_default", "from_kwargs", "opt"]
