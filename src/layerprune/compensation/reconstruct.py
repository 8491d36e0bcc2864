"""Block-local reconstruction (``reconstruct``): train the kept layer(s) beside each removed block so that the
pruned model reproduces the dense hidden state after the block (Puzzle's blockwise local distillation, XMerge,
LLM-Streamline), starting from the ``lstsq`` fold.

Only the trained layers run per step, on their cached inputs; everything else is one layer-major stream of the
calibration hidden states. The same driver serves a loaded model (:class:`InMemoryLayers`) and a checkpoint
read one layer at a time (:class:`DiskLayers`), so both modes run identical layer calls.

Per block, the trained *span* is the last kept layer before it (``layers=before``), the first kept layer after
it (``after``) or both; the target is the dense output at the span's end. Where the span ends the model (a tail
block), the loss is measured after the final norm — where the head reads it. A block whose span would overlap
the next block's is merged with it (one span, the later target). The result is never worse than the start: the
fit error on the calibration set is measured before and after, and the start is restored if training did not
lower it.
"""

from __future__ import annotations

import contextlib
import copy
import math
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
from .plan import plan_blocks

SPILL_BYTES = 2 << 30  # dense targets beyond this go to a temporary folder (one file per tensor)


@dataclass(frozen=True)
class Span:
    """Kept layers (original indices, consecutive in the pruned model) trained to reach ``target``'s dense
    output; ``label`` names the removed block(s) it stands in for."""

    layers: tuple[int, ...]
    target: int
    label: str
    final: bool  # no kept layer follows: the loss is taken after the final norm


def plan_spans(removed: list[int], num_layers: int, layers: str) -> list[Span]:
    """One span per removed block (merged where they would overlap)."""
    kept = [i for i in range(num_layers) if i not in set(removed)]
    spans: list[Span] = []
    for blk in plan_blocks(removed, num_layers):
        after = next((i for i in kept if i > blk.end), None)
        want = {"before": [blk.fold_layer], "after": [after], "both": [blk.fold_layer, after]}[layers]
        chosen = [i for i in want if i is not None] or [i for i in (blk.fold_layer, after) if i is not None]
        target = blk.end if chosen[-1] < blk.end else chosen[-1]
        span = Span(tuple(chosen), target, blk.label(), final=not any(i > target for i in kept))
        if spans and span.layers[0] <= spans[-1].layers[-1]:
            prev = spans.pop()
            merged = tuple(sorted(set(prev.layers) | set(span.layers)))
            span = Span(merged, span.target, f"{prev.label},{span.label}", span.final)
        spans.append(span)
    return spans


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


# --------------------------------------------------------------------------------------------- layer sources


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


def first_changed(removed: list[int], num_layers: int, spec: Any) -> int:
    """The first layer the fold or the training changes (or skips): every layer before it computes what the
    dense model does, so the pruned stream starts there from the dense input."""
    blk = plan_blocks(removed, num_layers)[0]
    span = plan_spans(removed, num_layers, spec.layers)[0]
    return min(span.layers[0], blk.removed[0] if blk.fold_layer is None else blk.fold_layer)


@dataclass
class Recorded:
    """What one dense pass leaves for training: the recorded layer arguments (``prep``), the dense inputs at
    layer ``begin`` (where the pruned stream starts) and the dense outputs at each target position."""

    prep: Any
    begin: int
    inputs: list[torch.Tensor]
    targets: dict[int, Store]


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


def _run_span(mods: list[nn.Module], span: Span, x: torch.Tensor, calls: Any, b: int) -> torch.Tensor:
    for mod, pos in zip(mods, span.layers):
        x = call_layer(mod, x, calls[pos][b])
    return x


def _loss_terms(out: torch.Tensor, y: torch.Tensor, sel: torch.Tensor, loss: str, norm: Any) -> torch.Tensor:
    """Per-token loss on the valid positions (float32)."""
    if norm is not None:
        out, y = norm(out), norm(y)
    out, y = out.float()[sel], y.float()[sel]
    if loss == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(out, y, dim=-1)
    return ((out - y) ** 2).sum(-1)


