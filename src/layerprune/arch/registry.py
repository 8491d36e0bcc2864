"""Architecture adapters: where each decoder family keeps its layers, and which config fields are per-layer.

Adapters are data (one :class:`Adapter` per family) in a registry keyed by ``config.model_type``. Anything
not registered falls back to :func:`layerprune.arch.generic.discover`, which finds the layer list by structure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LayerpruneError

# A tensor quirk rewrites one tensor of a kept layer (name relative to the layer) when the layer moves from
# original index `old` to new index `new`, so that behaviour that depends on the index survives a reload.
# It is pure tensor arithmetic so the in-memory and streaming paths produce identical bytes.
TensorQuirk = Callable[[str, torch.Tensor, int, int, Any], torch.Tensor]
# A module quirk updates derived attributes of a moved layer in memory (e.g. a cached scaling factor).
ModuleQuirk = Callable[[nn.Module, int, int, Any], None]
# A config quirk runs once on the config dict (before slicing) and may materialise index-derived behaviour.
ConfigQuirk = Callable[[dict[str, Any], list[int]], None]


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its parts. Paths are dotted attribute paths from the CausalLM root."""

    model_types: tuple[str, ...]
    layers: str
    embed: str
    norm: str | None
    head: str = "lm_head"
    # Per-layer config fields whose values are layer *indices* (remapped, removed entries dropped).
    index_list_fields: tuple[str, ...] = ("mlp_only_layers",)
    # Per-layer config fields that are a prefix count: layers with index < value behave differently.
    prefix_count_fields: tuple[str, ...] = ("max_window_layers", "first_k_dense_replace")
    tensor_quirk: TensorQuirk | None = None
    # Names (relative to a layer) the tensor quirk may change; streaming decodes only these.
    quirk_tensors: tuple[str, ...] = ()
    module_quirk: ModuleQuirk | None = None
    config_quirk: ConfigQuirk | None = None
    # Compensation fold points (paths relative to a decoder layer; see layerprune.compensation). ``mlp_out`` is
    # the MLP's output projection, ``attn_out`` the attention's; ``mlp_post_norm`` / ``attn_post_norm`` a norm
    # between that projection and the residual add (Gemma2/3), which only a diagonal map can pass exactly.
    mlp_out: str | None = None
    attn_out: str | None = None
    mlp_post_norm: str | None = None
    attn_post_norm: str | None = None
    # Norms computing x_hat * (offset + weight) (Gemma: 1.0); folding a diagonal map into them needs it.
    norm_offset: float = 0.0
    # Learned position embeddings added to the token embeddings (folded too when a block starts at layer 0).
    pos_embed: str | None = None
    # The MLP has three projections (SwiGLU/GeGLU) rather than two: the MAC count reads it. None: guessed from
    # the config's activation name.
    gated_mlp: bool | None = None
    # Perplexity collapses without a BOS at the start of every window (Gemma): the "auto" BOS policy reads it.
    bos_per_window: bool = False
    notes: str = ""

    @property
    def name(self) -> str:
        return self.model_types[0]


def _gpt2_inverse_idx(name: str, tensor: torch.Tensor, old: int, new: int, cfg: Any) -> torch.Tensor:
    """GPT-2 scales attention scores by 1/(layer_idx+1) when ``scale_attn_by_inverse_layer_idx`` is set.

    The factor is recomputed from the position at load time, so a layer moving from index `old` to `new` would
    change its output. Fold the ratio (new+1)/(old+1) into the query part of ``c_attn`` (weight and bias):
    q·k/(new+1) with q scaled by (new+1)/(old+1) equals the original q·k/(old+1) up to rounding.
    """
    if not _cfg_get(cfg, "scale_attn_by_inverse_layer_idx", False) or old == new:
        return tensor
    if name not in ("attn.c_attn.weight", "attn.c_attn.bias"):
        return tensor
    hidden = _cfg_get(cfg, "n_embd", None) or _cfg_get(cfg, "hidden_size")
    factor = float(new + 1) / float(old + 1)
    t = tensor.clone()
    # Conv1D stores the weight as [in, 3*hidden]; the first `hidden` output columns are the query.
    t[..., :hidden] = t[..., :hidden] * factor
    return t


