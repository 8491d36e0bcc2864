"""Reversible layer removal on a loaded model: evaluate a cut without copying the model.

``skipped(model, remove)`` applies exactly the in-memory surgery of :func:`~.surgery.prune_layers` (so a
forward pass, with or without a KV cache, equals the saved pruned checkpoint's) and restores the model on exit:
the layer list, every ``layer_idx``, the sliced config fields, and whatever an architecture quirk changed
(tensors and module attributes of the renumbered layers). Used by the frontier, by measured budget targets and
by searches that try many cuts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..arch import parts
from .surgery import PruneRecord, prune_layers


def _attrs(mod: torch.nn.Module) -> dict[str, Any]:
    """A module's plain attributes (not its parameters, buffers or children)."""
    skip = {"_parameters", "_buffers", "_modules"}
    return {k: copy.copy(v) for k, v in mod.__dict__.items() if k not in skip}


@contextlib.contextmanager
@torch.no_grad()
def skipped(model: Any, remove: Iterable[int]) -> Iterator[PruneRecord]:
    """Within the block, ``model`` is pruned of ``remove`` (original 0-based indices); on exit it is restored
    exactly (checked by the tests: every tensor bit-identical, the config equal)."""
    p = parts(model)
    layers = list(p.layers)
    cfg = model.config
    cfg_before = copy.deepcopy(cfg.to_dict())
    mods = [m for layer in layers for m in layer.modules()]
    attrs = {id(m): _attrs(m) for m in mods}
    quirk = p.adapter.tensor_quirk is not None
    tensors = {id(t): t.detach().clone() for layer in layers for name, t in layer.state_dict(keep_vars=True).items()
               if quirk and name in p.adapter.quirk_tensors}
    originals = {id(t): t for layer in layers for name, t in layer.state_dict(keep_vars=True).items()
                 if quirk and name in p.adapter.quirk_tensors}
    try:
        yield prune_layers(model, remove)
    finally:
        del p.layers[:len(p.layers)]
        p.layers.extend(layers)
        for m in mods:
            m.__dict__.update(attrs[id(m)])
        for key, t in originals.items():
            t.data.copy_(tensors[key])
        for k in set(cfg.to_dict()) | set(cfg_before):
            if k in cfg_before and getattr(cfg, k, None) != cfg_before[k]:
                setattr(cfg, k, cfg_before[k])


__all__ = ["skipped"]
