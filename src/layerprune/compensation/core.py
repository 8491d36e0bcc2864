"""Fit every removed block's map (in memory, or layer by layer from safetensors) and fold it into the weights.

Blocks are fitted in order on the progressively compensated model, with targets from the dense model: block
``b``'s statistics are taken on the pruned model that already carries the maps of blocks ``< b``, so each map
corrects what actually reaches it (a map fitted on the dense model would assume its input is still dense).

* In memory: one recorded dense pass (:mod:`.stream`: each layer's arguments, the input of the first fold layer,
  the dense output at every block's end), then one pruned stream from the first fold layer, layer by layer
  (removed layers skipped, each map applied as soon as it is fitted). A multi-block cut costs one dense pass and
  one partial pruned pass instead of a dense and a pruned pass per block. Memory: the calibration hidden states
  at each block's end and two copies in flight.
* Layer by layer (layer-major, :class:`~layerprune.metrics.layerwise.LayerwiseModel`): one read of each layer,
  a dense and a pruned stream of the calibration hidden states side by side; the fold site's output is held
  from the fold layer to the block's end. Memory: one layer + three copies of the calibration hidden states.
  With ``reconstruct`` the dense pass is its recording (:func:`.stream.dense_targets`) and only the pruned
  stream runs here, as in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_module, parts
from ..errors import LayerpruneError
from ..metrics._forward import call_layer
from .fold import apply_map, fold_into_model, fold_targets, fold_tensors, map_tensor, residual_scale
from .methods import CompMethod, Fit, Stats
from .plan import EMBED, MODULE, RESIDUAL, Block, Site, module_kind, plan_blocks, resolve_site
from .stream import DiskLayers, InMemoryLayers, Recorded, record_in_memory


@dataclass
class BlockFit:
    block: Block
    site: Site
    fit: Fit

    def tensor(self) -> torch.Tensor:
        return map_tensor(self.fit, self.site)

    def describe(self, adapter: Any) -> dict[str, Any]:
        out = {"removed": list(self.block.removed), "fold_layer": self.block.fold_layer,
               "fold_point": self.site.describe(self.block, adapter), "site": self.site.kind,
               "map": self.fit.shape, "fit": self.fit.report}
        if self.site.note:
            out["note"] = self.site.note
        return out


def _sites(blocks: list[Block], adapter: Any, model: Any, layers: Any, tied: bool, method: CompMethod) -> list[Site]:
    return [resolve_site(b, adapter, model, layers, tied, method.map_shape) for b in blocks]


def check_calibration(method: CompMethod, sites: list[Site], tokens: int, dim: int) -> None:
    for s in sites:
        method.check_tokens(tokens, dim, s.shape)


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool().reshape(-1)


def _flat(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[sel.to(x.device)]


# ------------------------------------------------------------------------------------------------ in memory


@torch.no_grad()
def fit_in_memory(model: nn.Module, removed: list[int], calib: Any, method: CompMethod, *,
                  batch_size: int | None = None, progress: bool = True, rec: Recorded | None = None) -> list[BlockFit]:
    """Fit each block's map on a loaded model (not modified: the pruned stream runs the kept layers one by one).

    ``rec``: a recording of ``calib``'s dense pass that starts at or before the first block's fold layer and
    holds the dense output at every block's end (``reconstruct``'s, or the search's shared one); without it,
    one is made here."""
    p = parts(model)
    layers = p.layers
    blocks = plan_blocks(removed, len(layers))
    sites = _sites(blocks, p.adapter, model, layers, p.tied, method)
    dim = int(p.embed.weight.shape[1])
    check_calibration(method, sites, int(calib.attention_mask.sum()), dim)
    if method.map_shape == "none":
        return [BlockFit(b, s, method.fit(Stats(dim, method.keep_activations()), s.shape, b.label()))
                for b, s in zip(blocks, sites)]
    was_training = model.training
    model.eval()
    try:
        if rec is None:
            rec = record_in_memory(model, calib, batch_size, {b.end for b in blocks},
                                   blocks[0].start, progress)
        return _fit_stream(InMemoryLayers(layers), rec, blocks, sites, removed, method, dim, progress)
    finally:
        model.train(was_training)


@torch.no_grad()
def _fit_stream(src: Any, rec: Recorded, blocks: list[Block], sites: list[Site], removed: list[int],
                method: CompMethod, dim: int, progress: bool) -> list[BlockFit]:
    """The pruned stream from ``rec.begin`` (removed layers skipped, each map applied once fitted), fitting
    every block where the stream reaches its end against the recorded dense output there."""
    assert rec.begin <= blocks[0].start, "the recording starts after the first fold layer"
    skip = set(removed)
    by_end = {blk.end: (blk, site) for blk, site in zip(blocks, sites)}
    fold_of = {blk.fold_layer: (blk, site) for blk, site in zip(blocks, sites) if site.kind == MODULE}
    masks = [m for _, m in rec.prep.batches]
    xs = list(rec.inputs)
    parked: list[torch.Tensor] = []
    fits: list[BlockFit] = []
    for pos in tqdm(range(rec.begin, blocks[-1].end + 1), desc="compensate: pruned stream", disable=not progress,
                    leave=False):
        if pos not in skip:
            with src.layer(pos) as layer:
                xs = _run_layer(layer, xs, rec.prep.calls[pos], fold_of.get(pos), parked)
        if pos in by_end:
            fit, xs = _fit_block(*by_end[pos], method, dim, masks, xs, parked, rec.targets[pos])
            fits.append(fit)
            parked = []
    return fits


def _fit_block(blk: Block, site: Site, method: CompMethod, dim: int, masks: list[torch.Tensor],
               h: list[torch.Tensor], parked: list[torch.Tensor], dense: Any) -> tuple[BlockFit, list[torch.Tensor]]:
    """Fit one block from the pruned stream ``h`` at its end (``parked``: the fold site's outputs) against the
    dense outputs there; returns the fit and the stream with the map applied."""
    stats = Stats(dim, method.keep_activations())
    for b, mask in enumerate(masks):
        sel = _valid(mask)
        m = parked[b] if site.kind == MODULE else h[b] if site.kind == EMBED else None
        stats.update(_flat(m, sel) if m is not None else None, _flat(h[b], sel),
                     _flat(dense[b].to(h[b].device, h[b].dtype), sel))
    fit = BlockFit(blk, site, method.fit(stats, site.shape, blk.label()))
    if fit.fit.shape != "none":
        t = fit.tensor()
        if site.kind == MODULE:  # (OPT's MLP runs on flattened tokens: its output is [B*T, d])
            h = [x + (apply_map(m, t) - m).view_as(x) for x, m in zip(h, parked)]
        elif not blk.tail:
            h = [apply_map(x, t) for x in h]
    return fit, h


def fold_in_memory(model: nn.Module, fits: list[BlockFit], removed: list[int]) -> None:
    """Fold every fitted map into the (not yet pruned) model's weights."""
    p = parts(model)
    kept = [i for i in range(p.num_layers) if i not in set(removed)]
    for f in fits:
        if f.fit.shape != "none" and not (f.site.kind == RESIDUAL and f.block.tail):
            fold_into_model(model, p.layers, p.adapter, f.block, f.site, f.tensor(), kept)


# ------------------------------------------------------------------------------------------- layer by layer


@torch.no_grad()
def fit_layerwise(lw: Any, removed: list[int], calib: Any, method: CompMethod, *, batch_size: int | None = None,
                  progress: bool = True, rec: Recorded | None = None) -> list[BlockFit]:
    """Fit each block's map reading one layer at a time (``lw``: a LayerwiseModel).

    ``rec``: the dense pass already recorded layer by layer (``reconstruct``'s, holding the dense output at
    every block's end): then only the pruned stream runs, as in memory. Without it the dense and the pruned
    stream run side by side, one read of each layer serving both."""
    p = parts(lw.shell)
    n = lw.num_layers
    blocks = plan_blocks(removed, n)
    sites = _sites(blocks, lw.adapter, lw.shell, lw.layers, p.tied, method)
    dim = int(p.embed.weight.shape[1])
    check_calibration(method, sites, int(calib.attention_mask.sum()), dim)
    if rec is not None and method.map_shape != "none":
        return _fit_stream(DiskLayers(lw, {}), rec, blocks, sites, removed, method, dim, progress)
    removed_set = set(removed)
    prep = lw.prepare(calib, batch_size)
    dense = [x for x in prep.x0]
    pruned: list[torch.Tensor] | None = None  # None while it equals the dense stream
    parked: list[torch.Tensor] = []
    fits: list[BlockFit] = []
    by_end = {blk.end: (blk, site) for blk, site in zip(blocks, sites)}
    fold_of = {blk.fold_layer: (blk, site) for blk, site in zip(blocks, sites) if site.kind == MODULE}
    for pos in tqdm(range(n), desc="compensate layer by layer", disable=not progress, leave=False):
        with lw.layer(pos) as layer:
            fold = fold_of.get(pos)
            if pos in removed_set:
                if pruned is None:
                    pruned = list(dense)  # the streams part at the first removed layer
                dense = [call_layer(layer, x, prep.calls[pos][b]) for b, x in enumerate(dense)]
            elif pruned is None:  # still identical: one call serves both streams
                dense = _run_layer(layer, dense, prep.calls[pos], fold, parked)
            else:
                pruned = _run_layer(layer, pruned, prep.calls[pos], fold, parked)
                dense = [call_layer(layer, x, prep.calls[pos][b]) for b, x in enumerate(dense)]
        if pos in by_end:
            assert pruned is not None  # parted by now: the block was removed
            fit, pruned = _fit_block(*by_end[pos], method, dim, [m for _, m in prep.batches], pruned, parked, dense)
            fits.append(fit)
            parked = []
    return fits


def _run_layer(layer: nn.Module, xs: list[torch.Tensor], calls: list[Any], fold: tuple[Block, Site] | None,
               parked: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run a materialised layer on every batch; at a fold layer also record the fold site's output."""
    handle = None
    if fold is not None:
        parked.clear()
        mod = get_module(layer, str(fold[1].path))
        assert mod is not None
        handle = mod.register_forward_hook(lambda mo, a, o: parked.append(o.detach()))
    try:
        return [call_layer(layer, x, calls[b]) for b, x in enumerate(xs)]
    finally:
        if handle is not None:
            handle.remove()


def fold_overrides(lw: Any, fits: list[BlockFit], removed: list[int]) -> dict[str, torch.Tensor]:
    """The folded tensors by (original) checkpoint name, read from the safetensors files of ``lw``."""
    from safetensors import safe_open

    kept = [i for i in range(lw.num_layers) if i not in set(removed)]
    out: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        if name in out:
            return out[name]
        if name not in lw.files:
            raise LayerpruneError(f"fold point tensor '{name}' not found in the checkpoint")
        with safe_open(str(lw.files[name]), "pt", device="cpu") as fh:
            return fh.get_tensor(name)

    dim = int(parts(lw.shell).embed.weight.shape[1])
    for f in fits:
        if f.fit.shape == "none" or (f.site.kind == RESIDUAL and f.block.tail):
            continue
        t = f.tensor()
        for layer_idx, path, inverse in fold_targets(f.block, f.site, [i for i in kept if i > f.block.end],
                                                     lw.adapter):
            if layer_idx is None:
                mod, prefix = get_module(lw.shell, path), f"{path}."
            else:
                mod, prefix = get_module(lw.layers[layer_idx], path), f"{lw.prefix}{layer_idx}.{path}."
            if mod is None:
                raise LayerpruneError(f"fold point '{path}' not found")
            names = {k: prefix + k for k in ("weight", "bias") if prefix + k in lw.files}
            new = fold_tensors(module_kind(mod), {k: read(v) for k, v in names.items()},
                               residual_scale(t, dim) if inverse else t, lw.adapter.norm_offset)
            for k, v in new.items():
                out[names[k]] = v
    return out


def fit_summary(fits: list[BlockFit], adapter: Any, method: CompMethod, calib: Any, mode: str,
                seconds: float, trained: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``compensation`` section of layerprune.json (``trained``: the reconstruct reports, per span)."""
    out = {"method": method.name, "params": method.params(), "mode": mode,
           "calibration": calib.describe() if hasattr(calib, "describe") else None,
           "blocks": [f.describe(adapter) for f in fits], "seconds": round(seconds, 2),
           "order": "blocks in order on the progressively compensated model, targets from the dense model"}
    if trained is not None:
        out["reconstruct"] = trained
    return out


__all__ = ["BlockFit", "fit_in_memory", "fit_layerwise", "fit_summary", "fold_in_memory", "fold_overrides"]
