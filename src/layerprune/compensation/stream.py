"""The calibration stream, layer by layer: where the layers come from (a loaded model, or a checkpoint read one
layer at a time), and one recorded dense pass: each layer's arguments, the dense input where the pruned stream
starts and the dense outputs where fits and training take their targets. ``lstsq``'s in-memory fit
(:func:`~layerprune.compensation.core.fit_in_memory`), ``reconstruct`` and the search's shared fitting pass read
such a recording, so the dense model runs once per calibration set.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..metrics._forward import (
    StopForward,
    call_layer,
    layer_hooks,
    layer_input,
    layer_output,
    model_inputs,
    record_call,
)

SPILL_BYTES = 2 << 30  # dense targets beyond this go to a temporary folder (one file per tensor)


class Store:
    """A list of tensors kept in memory up to ``limit`` bytes, then spilled to a temporary folder."""

    def __init__(self, limit: int = SPILL_BYTES):
        self.limit, self.used = limit, 0
        self.items: list[torch.Tensor | Path] = []
        self._dir: tempfile.TemporaryDirectory | None = None

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().float().cpu()
        size = t.numel() * 4
        if self.used + size <= self.limit:
            self.items.append(t)
            self.used += size
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="layerprune-reconstruct-")
        path = Path(self._dir.name) / f"{len(self.items)}.pt"
        torch.save(t, path)
        self.items.append(path)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return item if isinstance(item, torch.Tensor) else torch.load(item)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


class InMemoryLayers:
    """The decoder layers of a loaded model (original indices; changes stay in the model)."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    @contextlib.contextmanager
    def layer(self, pos: int) -> Iterator[nn.Module]:
        yield self.layers[pos]

    def commit(self, pos: int, module: nn.Module) -> None:
        pass


class DiskLayers:
    """Layers read one at a time by a :class:`~layerprune.metrics.layerwise.LayerwiseModel`, with ``overrides``
    (checkpoint name -> tensor) applied on top; :meth:`commit` adds a trained layer's tensors to them."""

    def __init__(self, lw: Any, overrides: dict[str, torch.Tensor]):
        self.lw, self.overrides = lw, overrides

    @contextlib.contextmanager
    def layer(self, pos: int) -> Iterator[nn.Module]:
        from accelerate.utils import set_module_tensor_to_device

        with self.lw.layer(pos) as mod:
            for rel, full in self.lw.layer_tensor_names(pos).items():
                if full in self.overrides:
                    set_module_tensor_to_device(mod, rel, self.lw.device, value=self.overrides[full].to(self.lw.dtype))
            yield mod

    def commit(self, pos: int, module: nn.Module) -> None:
        names = self.lw.layer_tensor_names(pos)
        for rel, t in module.state_dict().items():
            self.overrides[names[rel]] = t.detach().cpu().clone()


@dataclass
class Recorded:
    """What one dense pass leaves for fitting and training: the recorded layer arguments (``prep``: a
    :class:`~layerprune.metrics.layerwise.Prepared`), the dense inputs at layer ``begin`` (where the pruned
    stream starts) and the dense outputs at each target position, per batch (a :class:`Store` or a list)."""

    prep: Any
    begin: int
    inputs: list[torch.Tensor]
    targets: dict[int, Any]


@torch.no_grad()
def record_in_memory(model: nn.Module, calib: Any, batch_size: int | None, positions: set[int], begin: int,
                     progress: bool = True) -> Recorded:
    """One forward per calibration batch, stopped after the last of ``positions``: the embeddings output,
    every layer's other arguments (as the layer-by-layer recording pass gives them), the input of layer
    ``begin`` and the dense outputs at ``positions``."""
    from ..arch import parts
    from ..metrics.layerwise import Prepared

    layers = parts(model).layers
    last = max(positions)
    batches = calib.batches(batch_size)
    x0: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    calls: list[list[Any]] = [[] for _ in range(len(layers))]
    out = {p: Store() for p in positions}

    def hook(pos: int, args: tuple, kwargs: dict, output: Any) -> None:
        if pos == 0:
            x0.append(layer_input(args, kwargs).detach())
        if pos == begin:
            inputs.append(layer_input(args, kwargs).detach())
        calls[pos].append(record_call(args, kwargs))
        if pos in out:
            out[pos].append(layer_output(output))
        if pos == last:
            raise StopForward

    with layer_hooks(layers, hook):
        for ids, mask in tqdm(batches, desc="reconstruct: dense targets", disable=not progress, leave=False):
            with contextlib.suppress(StopForward):
                model(**model_inputs(model, ids, mask))
    return Recorded(Prepared(batches, x0, calls), begin, inputs, out)


@torch.no_grad()
def dense_targets(src: Any, prep: Any, positions: set[int], begin: int, progress: bool = True) -> Recorded:
    """The dense model's output at each of ``positions`` (and input at ``begin``), per calibration batch,
    streamed layer by layer."""
    out = {p: Store() for p in positions}
    xs = list(prep.x0)
    inputs: list[torch.Tensor] = xs
    for pos in tqdm(range(max(positions) + 1), desc="reconstruct: dense targets", disable=not progress,
                    leave=False):
        if pos == begin:
            inputs = xs
        with src.layer(pos) as layer:
            xs = [call_layer(layer, x, prep.calls[pos][b]) for b, x in enumerate(xs)]
        if pos in out:
            for x in xs:
                out[pos].append(x)
    return Recorded(prep, begin, inputs, out)


__all__ = ["DiskLayers", "InMemoryLayers", "Recorded", "Store", "dense_targets", "record_in_memory"]
