"""How stable a layer ranking is: bootstrap over calibration windows, several calibration sources, and metrics.

For each metric, B bootstrap resamples of the calibration windows (drawn with replacement, seeded) give B
rankings; per layer we report its mean rank and 90% interval, and for the chosen k how often it lands in the
removed set. The **stable set** is the layers removed in at least 90% of the resamples. Kendall's tau compares
the full-sample rankings between calibration sources and between metrics.

Cost, by metric:

* ``bi`` and ``angular`` keep their statistics per window (one forward over the calibration set, as plain
  scoring); each resample re-weights those statistics — no extra forward.
* ``magnitude``, ``reverse`` and ``random`` do not read calibration data: their ranking cannot vary with it
  (intervals of width zero, at no cost).
* ``taylor``, ``ppl`` and ``cka`` (whose statistic is a Gram matrix over the samples of a batch, not a sum over
  windows) are re-run on each resample: one forward (``taylor``: and backward) pass per resample.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import parts
from .data.calibration import Calibration, CalibSpec, build_calibration
from .errors import LayerpruneError
from .metrics import make_metric
from .metrics.base import Metric, MetricResult, ScoreContext
from .metrics.similarity import AngularCollector, BICollector, Collector, HiddenStateMetric, collect
from .scoring import score
from .select import select_layers

STABLE = 0.9  # removed in at least this fraction of the resamples
_PER_WINDOW = (BICollector, AngularCollector)  # collectors whose statistics are sums over windows


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b between two score or rank vectors (NaN when either is constant)."""
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


