"""Adapter lookup with a structural fallback: the registered adapter, else the decoder layer list of an
unregistered model found by its shape."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LayerpruneError
from .registry import ADAPTERS, Adapter, get_module, supported_types


def _path_of(model: Any, target: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def discover(model: Any) -> Adapter:
    """Build an adapter for ``model`` from structure: the ModuleList of identical blocks whose length equals
    the configured layer count, the input/output embeddings, and the norm that is a sibling of the list."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    mt = getattr(cfg, "model_type", "?")
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if n is not None and len(mod) != n:
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if best is None or embed is None or head is None:
        raise LayerpruneError(
            f"unsupported architecture '{mt}': no decoder layer list found; "
            f"supported model types: {', '.join(supported_types())}"
        )
    layers_path = best[0]
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    norm_path = None
    for child_name, child in parent.named_children():
        if "norm" in child_name.lower() or child_name in ("ln_f",):
            if not isinstance(child, nn.ModuleList):
                norm_path = f"{parent_path}.{child_name}" if parent_path else child_name
    return Adapter(
        (mt,),
        layers=layers_path,
        embed=_path_of(model, embed) or "",
        norm=norm_path,
        head=_path_of(model, head) or "lm_head",
        notes="discovered by structure (no registered adapter)",
    )


def adapter_for_config(cfg: dict[str, Any]) -> Adapter:
    """Adapter from a ``config.json`` dict without loading weights: the registered one, else structural
    discovery on a weightless (meta-device) instance of the model."""
    mt = cfg.get("model_type", "?")
    if mt in ADAPTERS:
        return ADAPTERS[mt]
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # any failure here means transformers cannot build it as a causal LM
        raise LayerpruneError(
            f"unsupported architecture '{mt}'; supported model types: {', '.join(supported_types())}"
        ) from None
    return adapter_for(model)


def adapter_for(model: Any) -> Adapter:
    """Adapter for a loaded model: the registered one, else one discovered from the module structure."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in ADAPTERS:
        ad = ADAPTERS[mt]
        if isinstance(get_module(model, ad.layers), nn.ModuleList):
            return ad
    return discover(model)
