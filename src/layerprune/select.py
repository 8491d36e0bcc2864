"""From scores to a removed set: one-shot (k least important, or the best contiguous block for ``angular``)
and iterative without healing (SLEB-style: remove ``step`` layers, re-score the pruned model, repeat).

All indices are ORIGINAL 0-based layer indices. First/last protection (``protect_first`` M,
``protect_last`` N: original layers 0..M-1 and L-N..L-1) applies to every metric whose class says it is
protectable (all but ``random`` and ``reverse``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import LayerpruneError
from .metrics.base import METRICS, Metric, MetricResult


def resolve_k(num_layers: int, k: int | None = None, ratio: float | None = None) -> int:
    """Layers to remove from ``k`` or ``ratio`` (floor(ratio * L): never more than the ratio asks)."""
    if (k is None) == (ratio is None):
        raise LayerpruneError("give exactly one of a layer count (--remove K / --num K) or --ratio")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise LayerpruneError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
        k = int(math.floor(ratio * num_layers + 1e-9))
        if k < 1:
            raise LayerpruneError(f"--ratio {ratio} removes no layer of {num_layers}")
    assert k is not None
    if isinstance(k, bool) or int(k) != k:
        raise LayerpruneError(f"layer count must be an integer, got {k}")
    k = int(k)
    if k < 1 or k >= num_layers:
        raise LayerpruneError(f"number of layers to remove must be between 1 and {num_layers - 1}, got {k}")
    return k


def protected_layers(num_layers: int, protect_first: int = 0, protect_last: int = 0) -> set[int]:
    """Original indices that are never selected."""
    if protect_first < 0 or protect_last < 0:
        raise LayerpruneError("--protect-first/--protect-last must be >= 0")
    return set(range(min(protect_first, num_layers))) | set(range(max(0, num_layers - protect_last), num_layers))


def _metric_class(result: MetricResult, metric: Metric | None) -> type[Metric] | None:
    if metric is not None:
        return type(metric)
    entry = METRICS.get(result.name)
    return entry[0] if entry else None


def select_layers(result: MetricResult, k: int, *, protect_first: int = 0, protect_last: int = 0,
                  metric: Metric | None = None) -> list[int]:
    """The ``k`` original layers to remove according to ``result`` (sorted ascending).

    Non-contiguous metrics: the k least important unprotected layers (ties: lower index first). Contiguous
    metrics (``angular``): the block of k consecutive layers of the scored model with the smallest
    ``block_scores[k]`` that contains no protected layer (ties: earlier block).
    """
    cls = _metric_class(result, metric)
    protectable = getattr(cls, "protectable", True)
    contiguous = getattr(cls, "contiguous", False) and result.block_scores is not None
    prot = protected_layers(result.num_layers, protect_first, protect_last) if protectable else set()
    kept = list(result.kept)
    if k < 1 or k >= len(kept):
        raise LayerpruneError(f"cannot remove {k} of the {len(kept)} scored layers")
    if contiguous:
        assert result.block_scores is not None
        table = result.block_scores.get(k)
        if table is None:
            raise LayerpruneError(f"{result.name}: no block scores for size {k}")
        best: tuple[float, int] | None = None
        for a in range(0, len(kept) - k + 1):
            block = kept[a:a + k]
            v = table[block[0]]
            if v is None or math.isnan(v) or prot & set(block):
                continue
            if best is None or v < best[0]:
                best = (v, a)
        if best is None:
            raise LayerpruneError(f"no contiguous block of {k} unprotected layers to remove")
        return sorted(kept[best[1]:best[1] + k])
    order = [i for i in result.removal_order() if i not in prot]
    if len(order) < k:
        raise LayerpruneError(f"only {len(order)} layers are not protected; cannot remove {k} "
                              f"(lower --protect-first/--protect-last)")
    return sorted(order[:k])


@dataclass
class IterationStep:
    """One iteration: which original layers it removed and the scores it chose them by."""

    step: int
    removed: list[int]
    result: MetricResult

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "removed": self.removed, "scores": self.result.to_dict()}


@dataclass
class Selection:
    """The outcome of selection: removed original indices (sorted), the order they went, per-step detail."""

    metric: str
    k: int
    removed: list[int]
    order: list[int]
    iterative: bool = False
    step: int = 1
    protect_first: int = 0
    protect_last: int = 0
    steps: list[IterationStep] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "k": self.k, "removed": self.removed, "removal_order": self.order,
                "iterative": self.iterative, "step": self.step, "protect_first": self.protect_first,
                "protect_last": self.protect_last, "steps": [s.to_dict() for s in self.steps]}


def select_one_shot(result: MetricResult, k: int, *, protect_first: int = 0, protect_last: int = 0,
                    metric: Metric | None = None) -> Selection:
    removed = select_layers(result, k, protect_first=protect_first, protect_last=protect_last, metric=metric)
    order = [i for i in result.removal_order() if i in set(removed)]
    return Selection(result.name, k, removed, order, protect_first=protect_first, protect_last=protect_last)
