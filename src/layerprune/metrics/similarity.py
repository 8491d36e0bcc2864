"""Hidden-state metrics from one forward: Block Influence (``bi``), angular distance (``angular``), linear
CKA (``cka``).

All three read each decoder layer's own input and output through forward hooks on the layers returned by
:func:`layerprune.arch.parts` (never ``hidden_states[-1]``, which already has the final norm applied), mask
padding with the attention mask, and accumulate in float64. Hidden state ``X_l`` is the input of layer l;
``X_L`` is the output of the last layer. Asked together they share one forward (and, layer by layer, one
sweep over the weights).

* ``bi`` (ShortGPT): ``1 - mean_t cos(X_l[t], X_{l+1}[t])`` over every non-padding token of every sample;
  every layer is scored, the last included. ``seed_compat`` gives the seed's single global cosine of the
  flattened tensors instead.
* ``angular`` (Gromov et al.): ``d(l, n) = mean_t arccos(cos(X_l[t], X_{l+n}[t])) / pi`` for every start l
  and EVERY block size n (0..L-l) from the same pass. The per-layer score is ``d(l, 1)``; selection of k
  layers removes the contiguous block with the smallest ``d(l, k)``. ``tokens='last'`` averages over the
  last real token of each sample only (the paper's choice). The angle is computed as
  ``2 asin(|u - v| / 2)`` of the unit vectors, exact for tiny angles where ``arccos`` loses precision.
* ``cka``: linear CKA (Kornblith et al., as the seed's ``get_rep.py``) between the flattened [seq*hidden]
  representations of the samples of a batch, for every pair of layer outputs (an L x L matrix, averaged over
  batches weighted by their size); the per-layer score is ``1 - CKA(X_l, X_{l+1})``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import parts
from ..errors import LayerpruneError
from ._forward import StopForward, layer_hooks, layer_input, layer_output, run_until_layers_done
from .base import Metric, MetricResult, ScoreContext, register_metric

# Bound on the [pairs, tokens, hidden] temporary of the angular computation (elements).
_ANGULAR_CHUNK = 1 << 25


class Collector:
    """Accumulates statistics from (layer position, batch, input, output, mask) in any order."""

    def update(self, pos: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        raise NotImplementedError


def _tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[T, hidden] float rows of the non-padding tokens."""
    return x[mask.to(x.device).bool()].float()


def _last_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.device).long()
    # index of the last real token per row (right or left padding)
    idx = (m * torch.arange(m.shape[1], device=m.device)).argmax(dim=1)
    return x[torch.arange(x.shape[0], device=x.device), idx].float()