class _PerWindow(Collector):
    """One collector per calibration window (rows of a batch are split), so resamples can re-weight them."""

    def __init__(self, make: Any):
        self.make = make
        self.cols: list[Collector] = []
        self.offset: dict[int, int] = {}

    def update(self, pos: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        if batch not in self.offset:
            self.offset[batch] = len(self.cols)
            self.cols.extend(self.make() for _ in range(x_in.shape[0]))
        base = self.offset[batch]
        for r in range(x_in.shape[0]):
            self.cols[base + r].update(pos, base + r, x_in[r:r + 1], x_out[r:r + 1], mask[r:r + 1])

    def combined(self, weights: np.ndarray) -> Collector:
        """A collector equal to the one fed every window ``weights[i]`` times (its sums re-weighted)."""
        out = self.make()
        for name, value in vars(out).items():
            if isinstance(value, list):
                setattr(out, name, [sum(w * getattr(c, name)[j] for c, w in zip(self.cols, weights) if w)
                                    for j in range(len(value))])
            elif torch.is_tensor(value):
                setattr(out, name, sum(float(w) * getattr(c, name) for c, w in zip(self.cols, weights) if w))
        return out


@dataclass
class MetricStability:
    """Bootstrap result of one metric."""

    metric: str
    ranks: np.ndarray  # [B, L] rank of each layer (0 = removed first) per resample
    removed_freq: list[float]  # per layer: fraction of resamples whose k-selection removes it
    full: MetricResult  # the full-sample result
    cost: str
    seconds: float

    def to_dict(self, num_layers: int) -> dict[str, Any]:
        lo, hi = np.percentile(self.ranks, [5, 95], axis=0)
        return {"metric": self.metric, "cost": self.cost, "seconds": round(self.seconds, 2),
                "mean_rank": [float(x) for x in self.ranks.mean(0)],
                "rank_interval_90": [[float(a), float(b)] for a, b in zip(lo, hi)],
                "removed_frequency": self.removed_freq,
                "stable_set": [i for i, f in enumerate(self.removed_freq) if f >= STABLE],
                "uncertain": [i for i, f in enumerate(self.removed_freq) if 0 < f < STABLE]}


def _ranks(r: MetricResult, n: int) -> np.ndarray:
    out = np.zeros(n)
    for pos, layer in enumerate(r.removal_order()):
        out[layer] = pos
    return out


def _subset(cal: Calibration, idx: np.ndarray) -> Calibration:
    t = torch.as_tensor(idx)
    return Calibration(cal.input_ids[t], cal.attention_mask[t], {**cal.info, "bootstrap": True})


def _per_window_metric(m: Metric) -> bool:
    return isinstance(m, HiddenStateMetric) and isinstance(m.collector(2), _PER_WINDOW)


@torch.no_grad()
def _per_window(model: nn.Module, metrics: list[Metric], cal: Calibration, draws: list[np.ndarray],
                batch_size: int | None, progress: bool) -> dict[str, tuple[MetricResult, list[MetricResult]]]:
    """bi/angular together: one forward (as plain scoring), then each resample re-weights the windows."""
    n = parts(model).num_layers
    ctx = ScoreContext(n, list(range(n)), batch_size, progress, None)
    pws = [_PerWindow(lambda m=m: m.collector(n)) for m in metrics]
    collect(model, cal, list(pws), ctx)
    out = {}
    for m, pw in zip(metrics, pws):
        full = m.finalize(pw.combined(np.ones(cal.nsamples)), ctx, cal)  # type: ignore[attr-defined]
        res = [m.finalize(pw.combined(np.bincount(d, minlength=cal.nsamples)), ctx, cal)  # type: ignore[attr-defined]
               for d in draws]
        out[m.label] = (full, res)
    return out


@torch.no_grad()
def _rerun(model: nn.Module, tokenizer: Any, m: Metric, cal: Calibration, draws: list[np.ndarray],
           batch_size: int | None, progress: bool = True) -> tuple[MetricResult, list[MetricResult]]:
    """Any other metric: scored on the full sample and on each resample (a data-free one only once)."""
    if not m.needs_calibration:
        full = score(model, [m], None, tokenizer=tokenizer, cache=False, progress=False).results[m.label]
        return full, [full] * len(draws)
    kw = {"tokenizer": tokenizer, "cache": False, "batch_size": batch_size, "progress": False}
    full = score(model, [m], cal, **kw).results[m.label]
    return full, [score(model, [m], _subset(cal, d), **kw).results[m.label]
                  for d in tqdm(draws, desc=f"stability {m.label}", disable=not progress, leave=False)]


def _summarise(m: Metric, full: MetricResult, results: list[MetricResult], k: int, n: int,
               protect: dict[str, int], cost: str, seconds: float) -> MetricStability:
    ranks = np.stack([_ranks(r, n) for r in results])
    freq = np.zeros(n)
    for r in results:
        freq[select_layers(r, k, metric=m, **protect)] += 1
    return MetricStability(m.label, ranks, [float(f) for f in freq / len(results)], full, cost, seconds)


def ranking_stability(model: nn.Module, tokenizer: Any, metrics: list[Any], k: int, *,
                      calib: list[CalibSpec] | CalibSpec | None = None, resamples: int = 20, seed: int = 0,
                      protect_first: int = 0, protect_last: int = 0, batch_size: int | None = None,
                      metric_options: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Bootstrap stability of each metric's ranking on the first calibration source, plus Kendall's tau
    between sources (per metric) and between metrics (on the first source). Deterministic under ``seed``.

    ``metrics``: names, ``(name, options)`` pairs or Metric instances, as :func:`layerprune.scoring.score`.
    """
    if resamples < 2:
        raise LayerpruneError("--stability needs at least 2 resamples")
    n = parts(model).num_layers
    if not 1 <= k < n:
        raise LayerpruneError(f"k must be between 1 and {n - 1} for a {n}-layer model (got {k})")
    specs = [calib] if isinstance(calib, CalibSpec) else list(calib or [CalibSpec()])
    objs = [make_metric(x, **(metric_options or {})) for x in metrics]
    cals = [build_calibration(tokenizer, s) for s in specs]
    protect = {"protect_first": protect_first, "protect_last": protect_last}
    # The same resamples for every metric, so their stabilities compare pair-wise.
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, cals[0].nsamples, cals[0].nsamples) for _ in range(resamples)]
    window = [m for m in objs if m.needs_calibration and _per_window_metric(m)]
    per_metric: dict[str, MetricStability] = {}
    t0 = time.perf_counter()
    if window:
        shared = _per_window(model, window, cals[0], draws, batch_size, progress)
        dt = time.perf_counter() - t0
        for m in window:
            per_metric[m.label] = _summarise(m, *shared[m.label], k, n, protect,
                                             "one forward (shared by bi/angular); resamples re-weight per-window "
                                             "statistics", dt)
    for m in objs:
        if m.label in per_metric:
            continue
        t0 = time.perf_counter()
        full, res = _rerun(model, tokenizer, m, cals[0], draws, batch_size, progress)
        cost = "none (the metric does not read calibration data)" if not m.needs_calibration else \
            f"{len(draws) + 1} passes (re-run per resample)"
        per_metric[m.label] = _summarise(m, full, res, k, n, protect, cost, time.perf_counter() - t0)
    per_metric = {m.label: per_metric[m.label] for m in objs}
    # Full-sample scores on the other sources (first source: from the bootstrap pass).
    by_source: dict[str, list[MetricResult]] = {lbl: [st.full] for lbl, st in per_metric.items()}
    for c in cals[1:]:
        other = score(model, [copy.deepcopy(m) for m in objs], c, tokenizer=tokenizer, cache=False,
                      batch_size=batch_size, progress=progress)
        for lbl in by_source:
            by_source[lbl].append(other.results[lbl])
    names = [c.info.get("source") or specs[i].source for i, c in enumerate(cals)]
    tau_sources = {lbl: [[kendall_tau(_ranks(a, n).tolist(), _ranks(b, n).tolist()) for b in rs] for a in rs]
                   for lbl, rs in by_source.items()}
    labels = list(per_metric)
    full_ranks = {lbl: _ranks(per_metric[lbl].full, n).tolist() for lbl in labels}
    tau_metrics = [[kendall_tau(full_ranks[a], full_ranks[b]) for b in labels] for a in labels]
    return {"k": k, "resamples": resamples, "seed": seed, "stable_threshold": STABLE, **protect,
            "calibration": [c.describe() for c in cals], "sources": names,
            "metrics": {lbl: st.to_dict(n) for lbl, st in per_metric.items()},
            "kendall_tau_sources": tau_sources, "kendall_tau_metrics": {"metrics": labels, "matrix": tau_metrics}}


__all__ = ["STABLE", "kendall_tau", "ranking_stability"]
