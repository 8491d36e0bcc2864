"""The metric registry, the :class:`Metric` base class and :class:`MetricResult`.

Every metric is a small dataclass (its fields are its parameters) registered under a name. Metrics that
share a pass over the model declare the same ``group``; the stage (:func:`layerprune.scoring.score`) calls the
group's ``run`` classmethod once with all requested metrics of that group, so e.g. ``bi``, ``angular`` and
``cka`` come out of one forward. Scores are always indexed by the ORIGINAL layer index (layers already
removed are ``None``) and carry an explicit direction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import LayerpruneError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..data.calibration import Calibration

HIGHER = "higher_is_more_important"
LOWER = "lower_is_more_important"
DIRECTIONS = (HIGHER, LOWER)


@dataclass
class MetricResult:
    """One metric's scores for one model.

    ``scores[i]`` belongs to original layer ``i`` (``None`` when that layer is not in the scored model).
    ``block_scores`` (contiguous metrics only) maps a block size n to a value per original start layer; the
    best block to remove has the LOWEST value. ``extra`` holds metric-specific detail (baseline perplexity,
    similarity matrices, which parameters were counted, ...).
    """

    name: str
    scores: list[float | None]
    direction: str = HIGHER
    params: dict[str, Any] = field(default_factory=dict)
    kept: list[int] = field(default_factory=list)
    block_scores: dict[int, list[float | None]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None
    elapsed_s: float = 0.0
    cached: bool = False

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        if not self.kept:
            self.kept = [i for i, s in enumerate(self.scores) if s is not None]

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    def importance(self) -> list[float | None]:
        """Scores turned so that higher always means more important."""
        sign = 1.0 if self.direction == HIGHER else -1.0
        return [None if s is None else sign * s for s in self.scores]

    def removal_order(self) -> list[int]:
        """Original indices of the scored layers, least important first (ties: lower index first)."""
        imp = self.importance()
        return sorted(self.kept, key=lambda i: (_nan_low(imp[i]), i))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scores"] = [_json_float(s) for s in self.scores]
        if self.block_scores is not None:
            d["block_scores"] = {str(n): [_json_float(v) for v in vals] for n, vals in self.block_scores.items()}
        d["removal_order"] = self.removal_order()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricResult:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["scores"] = [_from_json_float(s) for s in kw["scores"]]
        if kw.get("block_scores") is not None:
            kw["block_scores"] = {int(n): [_from_json_float(v) for v in vals]
                                  for n, vals in kw["block_scores"].items()}
        return cls(**kw)


def _nan_low(x: float | None) -> float:
    # A NaN importance sorts first (removed first would be wrong, so we never produce NaN; this only keeps
    # sorting total if a user-supplied metric does).
    return -math.inf if x is None or math.isnan(x) else x


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    if math.isnan(x) or math.isinf(x):
        return str(x)  # JSON has no inf/nan
    return float(x)


def _from_json_float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass
class ScoreContext:
    """What a runner needs besides the model and calibration."""

    num_layers: int  # layers in the ORIGINAL model (length of every score list)
    layer_map: list[int]  # current layer position -> original index
    batch_size: int | None = None
    progress: bool = True
    device: Any = None

    def full(self, per_current: Sequence[float | None]) -> list[float | None]:
        """Spread per-current-layer values onto original indices (None for removed layers)."""
        out: list[float | None] = [None] * self.num_layers
        for pos, orig in enumerate(self.layer_map):
            v = per_current[pos]
            out[orig] = None if v is None else float(v)
        return out


class Metric:
    """Base class of a layer-importance metric. Subclasses are dataclasses whose fields are parameters.

    Class attributes describe the metric to the stage: ``group`` (metrics sharing a pass), whether it needs
    calibration data, whether selection removes a contiguous block, whether first/last protection applies,
    and whether a layer-by-layer (safetensors) runner exists.
    """

    name: ClassVar[str] = ""
    direction: ClassVar[str] = HIGHER
    group: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    contiguous: ClassVar[bool] = False
    protectable: ClassVar[bool] = True
    # Parameters that change the scores; everything else (e.g. prefix reuse on/off) is an implementation
    # choice that must give equal scores and so is left out of the cache key.
    cache_exclude: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def cache_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.params().items() if k not in self.cache_exclude}

    @classmethod
    def run(cls, metrics: list[Metric], model: nn.Module, calib: Calibration | None,
            ctx: ScoreContext) -> list[MetricResult]:
        """Compute all ``metrics`` (all of this group) on an in-memory or dispatched model."""
        raise NotImplementedError

    @classmethod
    def layerwise_consumer(cls, metrics: list[Metric], ctx: ScoreContext, calib: Calibration | None) -> Any:
        """A consumer for :meth:`layerprune.metrics.layerwise.LayerwiseModel.sweep` computing ``metrics``."""
        raise LayerpruneError(f"metric '{metrics[0].name}' has no layer-by-layer mode; "
                              f"use --mode memory or --mode dispatch")

    @property
    def label(self) -> str:
        """The registry name this instance was made from (an alias such as magnitude_l2, else ``name``)."""
        return getattr(self, "_label", None) or self.name

    def result(self, scores: list[float | None], ctx: ScoreContext, calib: Calibration | None = None,
               **kw: Any) -> MetricResult:
        return MetricResult(self.label, scores, self.direction, self.params(), list(ctx.layer_map),
                            calibration=calib.fingerprint if (calib is not None and self.needs_calibration)
                            else None, **kw)


# name -> (class, preset parameters). Aliases such as magnitude_l2 are the same class with a preset.
METRICS: dict[str, tuple[type[Metric], dict[str, Any]]] = {}


def register_metric(cls: type[Metric] | None = None, *, name: str | None = None,
                    **preset: Any) -> Callable[[type[Metric]], type[Metric]] | type[Metric]:
    """Class decorator: ``@register_metric`` or ``register_metric(Cls, name="alias", p=2)``."""

    def deco(c: type[Metric]) -> type[Metric]:
        key = name or c.name
        if not key:
            raise ValueError("a metric needs a name")
        METRICS[key] = (c, dict(preset))
        return c

    return deco(cls) if cls is not None else deco


def metric_names() -> list[str]:
    return sorted(METRICS)


def make_metric(spec: str | Metric | tuple[str, dict[str, Any]], **options: Any) -> Metric:
    """A metric instance from a name (plus options; unknown/None options are ignored) or an instance.

    ``options`` are the shared flags of the CLI (p, reductions, seed_compat, seed, ...): each metric takes
    the ones that are its fields. A registered alias's preset (e.g. ``magnitude_l2`` -> p=2) wins.
    """
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, tuple):
        spec, extra = spec
        options = {**options, **extra}
    key = str(spec).strip().lower()
    if key not in METRICS:
        raise LayerpruneError(f"unknown metric '{spec}'; choose from {', '.join(metric_names())}")
    cls, preset = METRICS[key]
    names: set[str] = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    kwargs = {k: v for k, v in {**options, **preset}.items() if k in names and v is not None}
    try:
        inst = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise LayerpruneError(f"bad parameters for metric '{key}': {e}") from None
    object.__setattr__(inst, "_label", key)
    return inst


def metric_options() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every metric parameter the registered metric classes declare (field name -> (field, metric names)): the
    CLI's metric flags are generated from these, so a new metric parameter is one dataclass field."""
    out: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for _key, (cls, preset) in sorted(METRICS.items()):
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") is False or f.name in preset or f.name.startswith("_"):
                continue
            entry = out.setdefault(f.name, (f, []))
            if cls.name not in entry[1]:
                entry[1].append(cls.name)
    return out


def parse_metric_list(values: Sequence[str] | str | None) -> list[str]:
    """``['bi,angular', 'cka']`` -> ``['bi', 'angular', 'cka']`` (order kept, duplicates dropped)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip().lower()
            if part and part not in out:
                out.append(part)
    return out