def _gpt2_scaling(layer: nn.Module, old: int, new: int, cfg: Any) -> None:
    """In memory the attention keeps its cached 1/(old+1) scaling; after folding it must become 1/(new+1),
    exactly what a reload computes."""
    attn = getattr(layer, "attn", None)
    if attn is not None and _cfg_get(cfg, "scale_attn_by_inverse_layer_idx", False) and old != new:
        base = attn.head_dim**-0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
        attn.scaling = base / float(new + 1)  # the same expression GPT2Attention.__init__ evaluates


def _qwen_moe_sparse_step(cfg: dict[str, Any], kept: list[int]) -> None:
    """Qwen-MoE picks sparse layers by parity: ``(i+1) % decoder_sparse_step == 0``. Materialise the dense
    layers into ``mlp_only_layers`` (index list, remapped later) and set the step to 1, so moving a layer
    never changes whether it is sparse."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    n = cfg["num_hidden_layers"]
    if step == 1:
        return
    only = set(cfg.get("mlp_only_layers") or [])
    only |= {i for i in range(n) if (i + 1) % step != 0}
    cfg["mlp_only_layers"] = sorted(only)
    cfg["decoder_sparse_step"] = 1


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


_LLAMA_LIKE: dict[str, Any] = dict(layers="model.layers", embed="model.embed_tokens", norm="model.norm",
                                   mlp_out="mlp.down_proj", attn_out="self_attn.o_proj", gated_mlp=True)

ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add an adapter to the registry under each of its model types."""
    for mt in adapter.model_types:
        ADAPTERS[mt] = adapter
    return adapter


register(Adapter(("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo", "granite",
                  "cohere", "stablelm", "helium", "glm"), **_LLAMA_LIKE))
register(Adapter(("starcoder2",), layers="model.layers", embed="model.embed_tokens", norm="model.norm",
                 mlp_out="mlp.c_proj", attn_out="self_attn.o_proj", gated_mlp=False))
register(Adapter(("olmo2",), **_LLAMA_LIKE, mlp_post_norm="post_feedforward_layernorm",
                 attn_post_norm="post_attention_layernorm"))
register(Adapter(("gemma",), **_LLAMA_LIKE, norm_offset=1.0, bos_per_window=True, notes="Tied embeddings."))
register(Adapter(("gemma2", "gemma3_text", "gemma3"), **_LLAMA_LIKE, norm_offset=1.0, bos_per_window=True,
                 mlp_post_norm="post_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
                 notes="Tied embeddings; per-layer attention types live in config.layer_types; a norm after the "
                       "MLP limits compensation to a diagonal map."))
# Sparse MoE blocks have no single MLP output projection: no compensation fold point.
register(Adapter(("qwen2_moe", "qwen3_moe"), layers="model.layers", embed="model.embed_tokens", norm="model.norm",
                 attn_out="self_attn.o_proj", gated_mlp=True, config_quirk=_qwen_moe_sparse_step))
register(Adapter(("mixtral",), layers="model.layers", embed="model.embed_tokens", norm="model.norm",
                 attn_out="self_attn.o_proj", gated_mlp=True))
register(Adapter(("gpt2",), layers="transformer.h", embed="transformer.wte", norm="transformer.ln_f",
                 tensor_quirk=_gpt2_inverse_idx, quirk_tensors=("attn.c_attn.weight", "attn.c_attn.bias"),
                 module_quirk=_gpt2_scaling, mlp_out="mlp.c_proj", attn_out="attn.c_proj",
                 pos_embed="transformer.wpe", gated_mlp=False,
                 notes="scale_attn_by_inverse_layer_idx is folded into the query weights of moved layers."))
register(Adapter(("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens",
                 norm="model.decoder.final_layer_norm", mlp_out="fc2", attn_out="self_attn.out_proj",
                 pos_embed="model.decoder.embed_positions", gated_mlp=False))
register(Adapter(("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in",
                 norm="gpt_neox.final_layer_norm", mlp_out="mlp.dense_4h_to_h", attn_out="attention.dense",
                 gated_mlp=False))

# The architectures the test suite proves (tiny random configs); others use the same data or the fallback.
TESTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox",
                "gpt2", "opt")


def supported_types() -> list[str]:
    return sorted(ADAPTERS)


def get_module(root: nn.Module, path: str | None) -> nn.Module | None:
    """Resolve a dotted attribute path; None when any part is missing."""
    if not path:
        return None
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def adapter_for_type(model_type: str) -> Adapter:
    """Adapter for a ``config.model_type`` string, without a model (used by streaming pruning)."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise LayerpruneError(
            f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_types())}"
        ) from None
