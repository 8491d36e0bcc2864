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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..metrics._forward import call_layer
from .plan import plan_blocks
from .stream import DiskLayers, Recorded, Store, dense_targets, record_in_memory


@dataclass(frozen=True)
class Span:
    """Kept layers (original indices, consecutive in the pruned model) trained to reach ``target``'s dense
    output; ``label`` names the removed block(s) it stands in for."""

    layers: tuple[int, ...]
    target: int
    label: str
    final: bool  # no kept layer follows: the loss is taken after the final norm


def plan_spans(removed: list[int], num_layers: int, layers: str, depth: int = 1) -> list[Span]:
    """One span per removed block (merged where they would overlap): ``depth`` kept layers before the block,
    after it, or both (where one side has none, the other)."""
    kept = [i for i in range(num_layers) if i not in set(removed)]
    spans: list[Span] = []
    for blk in plan_blocks(removed, num_layers):
        before = [i for i in kept if i < blk.removed[0]][-depth:]
        after = [i for i in kept if i > blk.end][:depth]
        chosen = {"before": before, "after": after, "both": before + after}[layers] or before or after
        target = blk.end if chosen[-1] < blk.end else chosen[-1]
        span = Span(tuple(chosen), target, blk.label(), final=not any(i > target for i in kept))
        if spans and span.layers[0] <= spans[-1].layers[-1]:
            prev = spans.pop()
            merged = tuple(sorted(set(prev.layers) | set(span.layers)))
            span = Span(merged, span.target, f"{prev.label},{span.label}", span.final)
        spans.append(span)
    return spans


def first_changed(removed: list[int], num_layers: int, spec: Any) -> int:
    """The first layer the fold or the training changes (or skips): every layer before it computes what the
    dense model does, so the pruned stream starts there from the dense input."""
    blk = plan_blocks(removed, num_layers)[0]
    span = plan_spans(removed, num_layers, spec.layers, spec.depth)[0]
    return min(span.layers[0], blk.start)


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


RETRY_DIVISOR = 4  # a learning rate that does not lower the fit is tried once more, this much smaller


def _adam(mods: list[nn.Module], span: Span, xs: list[torch.Tensor], ys: Store, prep: Any, spec: Any, norm: Any,
          lr: float) -> None:
    params = [p for m in mods for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
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


def train_span(mods: list[nn.Module], span: Span, xs: list[torch.Tensor], ys: Store, prep: Any, spec: Any,
               norm: Any) -> dict[str, Any]:
    """Adam on the span's parameters (float32), one calibration batch per step, cosine learning-rate decay.
    If the calibration fit error did not go down, the start is restored and training retried once at a
    learning rate ``RETRY_DIVISOR`` times smaller; if that fails too, the start stays."""
    dtypes = [next(m.parameters()).dtype for m in mods]
    for m in mods:
        m.float().eval()
    before = _evaluate(mods, span, xs, ys, prep, spec.loss, norm)
    start = [copy.deepcopy(m.state_dict()) for m in mods]
    tried: list[dict[str, float]] = []
    kept, after = False, before
    for lr in (spec.lr, spec.lr / RETRY_DIVISOR):
        _adam(mods, span, xs, ys, prep, spec, norm, lr)
        after = _evaluate(mods, span, xs, ys, prep, spec.loss, norm)
        tried.append({"lr": lr, "loss_after": after["loss"]})
        kept = after["loss"] <= before["loss"]
        if kept:
            break
        for m, sd in zip(mods, start):
            m.load_state_dict(sd)
    for m, dt in zip(mods, dtypes):
        m.to(dt)
    end = after if kept else before
    return {"block": span.label, "trained_layers": list(span.layers), "target_layer": span.target,
            "loss": spec.loss, "after_final_norm": norm is not None, "steps": spec.steps,
            "lr": tried[-1]["lr"] if kept else None, "tried": tried,
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
    spans = {s.layers[0]: s for s in plan_spans(removed, num_layers, spec.layers, spec.depth)}
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
                 progress: bool = True):
        self.rec, self.removed, self.num_layers = rec, removed, num_layers
        self.spec, self.norm, self.progress = spec, norm, progress

    @staticmethod
    def positions(removed: list[int], num_layers: int, spec: Any) -> set[int]:
        """Where dense outputs are recorded: every span's target and every block's end (the ``lstsq`` maps are
        fitted from this same pass: ``fit_in_memory(rec=...)``)."""
        return {s.target for s in plan_spans(removed, num_layers, spec.layers, spec.depth)} | {
            b.end for b in plan_blocks(removed, num_layers)}

    @classmethod
    def in_memory(cls, model: nn.Module, calib: Any, removed: list[int], spec: Any,
                  progress: bool = True) -> Reconstruction:
        from ..arch import parts

        p = parts(model)
        n = p.num_layers
        rec = record_in_memory(model, calib, spec.batch, cls.positions(removed, n, spec),
                               first_changed(removed, n, spec), progress)
        return cls(rec, removed, n, spec, p.norm, progress)

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


__all__ = ["Reconstruction", "Span", "first_changed", "plan_spans", "reconstruct"]
