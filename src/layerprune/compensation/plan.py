"""Where a removed block's compensation goes: contiguous blocks, their fold points, and the module kinds there.

A removed block is a maximal run of consecutive removed layers. Its map is fitted on the residual stream that
the pruned model hands past the block and folded into the last kept module that writes to that stream before
it: the MLP output projection of the layer before the block (``Adapter.mlp_out``), or, where a norm sits after
the MLP (``Adapter.mlp_post_norm``, Gemma2/3), that norm's weight as a diagonal map; a block starting at layer 0
folds into the input embeddings. Everything here is data from the architecture adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..arch import Adapter, get_module
from ..errors import LayerpruneError

# Site kinds: where the fitted map is applied and folded.
MODULE = "module"  # the output of a module inside the fold layer (mlp_out / mlp_post_norm)
EMBED = "embed"  # the residual entering the first kept layer, folded into the (untied) embeddings
RESIDUAL = "residual"  # a scalar on the residual after the block, folded into every later branch output


@dataclass(frozen=True)
class Block:
    """A run of consecutive removed layers (original indices) and the kept layer before it."""

    removed: tuple[int, ...]
    fold_layer: int | None  # None: the block starts at layer 0
    num_layers: int

    @property
    def end(self) -> int:
        return self.removed[-1]

    @property
    def start(self) -> int:
        """Where a pruned stream fitting this block starts: its fold layer (layer 0 for a block there)."""
        return 0 if self.fold_layer is None else self.fold_layer

    @property
    def tail(self) -> bool:
        return self.end == self.num_layers - 1

    def label(self) -> str:
        a, b = self.removed[0], self.removed[-1]
        return f"{a}-{b}" if a != b else str(a)


def plan_blocks(removed: list[int], num_layers: int) -> list[Block]:
    """Split sorted removed indices into contiguous blocks (in order)."""
    out: list[list[int]] = []
    for i in sorted(removed):
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return [Block(tuple(b), b[0] - 1 if b[0] > 0 else None, num_layers) for b in out]


def module_kind(mod: nn.Module) -> str:
    """linear | conv1d | embedding | norm (a module with a 1-D weight: LayerNorm, RMSNorm variants)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, Conv1D):
        return "conv1d"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    w = getattr(mod, "weight", None)
    if w is not None and w.dim() == 1:
        return "norm"
    raise LayerpruneError(f"cannot fold a map into a {type(mod).__name__}")


@dataclass(frozen=True)
class Site:
    """Where one block's map lives: ``kind`` (module/embed/residual), the map's shape (matrix/diag/scalar) and,
    for a module site, its path relative to the fold layer."""

    kind: str
    shape: str
    path: str | None = None
    note: str = ""

    def describe(self, block: Block, adapter: Adapter) -> str:
        if self.kind == MODULE:
            return f"{adapter.layers}.{block.fold_layer}.{self.path}"
        if self.kind == EMBED:
            return adapter.embed + (f" + {adapter.pos_embed}" if adapter.pos_embed else "")
        if self.kind == RESIDUAL:
            return "every later attention/MLP output" if not block.tail else "none (only the final norm follows)"
        return "none"


def supported_fold_types() -> list[str]:
    from ..arch import ADAPTERS

    return sorted(mt for mt, ad in ADAPTERS.items() if ad.mlp_out)


def branch_outputs(adapter: Adapter) -> list[str]:
    """The modules of a layer whose outputs are added to the residual stream (post-norms where present)."""
    out = [adapter.attn_post_norm or adapter.attn_out, adapter.mlp_post_norm or adapter.mlp_out]
    if not all(out):
        raise LayerpruneError(f"magnitude compensation needs the attention and MLP output modules of "
                              f"'{adapter.name}'; supported model types: {', '.join(supported_fold_types())}")
    return [str(p) for p in out]


def resolve_site(block: Block, adapter: Adapter, model: Any, layers: Any, tied: bool, map_shape: str) -> Site:
    """The fold point for ``block`` under a method whose map is ``map_shape`` (matrix or scalar); raises a
    one-line error where there is none."""
    if map_shape == "none":
        return Site("none", "none")
    if map_shape == "scalar":
        if not block.tail:
            for mod in layers:
                for path in branch_outputs(adapter):
                    if get_module(mod, path) is None:
                        raise LayerpruneError(f"magnitude compensation: no module '{path}' in the layers")
        return Site(RESIDUAL, "scalar", note="exact only where every later branch reads the stream through a "
                                              "scale-invariant norm (pre-norm layers)")
    if block.fold_layer is None:
        if tied:
            raise LayerpruneError(f"block {block.label()} starts at layer 0 and the input embeddings are tied to "
                                  "the output head: there is no layer to fold its map into (keep layer 0)")
        return Site(EMBED, "matrix")
    if not adapter.mlp_out:
        raise LayerpruneError(f"no compensation fold point known for '{adapter.name}'; supported model types: "
                              f"{', '.join(supported_fold_types())}")
    if adapter.mlp_post_norm:
        return Site(MODULE, "diag", adapter.mlp_post_norm,
                    note=f"a norm ({adapter.mlp_post_norm}) follows the MLP: only a diagonal map folds exactly")
    mod = get_module(layers[block.fold_layer], adapter.mlp_out)
    if mod is None:
        raise LayerpruneError(f"layer {block.fold_layer} has no '{adapter.mlp_out}'")
    module_kind(mod)  # raises for an unsupported module type
    return Site(MODULE, "matrix", adapter.mlp_out)


__all__ = ["EMBED", "MODULE", "RESIDUAL", "Block", "Site", "branch_outputs", "module_kind", "plan_blocks",
           "resolve_site", "supported_fold_types"]
