"""Apply a fitted map with hooks (while fitting, and as the reference in tests) or fold it into the weights.

A map is a float64 tensor: a [d, d] matrix ``T`` (row vectors: ``x ↦ x·T``) or a [d] vector (diagonal; a scalar
is a constant vector). The same tensor arithmetic serves the in-memory fold (module parameters) and the
layer-by-layer fold (tensors read from safetensors), so both write identical bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..arch import get_module, parts
from ..errors import LayerpruneError
from .plan import EMBED, MODULE, RESIDUAL, Block, Site, branch_outputs, module_kind


def apply_map(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(device=x.device, dtype=torch.float32)
    y = x.float() @ t if t.dim() == 2 else x.float() * t
    return y.to(x.dtype)


def fold_tensors(kind: str, tensors: dict[str, torch.Tensor], t: torch.Tensor, norm_offset: float = 0.0
                 ) -> dict[str, torch.Tensor]:
    """New ``weight``/``bias`` for a module of ``kind`` whose output becomes ``out·T`` (or ``out*t``)."""
    w = tensors["weight"].double()
    b = tensors.get("bias")
    b64 = b.double() if b is not None else None
    t = t.double()
    diag = t.dim() == 1
    if kind == "linear":  # out = x·Wᵀ + b, W: [d_out, d_in]
        w2 = t[:, None] * w if diag else t.T @ w
    elif kind == "conv1d":  # GPT-2 Conv1D: out = x·W + b, W: [d_in, d_out]
        w2 = w * t[None, :] if diag else w @ t
    elif kind == "embedding":  # rows are the vectors handed on
        w2 = w * t[None, :] if diag else w @ t
    elif kind == "norm":  # out = x̂·(offset + w) + b
        if not diag:
            raise LayerpruneError("only a diagonal map can be folded into a norm")
        w2 = (norm_offset + w) * t - norm_offset
    else:
        raise LayerpruneError(f"cannot fold into a module of kind {kind}")
    out = {"weight": w2.to(tensors["weight"].dtype)}
    if b is not None and b64 is not None:
        out["bias"] = (b64 * t if diag else b64 @ t).to(b.dtype)
    return out


def fold_module(mod: Any, t: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Fold the map into ``mod``'s parameters in place."""
    kind = module_kind(mod)
    current: dict[str, torch.Tensor] = {"weight": mod.weight.data}
    if getattr(mod, "bias", None) is not None:
        current["bias"] = mod.bias.data
    with torch.no_grad():
        for name, value in fold_tensors(kind, current, t, norm_offset).items():
            getattr(mod, name).data.copy_(value)


def map_tensor(fit: Any, site: Site) -> torch.Tensor:
    """The map of a fit as a tensor (matrix, or vector for diag/scalar)."""
    if fit.shape == "scalar":
        return torch.tensor([fit.alpha], dtype=torch.float64)
    if fit.shape == "diag":
        return 1.0 + fit.delta
    return fit.matrix()


def residual_scale(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A scalar map (a 1-element tensor) as the inverse scale for the later branch outputs."""
    return torch.full((dim,), 1.0 / float(t.reshape(-1)[0]), dtype=torch.float64)


def fold_targets(block: Block, site: Site, kept_after: list[int], adapter: Any) -> list[tuple[int | None, str, bool]]:
    """(layer index or None for a non-layer module, module path, inverse?) the block's map is folded into."""
    if site.kind == MODULE:
        return [(block.fold_layer, str(site.path), False)]
    if site.kind == EMBED:
        paths = [adapter.embed] + ([adapter.pos_embed] if adapter.pos_embed else [])
        return [(None, p, False) for p in paths]
    assert site.kind == RESIDUAL
    return [(i, p, True) for i in kept_after for p in branch_outputs(adapter)]


def fold_into_model(model: nn.Module, layers: nn.ModuleList, adapter: Any, block: Block, site: Site,
                    t: torch.Tensor, kept: list[int]) -> None:
    """Fold one block's map into an in-memory model (layers still at their original indices)."""
    dim = int(parts(model).embed.weight.shape[1])
    for layer_idx, path, inverse in fold_targets(block, site, [i for i in kept if i > block.end], adapter):
        root = model if layer_idx is None else layers[layer_idx]
        mod = get_module(root, path)
        if mod is None:
            raise LayerpruneError(f"fold point '{path}' not found")
        fold_module(mod, residual_scale(t, dim) if inverse else t, adapter.norm_offset)


def _pre_hook_residual(t: torch.Tensor) -> Any:
    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (apply_map(args[0], t),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = apply_map(kwargs["hidden_states"], t)
        return args, kwargs

    return hook


@contextlib.contextmanager
def map_hooks(model: nn.Module, layers: nn.ModuleList, maps: list[tuple[Block, Site, torch.Tensor]]
              ) -> Iterator[None]:
    """Apply maps with hooks on a model whose layers are at their original indices (removed ones may be skipped
    in place). Residual maps act on the input of the first layer after their block."""
    handles = []
    try:
        for block, site, t in maps:
            if site.kind == MODULE:
                mod = get_module(layers[int(block.fold_layer or 0)], str(site.path))
                assert mod is not None
                handles.append(mod.register_forward_hook(lambda m, a, out, t=t: apply_map(out, t)))
            elif not block.tail:
                handles.append(layers[block.end + 1].register_forward_pre_hook(_pre_hook_residual(t),
                                                                               with_kwargs=True))
            # A residual map on a tail block acts only through the final norm: a scalar there is a no-op.
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["apply_map", "fold_into_model", "fold_module", "fold_targets", "fold_tensors", "map_hooks",
           "map_tensor", "residual_scale"]
