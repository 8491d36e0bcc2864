"""Remove-one perplexity (``ppl``, Shortened-LLaMA's PPL criterion) on the calibration data.

Score of layer i = perplexity of the model with layer i skipped (higher = removing it hurts more = more
important). No model is rebuilt: layers are skipped in place.

Prefix reuse (default): one forward records every layer's input ``X_i`` (and its mask/position arguments);
the removal of layer i then resumes from ``X_i`` and runs only layers i+1..L-1 and the head. That is
``L + L(L-1)/2`` layer calls instead of the naive loop's ``L(L-1)``, and the same arithmetic, so the
scores equal the naive loop's (``reuse_prefix=False``, kept as the reference) to float rounding. The head
(and softcap/scale quirks) is applied by :func:`._forward.finish_fn`, which is checked against the model's
own logits first; if it does not match (an unknown architecture), the naive loop is used.

Cost: the recorded inputs take ``L x nsamples x seqlen x hidden`` values in the model dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import parts
from ._forward import (
    StopForward,
    call_layer,
    capture,
    finish_fn,
    layer_hooks,
    layer_output,
    model_inputs,
    nll_from_hidden,
    nll_from_logits,
    run_until_layers_done,
    skipped,
    verify_finish,
)
from .base import Metric, MetricResult, ScoreContext, register_metric


@register_metric
@dataclass
class Perplexity(Metric):
    """Calibration perplexity with each single layer removed."""

    name: ClassVar[str] = "ppl"
    group: ClassVar[str] = "ppl"
    cache_exclude: ClassVar[tuple[str, ...]] = ("reuse_prefix",)
    reuse_prefix: bool = field(default=True, metadata={"flag": "--naive-ppl", "help": "run the naive remove-one "
                                                       "loop instead of prefix reuse (same scores, slower)"})

    @classmethod
    def run(cls, metrics: list[Metric], model: nn.Module, calib: Any, ctx: ScoreContext) -> list[MetricResult]:
        out = []
        for m in metrics:
            assert isinstance(m, Perplexity)
            fn = remove_one_nll_prefix if m.reuse_prefix else remove_one_nll_naive
            nll, count, base, how = fn(model, calib, ctx.batch_size, ctx.progress)
            out.append(m.from_nll(nll, count, base, ctx, calib, how))
        return out

    def from_nll(self, nll: list[float], count: int, base: float | None, ctx: ScoreContext, calib: Any,
                 how: str) -> MetricResult:
        ppl = [math.exp(v / count) for v in nll]
        extra = {"tokens": count, "method": how, "nll_per_token": [v / count for v in nll],
                 "baseline_ppl": None if base is None else math.exp(base / count)}
        return self.result(ctx.full(ppl), ctx, calib, extra=extra)

    @classmethod
    def layerwise_consumer(cls, metrics: list[Metric], ctx: ScoreContext, calib: Any) -> Any:
        from .layerwise import PerplexityConsumer

        return PerplexityConsumer(metrics, ctx, calib)


@dataclass
class RemovalStep:
    """The result of removing one layer: its position, summed NLL, and the run's token count/baseline."""

    layer: int
    nll: float
    count: int
    baseline: float | None
    method: str


@torch.no_grad()
def iter_remove_one_prefix(model: nn.Module, calib: Any, batch_size: int | None = None) -> Iterator[RemovalStep]:
    """Yield one :class:`RemovalStep` per layer, resuming each removal from the recorded layer input.

    The recording forward (and the full model's NLL) happens before the first step. A generator so that a
    benchmark can interleave it with :func:`iter_remove_one_naive` under the same machine load.
    """
    batches = calib.batches(batch_size)
    finish = finish_fn(model)
    if not verify_finish(model, batches[0][0], batches[0][1], finish):
        warnings.warn("ppl: could not reproduce this model's logits from its last hidden state; "
                      "falling back to the naive remove-one loop", stacklevel=2)
        yield from iter_remove_one_naive(model, calib, batch_size)
        return
    layers = parts(model).layers
    n = len(layers)
    cap = capture(model, batches)
    base, count = 0.0, 0
    for b, (ids, mask) in enumerate(batches):
        v, c = nll_from_hidden(finish, cap.final[b], ids, mask)
        base += v
        count += c
    for i in range(n):
        hs = list(cap.inputs[i])  # skipping layer i: its input goes straight to layer i+1
        cap.inputs[i] = []  # not needed again: free it as we go
        for j in range(i + 1, n):  # layer-major so an offloaded layer is fetched once per removal
            hs = [call_layer(layers[j], h, cap.calls[j][b]) for b, h in enumerate(hs)]
        nll = sum(nll_from_hidden(finish, h, *batches[b])[0] for b, h in enumerate(hs))
        yield RemovalStep(i, nll, count, base, "prefix-reuse")


@torch.no_grad()
def iter_remove_one_naive(model: nn.Module, calib: Any, batch_size: int | None = None) -> Iterator[RemovalStep]:
    """The reference: for each layer, skip it in place and run the whole model on every batch."""
    batches = calib.batches(batch_size)
    finish = finish_fn(model)
    exact = verify_finish(model, batches[0][0], batches[0][1], finish)
    layers = parts(model).layers
    n = len(layers)
    for i in range(n):
        total, count = 0.0, 0
        with skipped(layers, i):
            for ids, mask in batches:
                if exact:  # same head code as prefix reuse, so the two are comparable in time and value
                    got: list[torch.Tensor] = []

                    def hook(pos: int, args: tuple, kwargs: dict, out: Any, got: list = got) -> None:
                        if pos == n - 1:
                            got.append(layer_output(out))
                            raise StopForward

                    with layer_hooks(layers, hook):
                        run_until_layers_done(model, ids, mask)
                    v, c = nll_from_hidden(finish, got[0], ids, mask)
                else:
                    v, c = nll_from_logits(model(**model_inputs(model, ids, mask)).logits, ids, mask)
                total += v
                count += c
        yield RemovalStep(i, total, count, None, "naive" if exact else "naive-model-logits")


def _collect(steps: Iterator[RemovalStep], n: int, desc: str,
             progress: bool) -> tuple[list[float], int, float | None, str]:
    out = list(tqdm(steps, total=n, desc=desc, disable=not progress, leave=False))
    return [s.nll for s in out], out[-1].count, out[-1].baseline, out[-1].method


def remove_one_nll_prefix(model: nn.Module, calib: Any, batch_size: int | None = None,
                          progress: bool = True) -> tuple[list[float], int, float | None, str]:
    """Summed NLL with each layer removed, with prefix reuse.

    Returns (nll per layer position, target token count, baseline NLL of the full model, method used).
    """
    return _collect(iter_remove_one_prefix(model, calib, batch_size), parts(model).num_layers,
                    "ppl (prefix reuse)", progress)


def remove_one_nll_naive(model: nn.Module, calib: Any, batch_size: int | None = None,
                         progress: bool = True) -> tuple[list[float], int, float | None, str]:
    """Summed NLL with each layer removed, by the naive loop (same return value as the prefix version)."""
    return _collect(iter_remove_one_naive(model, calib, batch_size), parts(model).num_layers,
                    "ppl (naive)", progress)
