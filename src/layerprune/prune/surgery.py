"""In-memory layer removal: ``prune_layers`` edits a loaded model in place."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..arch import parts, sliced_config
from ..errors import LayerpruneError


@dataclass(frozen=True)
class PruneRecord:
    """Which original (0-based) layers were kept and removed."""

    original_num_layers: int
    removed_layers: list[int]
    kept_layers: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def validate_removal(remove: Iterable[object], num_layers: int) -> list[int]:
    """Check a removal list against the layer count; return it sorted. Raises LayerpruneError on bad input."""
    out: list[int] = []
    for r in remove:
        if isinstance(r, bool) or not isinstance(r, int):
            try:
                if isinstance(r, float) and not r.is_integer():
                    raise ValueError
                r = int(str(r).strip()) if not isinstance(r, float) else int(r)
            except ValueError:
                raise LayerpruneError(f"layer index '{r}' is not an integer") from None
        if r < 0:
            raise LayerpruneError(f"layer index {r} is negative; indices are 0-based, 0..{num_layers - 1}")
        if r >= num_layers:
            raise LayerpruneError(f"layer index {r} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        out.append(r)
    if len(set(out)) != len(out):
        dups = sorted({r for r in out if out.count(r) > 1})
        raise LayerpruneError(f"duplicate layer indices: {dups}")
    if not out:
        raise LayerpruneError("nothing to remove: the removal list is empty")
    if len(out) >= num_layers:
        raise LayerpruneError(f"cannot remove all {num_layers} layers; keep at least one")
    return sorted(out)


def parse_layer_list(text: str) -> list[int]:
    """Parse '3,5,7-9' into [3, 5, 7, 8, 9] (ranges inclusive). Raises LayerpruneError on junk."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise LayerpruneError(f"empty layer range '{part}'")
            out.extend(range(lo, hi + 1))
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise LayerpruneError(f"layer index '{part}' is not an integer") from None
    return out


def tail_layers(num_layers: int, k: int) -> list[int]:
    """The last ``k`` layers (reverse-order pruning)."""
    if k <= 0 or k >= num_layers:
        raise LayerpruneError(f"--tail must be between 1 and {num_layers - 1} for a {num_layers}-layer model")
    return list(range(num_layers - k, num_layers))


def _renumber(layer: nn.Module, new_idx: int) -> None:
    # Every module that addresses the KV cache carries its own `layer_idx`; a stale one makes the cache write
    # into another layer's slot (transformers #30508).
    for mod in layer.modules():
        if isinstance(getattr(mod, "layer_idx", None), int):
            setattr(mod, "layer_idx", new_idx)  # noqa: B010 (torch types module attributes as Tensors)


@torch.no_grad()
def prune_layers(model: Any, remove: Iterable[int]) -> PruneRecord:
    """Remove decoder layers from ``model`` in place and return which original indices were kept/removed.

    No second model is built: the layer ModuleList is edited, every ``layer_idx`` renumbered, per-layer config
    fields sliced by the kept indices, the layer count updated; dtype, device and weight tying are untouched.
    Index-dependent behaviour (e.g. GPT-2's inverse-layer-index scaling) is folded so a reload is identical.
    """
    p = parts(model)
    n = p.num_layers
    removed = validate_removal(remove, n)
    removed_set = set(removed)
    kept = [i for i in range(n) if i not in removed_set]
    cfg = model.config
    # Compute the config changes on the pre-pruning config before anything is modified.
    changes = sliced_config(cfg.to_dict(), kept, p.adapter)

    ad = p.adapter
    for new, old in enumerate(kept):
        layer = p.layers[old]
        if new != old:
            if ad.tensor_quirk is not None:
                for name, t in list(layer.state_dict(keep_vars=True).items()):
                    if name in ad.quirk_tensors:
                        t.data.copy_(ad.tensor_quirk(name, t.data, old, new, cfg))
            if ad.module_quirk is not None:
                ad.module_quirk(layer, old, new, cfg)
        _renumber(layer, new)
    for i in reversed(removed):
        del p.layers[i]
    for k, v in changes.items():
        setattr(cfg, k, v)
    return PruneRecord(n, removed, kept)