class BICollector(Collector):
    def __init__(self, n: int):
        self.cos_sum = [0.0] * n
        self.count = [0] * n
        self.dot = [0.0] * n
        self.sq_in = [0.0] * n
        self.sq_out = [0.0] * n

    def update(self, pos: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        a = _tokens(x_in, mask).double()
        b = _tokens(x_out.to(x_in.device), mask).double()
        dot = (a * b).sum(-1)
        na, nb = a.norm(dim=-1), b.norm(dim=-1)
        cos = dot / (na * nb).clamp_min(1e-30)
        self.cos_sum[pos] += float(cos.sum())
        self.count[pos] += int(cos.numel())
        self.dot[pos] += float(dot.sum())
        self.sq_in[pos] += float((na * na).sum())
        self.sq_out[pos] += float((nb * nb).sum())


class AngularCollector(Collector):
    """Keeps, per batch, the unit-normalised states seen so far; each new output is compared with all of
    them, giving d(a, n) for every start a and size n. In forward order (all layers of a batch in a row) a
    batch's states are freed after its last layer; layer by layer they are all held (see docs/scoring.md)."""

    def __init__(self, n: int, last_token: bool):
        self.n = n
        self.last = last_token
        self.sums = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # [start, size]
        self.counts = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        self.states: dict[int, list[torch.Tensor]] = {}

    def _unit(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = _last_tokens(x, mask) if self.last else _tokens(x, mask)
        return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def _add(self, starts: list[int], sizes: list[int], prev: list[torch.Tensor], u: torch.Tensor) -> None:
        """Accumulate d(start, size) between each state in ``prev`` ([T, H] each) and ``u`` [T, H]."""
        step = max(1, _ANGULAR_CHUNK // max(1, u.numel()))
        parts_ = []
        for c in range(0, len(prev), step):
            diff = (torch.stack(prev[c:c + step]) - u.unsqueeze(0)).norm(dim=-1)  # [c, T]
            ang = 2.0 * torch.asin((diff / 2).clamp(max=1.0)) / math.pi
            parts_.append(ang.double().sum(dim=1).cpu())
        sums = torch.cat(parts_)
        idx = (torch.tensor(starts), torch.tensor(sizes))
        self.sums.index_put_(idx, sums, accumulate=True)
        self.counts.index_put_(idx, torch.full_like(sums, float(u.shape[0])), accumulate=True)

    def update(self, pos: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        st = self.states.setdefault(batch, [])
        if pos == 0:
            u0 = self._unit(x_in, mask)
            st.append(u0)
            self._add([0], [0], [u0], u0)  # n = 0 from the same formula
        if len(st) != pos + 1:
            raise RuntimeError("angular collector: layer outputs arrived out of order")
        u = self._unit(x_out, mask).to(st[0].device)
        self._add(list(range(pos + 1)), [pos + 1 - a for a in range(pos + 1)], st, u)
        self._add([pos + 1], [0], [u], u)
        st.append(u)
        if pos == self.n - 1:
            del self.states[batch]

    def table(self) -> torch.Tensor:
        """[start, size] mean angular distance (NaN where start + size > L)."""
        return self.sums / self.counts.where(self.counts > 0, torch.full_like(self.counts, math.nan))


class CKACollector(Collector):
    """Per batch and state, the Gram matrix of the samples' flattened (padding zeroed) representations."""

    def __init__(self, n: int):
        self.n = n
        self.grams: dict[int, dict[int, torch.Tensor]] = {}

    @staticmethod
    def _gram(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.device).to(torch.float64).unsqueeze(-1)
        flat = (x.double() * m).reshape(x.shape[0], -1)
        return (flat @ flat.T).cpu()

    def update(self, pos: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        g = self.grams.setdefault(batch, {})
        if pos == 0:
            g[0] = self._gram(x_in, mask)
        g[pos + 1] = self._gram(x_out, mask)

    def matrix(self) -> torch.Tensor:
        """[L+1, L+1] CKA between all states (state 0 = embeddings output), batch-size weighted mean."""
        total = torch.zeros(self.n + 1, self.n + 1, dtype=torch.float64)
        weight = 0
        for g in self.grams.values():
            b = g[0].shape[0]
            if b < 2:
                continue
            h = torch.eye(b, dtype=torch.float64) - 1.0 / b
            kc = torch.stack([h @ g[s] @ h for s in range(self.n + 1)]).reshape(self.n + 1, -1)
            hsic = kc @ kc.T
            norm = hsic.diagonal().clamp_min(1e-300).sqrt()
            total += b * (hsic / norm.unsqueeze(0) / norm.unsqueeze(1))
            weight += b
        if weight == 0:
            raise LayerpruneError("cka needs batches of at least 2 samples (raise --batch-size/--nsamples)")
        return total / weight


@dataclass
class HiddenStateMetric(Metric):
    """Base of the metrics computed from layer inputs/outputs in the shared forward."""

    group: ClassVar[str] = "hidden"

    def collector(self, n: int) -> Collector:
        raise NotImplementedError

    def finalize(self, col: Collector, ctx: ScoreContext, calib: Any) -> MetricResult:
        raise NotImplementedError

    @classmethod
    @torch.no_grad()
    def run(cls, metrics: list[Metric], model: nn.Module, calib: Any, ctx: ScoreContext) -> list[MetricResult]:
        n = parts(model).num_layers
        cols = [m.collector(n) for m in metrics]  # type: ignore[attr-defined]
        collect(model, calib, cols, ctx)
        return [m.finalize(c, ctx, calib) for m, c in zip(metrics, cols)]  # type: ignore[attr-defined]

    @classmethod
    def layerwise_consumer(cls, metrics: list[Metric], ctx: ScoreContext, calib: Any) -> Any:
        from .layerwise import CollectorConsumer

        return CollectorConsumer(metrics, ctx, calib)


@torch.no_grad()
def collect(model: nn.Module, calib: Any, cols: list[Collector], ctx: ScoreContext) -> None:
    """One forward over the calibration batches, feeding every layer's input and output to ``cols``."""
    layers = parts(model).layers
    n = len(layers)
    batches = calib.batches(ctx.batch_size)
    state: dict[str, Any] = {"batch": 0, "mask": None}

    def hook(pos: int, args: tuple, kwargs: dict, out: Any) -> None:
        x_in, x_out = layer_input(args, kwargs), layer_output(out)
        for c in cols:
            c.update(pos, state["batch"], x_in, x_out, state["mask"])
        if pos == n - 1:
            raise StopForward

    with layer_hooks(layers, hook):
        for b, (ids, mask) in enumerate(tqdm(batches, desc="hidden-state pass", disable=not ctx.progress,
                                             leave=False)):
            state["batch"], state["mask"] = b, mask
            run_until_layers_done(model, ids, mask)


@register_metric
@dataclass
class BlockInfluence(HiddenStateMetric):
    """ShortGPT Block Influence: 1 - mean token cosine between a layer's input and output."""

    name: ClassVar[str] = "bi"
    seed_compat: bool = field(default=False, metadata={"help": "reproduce the seed: ||W||_p^p (bi: one global "
                                                               "cosine)"})

    def collector(self, n: int) -> Collector:
        return BICollector(n)

    def finalize(self, col: Collector, ctx: ScoreContext, calib: Any) -> MetricResult:
        assert isinstance(col, BICollector)
        if self.seed_compat:
            vals = [1.0 - col.dot[i] / math.sqrt(max(col.sq_in[i] * col.sq_out[i], 1e-300))
                    for i in range(len(col.dot))]
        else:
            vals = [1.0 - col.cos_sum[i] / max(col.count[i], 1) for i in range(len(col.count))]
        return self.result(ctx.full(vals), ctx, calib, extra={"tokens": col.count[0] if col.count else 0})


@register_metric
@dataclass
class Angular(HiddenStateMetric):
    """Gromov et al. angular distance between the input of layer l and of layer l+n, for every n."""

    name: ClassVar[str] = "angular"
    contiguous: ClassVar[bool] = True
    tokens: str = field(default="all", metadata={"flag": "--angular-tokens", "choices": ("all", "last"),
                                                 "help": "average over all tokens or the last token of each "
                                                         "sample"})

    def __post_init__(self) -> None:
        if self.tokens not in ("all", "last"):
            raise ValueError("tokens must be 'all' or 'last'")

    def collector(self, n: int) -> Collector:
        return AngularCollector(n, self.tokens == "last")

    def finalize(self, col: Collector, ctx: ScoreContext, calib: Any) -> MetricResult:
        assert isinstance(col, AngularCollector)
        tab = col.table()
        n = col.n
        per_layer = [float(tab[a, 1]) for a in range(n)]
        blocks: dict[int, list[float | None]] = {}
        for size in range(0, n + 1):
            vals: list[float | None] = [None] * ctx.num_layers
            for a in range(0, n - size + 1):
                if a < n:  # a block starts at an existing layer (size 0 at position n has no layer)
                    vals[ctx.layer_map[a]] = float(tab[a, size])
            blocks[size] = vals
        return self.result(ctx.full(per_layer), ctx, calib, block_scores=blocks)


@register_metric
@dataclass
class CKA(HiddenStateMetric):
    """Linear CKA between layer outputs (similarity matrix) and 1 - CKA(input, output) per layer."""

    name: ClassVar[str] = "cka"

    def collector(self, n: int) -> Collector:
        return CKACollector(n)

    def finalize(self, col: Collector, ctx: ScoreContext, calib: Any) -> MetricResult:
        assert isinstance(col, CKACollector)
        m = col.matrix()
        n = col.n
        per_layer = [1.0 - float(m[i, i + 1]) for i in range(n)]
        outputs = m[1:, 1:]  # between layer outputs, as the seed's get_rep.py
        return self.result(ctx.full(per_layer), ctx, calib,
                           extra={"matrix": [[float(v) for v in row] for row in outputs],
                                  "matrix_layers": list(ctx.layer_map),
                                  "matrix_of": "layer outputs (row/col = original layer index in matrix_layers)"})