@torch.no_grad()
def _evaluate(mods: list[nn.Module], span: Span, xs: list[torch.Tensor], ys: Store, prep: Any, loss: str,
              norm: Any) -> dict[str, float]:
    tot = sq = ref = 0.0
    n = 0
    for b, x in enumerate(xs):
        y = ys[b].to(x.device)
        sel = prep.batches[b][1].bool().to(x.device)
        out = _run_span(mods, span, x, prep.calls, b)
        tot += float(_loss_terms(out, y, sel, loss, norm).sum())
        d = (out.float() - y.float())[sel]
        sq += float((d * d).sum())
        ref += float((y.float()[sel] ** 2).sum())
        n += int(sel.sum())
    return {"loss": tot / max(n, 1), "mse": sq / max(n, 1), "relative_error": sq / ref if ref else math.nan}


def train_span(mods: list[nn.Module], span: Span, xs: list[torch.Tensor], ys: Store, prep: Any, spec: Any,
               norm: Any) -> dict[str, Any]:
    """Adam on the span's parameters (float32), one calibration batch per step, cosine learning-rate decay;
    the start is restored if the calibration fit error did not go down."""
    dtypes = [next(m.parameters()).dtype for m in mods]
    for m in mods:
        m.float().eval()
    before = _evaluate(mods, span, xs, ys, prep, spec.loss, norm)
    start = [copy.deepcopy(m.state_dict()) for m in mods]
    params = [p for m in mods for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=spec.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(spec.steps, 1))))
    try:
        with torch.enable_grad():
            for step in range(spec.steps):
                b = step % len(xs)
                x = xs[b].float()
                sel = prep.batches[b][1].bool().to(x.device)
                out = _run_span(mods, span, x, prep.calls, b)
                val = _loss_terms(out, ys[b].to(x.device), sel, spec.loss, norm).mean()
                opt.zero_grad(set_to_none=True)
                val.backward()
                opt.step()
                sched.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    after = _evaluate(mods, span, xs, ys, prep, spec.loss, norm)
    kept = after["loss"] <= before["loss"]
    if not kept:
        for m, sd in zip(mods, start):
            m.load_state_dict(sd)
    for m, dt in zip(mods, dtypes):
        m.to(dt)
    end = after if kept else before
    return {"block": span.label, "trained_layers": list(span.layers), "target_layer": span.target,
            "loss": spec.loss, "after_final_norm": norm is not None, "steps": spec.steps, "lr": spec.lr,
            "tokens": int(sum(int(m.sum()) for _, m in prep.batches)),
            "loss_before": before["loss"], "loss_after": end["loss"],
            "mse_before": before["mse"], "mse_after": end["mse"],
            "relative_error_before": before["relative_error"], "relative_error_after": end["relative_error"],
            "kept_training": kept}


def reconstruct(src: Any, rec: Recorded, removed: list[int], num_layers: int, spec: Any, norm: nn.Module | None,
                progress: bool = True) -> list[dict[str, Any]]:
    """Stream the calibration hidden states through the pruned model (removed layers skipped) from the first
    changed layer, training each span on the stream that reaches it; returns one report per span. ``src``
    holds the start (lstsq-folded)."""
    spans = {s.layers[0]: s for s in plan_spans(removed, num_layers, spec.layers)}
    skip = set(removed)
    reports: list[dict[str, Any]] = []
    prep = rec.prep
    xs = list(rec.inputs)
    inside: set[int] = set()
    last = max(spans[k].layers[-1] for k in spans)
    bar = tqdm(total=len(spans), desc="reconstruct: train", disable=not progress, leave=False)
    for pos in range(rec.begin, last + 1):
        if pos in skip or pos in inside:
            continue
        span = spans.get(pos)
        if span is None:
            with src.layer(pos) as layer, torch.no_grad():
                xs = [call_layer(layer, x, prep.calls[pos][b]) for b, x in enumerate(xs)]
            continue
        inside |= set(span.layers)
        with contextlib.ExitStack() as stack:
            mods = [stack.enter_context(src.layer(p)) for p in span.layers]
            reports.append(train_span(mods, span, xs, rec.targets[span.target], prep, spec,
                                      norm if span.final else None))
            for p, m in zip(span.layers, mods):
                src.commit(p, m)
            with torch.no_grad():
                xs = [_run_span(mods, span, x, prep.calls, b).to(x.dtype) for b, x in enumerate(xs)]
        bar.update(1)
    bar.close()
    return reports


