"""What differs between architectures, as data: see :mod:`.registry` and :mod:`.generic`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import LayerpruneError
from .generic import adapter_for, adapter_for_config
from .registry import ADAPTERS, TESTED_TYPES, Adapter, adapter_for_type, get_module, supported_types

# Keys that may hold the layer count, by architecture family (GPT-2 spells it n_layer).
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# List-valued config keys that are never per-layer even when their length happens to match.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                  "eos_token_id", "forced_decoder_ids", "label2id", "id2label", "task_specific_params"}


@dataclass
class ModelParts:
    """The parts of a loaded causal LM that pruning and healing touch."""

    adapter: Adapter
    layers: nn.ModuleList
    embed: Any  # modules with a .weight (typed loosely: torch types attributes as Tensor | Module)
    norm: Any
    head: Any
    tied: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def parts(model: nn.Module) -> ModelParts:
    """Locate layers, embeddings, final norm and head of ``model`` (raises LayerpruneError if unsupported)."""
    ad = adapter_for(model)
    layers = get_module(model, ad.layers)
    embed = get_module(model, ad.embed)
    head = get_module(model, ad.head)
    if not isinstance(layers, nn.ModuleList) or embed is None or head is None:
        raise LayerpruneError(f"adapter '{ad.name}' does not match this model's structure")
    tied = getattr(head, "weight", None) is not None and head.weight is getattr(embed, "weight", None)
    return ModelParts(ad, layers, embed, get_module(model, ad.norm), head, tied)


def layer_count(cfg: dict[str, Any]) -> int:
    for k in COUNT_KEYS:
        if isinstance(cfg.get(k), int):
            return int(cfg[k])
    raise LayerpruneError("config has no layer count (num_hidden_layers / n_layer)")


def per_layer_fields(cfg: dict[str, Any], adapter: Adapter) -> dict[str, str]:
    """Config keys that describe individual layers -> kind ('list', 'index_list' or 'prefix_count')."""
    n = layer_count(cfg)
    out: dict[str, str] = {}
    for k, v in cfg.items():
        if k in _NOT_PER_LAYER:
            continue
        if k in adapter.index_list_fields and isinstance(v, (list, tuple)):
            out[k] = "index_list"
        elif k in adapter.prefix_count_fields and isinstance(v, int) and not isinstance(v, bool):
            out[k] = "prefix_count"
        elif isinstance(v, (list, tuple)) and len(v) == n and n > 1:
            out[k] = "list"
    return out


def sliced_config(cfg: dict[str, Any], kept: list[int], adapter: Adapter) -> dict[str, Any]:
    """The config entries that change when only ``kept`` (sorted original indices) remain.

    Per-layer lists are sliced by the kept indices (never re-derived from parity), index lists are remapped,
    prefix counts become the number of kept layers below the old boundary. Shared by the in-memory and the
    streaming path so both write identical configs.
    """
    cfg = dict(cfg)
    if adapter.config_quirk is not None:
        before = dict(cfg)
        adapter.config_quirk(cfg, kept)
        changed = {k: v for k, v in cfg.items() if before.get(k) != v}
    else:
        changed = {}
    remap = {old: new for new, old in enumerate(kept)}
    for k, kind in per_layer_fields(cfg, adapter).items():
        v = cfg[k]
        if kind == "list":
            changed[k] = [v[i] for i in kept]
        elif kind == "index_list":
            changed[k] = [remap[i] for i in v if i in remap]
        else:
            changed[k] = sum(1 for i in kept if i < v)
    for k in COUNT_KEYS:
        if isinstance(cfg.get(k), int):
            changed[k] = len(kept)
    return changed


__all__ = ["ADAPTERS", "TESTED_TYPES", "Adapter", "ModelParts", "adapter_for", "adapter_for_config", "adapter_for_type", "get_module",
           "layer_count", "parts", "per_layer_fields", "sliced_config", "supported_types"]
