"""Baselines that need neither data nor weights: ``random`` (seeded) and ``reverse`` (deeper = less important).

``random`` scores layer i by its position in ``random.Random(seed).sample(range(L), L)``: drawn earlier =
more important. Because ``random.sample`` draws its first m elements the same way whatever the sample size,
removing the k lowest equals the seed's ``complement of sorted(random.sample(range(L), L - k))`` for every k
(seed 42, 32 layers, k = 8 -> {5, 6, 10, 11, 15, 22, 25, 26}). ``reverse`` scores layer i by ``L - i`` so the
last layers go first. Neither applies first/last protection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .base import Metric, MetricResult, ScoreContext, register_metric


@dataclass
class _Static(Metric):
    needs_calibration: ClassVar[bool] = False
    protectable: ClassVar[bool] = False

    def values(self, num_layers: int) -> list[float]:
        raise NotImplementedError

    @classmethod
    def run(cls, metrics: list[Metric], model: nn.Module | None, calib: Any, ctx: ScoreContext) -> list[MetricResult]:
        out = []
        for m in metrics:
            assert isinstance(m, _Static)
            vals = m.values(ctx.num_layers)  # defined on ORIGINAL indices, whatever was removed already
            out.append(m.result([vals[i] if i in set(ctx.layer_map) else None for i in range(ctx.num_layers)],
                                ctx, None))
        return out

    @classmethod
    def layerwise_consumer(cls, metrics: list[Metric], ctx: ScoreContext, calib: Any) -> Any:
        from .layerwise import StaticConsumer

        return StaticConsumer(cls, metrics, ctx)


@register_metric
@dataclass
class RandomOrder(_Static):
    """Seeded random importance (reproduces the seed's random removal for any k)."""

    name: ClassVar[str] = "random"
    group: ClassVar[str] = "random"
    seed: int = field(default=42, metadata={"cli": False})  # the calibration --seed

    def values(self, num_layers: int) -> list[float]:
        order = random.Random(self.seed).sample(range(num_layers), num_layers)
        score = [0.0] * num_layers
        for pos, layer in enumerate(order):
            score[layer] = float(num_layers - pos)
        return score


@register_metric
@dataclass
class Reverse(_Static):
    """Reverse order (the seed's ``tail``): importance L - i, so the deepest layers are removed first."""

    name: ClassVar[str] = "reverse"
    group: ClassVar[str] = "reverse"

    def values(self, num_layers: int) -> list[float]:
        return [float(num_layers - i) for i in range(num_layers)]