class Reconstruction:
    """One reconstruct run: the dense targets are taken first (before any fold changes a weight), then
    :meth:`run` trains on the lstsq-folded layers. Build it with :meth:`in_memory` or :meth:`layerwise`."""

    def __init__(self, rec: Recorded, removed: list[int], num_layers: int, spec: Any, norm: nn.Module | None,
                 progress: bool = True, layers: nn.ModuleList | None = None):
        self.rec, self.removed, self.num_layers = rec, removed, num_layers
        self.spec, self.norm, self.progress, self.layers = spec, norm, progress, layers

    @staticmethod
    def positions(removed: list[int], num_layers: int, spec: Any) -> set[int]:
        """Where dense outputs are recorded: every span's target, and the first block's end (the first
        ``lstsq`` map is fitted from this same pass: :meth:`first_block`)."""
        return {s.target for s in plan_spans(removed, num_layers, spec.layers)} | {
            plan_blocks(removed, num_layers)[0].end}

    def first_block(self, block: Any, site: Any) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The first block's ``lstsq`` captures from the recording (no second dense pass): the recording
        starts at the first block's fold layer and holds the dense output at the block's end."""
        from .core import recorded_captures

        rec = self.rec
        assert self.layers is not None, "first_block needs the loaded model's layers (Reconstruction.in_memory)"
        assert rec.begin == (block.fold_layer or 0), "the recording starts at the first block's fold layer"
        return recorded_captures(self.layers, block, site, rec.inputs, rec.prep.calls[rec.begin],
                                 rec.targets[block.end], [m for _, m in rec.prep.batches])

    @classmethod
    def in_memory(cls, model: nn.Module, calib: Any, removed: list[int], spec: Any,
                  progress: bool = True) -> Reconstruction:
        from ..arch import parts

        p = parts(model)
        n = p.num_layers
        rec = record_in_memory(model, calib, spec.batch, cls.positions(removed, n, spec),
                               first_changed(removed, n, spec), progress)
        return cls(rec, removed, n, spec, p.norm, progress, p.layers)

    @classmethod
    def layerwise(cls, lw: Any, calib: Any, removed: list[int], spec: Any, progress: bool = True
                  ) -> Reconstruction:
        from ..arch import parts

        n = lw.num_layers
        rec = dense_targets(DiskLayers(lw, {}), lw.prepare(calib, spec.batch), cls.positions(removed, n, spec),
                            first_changed(removed, n, spec), progress)
        return cls(rec, removed, n, spec, parts(lw.shell).norm, progress)

    def run(self, start: Any) -> list[dict[str, Any]]:
        """Train every span of ``start`` (InMemoryLayers or DiskLayers holding the lstsq fold)."""
        targets = self.rec.targets
        try:
            reports = reconstruct(start, self.rec, self.removed, self.num_layers, self.spec, self.norm,
                                  self.progress)
        finally:
            for st in targets.values():
                st.close()
        if any(st.spilled for st in targets.values()):
            for r in reports:
                r["targets_on_disk"] = True
        return reports


__all__ = ["DiskLayers", "InMemoryLayers", "Reconstruction", "Recorded", "Span", "dense_targets",
           "first_changed", "plan_spans", "reconstruct", "record_in_memory"]
