"""Budget targets: prune to a stated size or speed instead of a layer count.

``--target KIND=VALUE``; the smallest removal (in the metric's order) that meets it is chosen.

=========================  ========================================================  ==================
kind                       value                                                     met when
=========================  ========================================================  ==================
``params``                 absolute (``100M``, ``1.2B``) or a fraction of dense       total <= value
``non_embedding_params``   the same                                                   non-embedding <=
``macs``                   absolute MACs per token at a 128-token prompt, or fraction  MACs <= value
``kv_cache``               bytes per token (``18KB``) or a fraction of dense          KV bytes <= value
``prefill_speedup``        dense latency / pruned latency, measured here (``1.25``)   speedup >= value
``decode_speedup``         pruned tokens/s / dense tokens/s, measured here            speedup >= value
=========================  ========================================================  ==================

The analytic kinds come from the model's shapes with the formulas ``measure`` uses (per-layer parameter counts
of the actual layers, :func:`~layerprune.measurement.analytic_macs`); the measured ones time the dense model and
each candidate cut on the loaded model (:func:`~layerprune.prune.skipped`, no copy) with ``measure``'s warm-up
and repeats, and the measurement is recorded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import LayerpruneError

ANALYTIC = ("params", "non_embedding_params", "macs", "kv_cache")
MEASURED = ("prefill_speedup", "decode_speedup")
KINDS = ANALYTIC + MEASURED
MACS_SEQ_LEN = 128  # the prompt length at which "MACs per token" is counted (attention grows with it)
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "KB": 1e3, "MB": 1e6, "GB": 1e9,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Target:
    """One budget: ``kind`` and ``value`` (``relative``: a fraction of the dense model's value)."""

    kind: str
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Target:
        """``params=100M``, ``params=0.8``, ``kv_cache=18KB``, ``decode_speedup=1.25``; one-line errors."""
        if "=" not in str(text):
            raise LayerpruneError(f"--target '{text}' must look like KIND=VALUE (kinds: {', '.join(KINDS)})")
        kind, raw = (s.strip() for s in str(text).split("=", 1))
        kind = kind.lower().replace("-", "_")
        if kind not in KINDS:
            raise LayerpruneError(f"unknown target kind '{kind}'; choose one of {', '.join(KINDS)}")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*([A-Za-z]*)", raw)
        if not m or m.group(2).upper() not in _SUFFIX:
            raise LayerpruneError(f"--target {kind}: '{raw}' is not a number (e.g. 100M, 0.8, 18KB, 1.25)")
        v = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
        if v <= 0:
            raise LayerpruneError(f"--target {kind} must be positive")
        if kind in MEASURED:
            if v <= 1:
                raise LayerpruneError(f"--target {kind}={raw}: a speedup target must be above 1")
            return cls(kind, v, False)
        return cls(kind, v, relative=v <= 1 and not m.group(2))

    def describe(self) -> str:
        return f"{self.kind}={self.value:g}{' of dense' if self.relative else ''}"


@dataclass
class Sizes:
    """Per-layer accounting of a model's analytic sizes, from its layers (or a meta-device copy: no weights)."""

    total: int
    non_embedding: int
    layer_params: list[int]
    macs_fixed: float  # per token, outside the layers (head, projections)
    macs_per_layer: float  # per token, one layer
    kv_per_layer: int  # bytes per token, one layer
    dtype_bytes: int

    @classmethod
    def of(cls, model: Any, dtype_bytes: int | None = None) -> Sizes:
        from .arch import parts
        from .measurement import analytic_macs, param_counts, shape_of

        pc = param_counts(model)
        layers = parts(model).layers
        s = shape_of(model.config)
        n = len(layers)
        macs = analytic_macs(model.config, MACS_SEQ_LEN, num_layers=n)
        b = dtype_bytes or next(model.parameters()).element_size()
        return cls(total=pc["total"], non_embedding=pc["non_embedding"],
                   layer_params=[sum(p.numel() for p in layer.parameters()) for layer in layers],
                   macs_fixed=(macs["lm_head"] + macs["other"]) / MACS_SEQ_LEN,
                   macs_per_layer=macs["per_layer"] / MACS_SEQ_LEN,
                   kv_per_layer=2 * s["kv_heads"] * s["head_dim"] * b, dtype_bytes=b)

    @classmethod
    def of_checkpoint(cls, path: str, dtype: Any = "auto") -> Sizes:
        """The sizes of a checkpoint folder from its structure alone (a meta-device model: no weights read)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from .models import parse_dtype

        cfg = AutoConfig.from_pretrained(path)
        dt = parse_dtype(dtype)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt if isinstance(dt, torch.dtype) else None)
        return cls.of(model)

    def after(self, removed: list[int]) -> dict[str, float]:
        """The analytic values with ``removed`` (positions in this model) taken out."""
        gone = sum(self.layer_params[i] for i in removed)
        kept = len(self.layer_params) - len(removed)
        return {"params": self.total - gone, "non_embedding_params": self.non_embedding - gone,
                "macs": self.macs_fixed + kept * self.macs_per_layer, "kv_cache": kept * self.kv_per_layer}


@dataclass
class Choice:
    """The result of a target search: the removal, what it reaches, and what was tried."""

    target: Target
    removed: list[int]
    value: float
    dense_value: float
    tried: list[dict[str, Any]] = field(default_factory=list)
    measurement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"target": {**asdict(self.target), "text": self.target.describe()}, "removed": self.removed,
                "k": len(self.removed), "value": self.value, "dense_value": self.dense_value,
                "tried": self.tried, "measurement": self.measurement}


def _limit(t: Target, dense: float) -> float:
    return t.value * dense if t.relative else t.value


def target_met(t: Target, value: float, dense: float) -> bool:
    return value >= t.value if t.kind in MEASURED else value <= _limit(t, dense) * (1 + 1e-12)


def time_model(model: Any, measure_opts: dict[str, Any]) -> dict[str, Any]:
    """``measure``'s speed benchmark with the target defaults (batch 1, 64-token prompt, 32 new tokens)."""
    from .measurement import bench_speed

    opts = {"seq_len": 64, "batch": 1, "new_tokens": 32, "warmup": 2, "repeats": 3, **measure_opts}
    return bench_speed(model, **opts)


def speedup_value(kind: str, dense: dict[str, Any], cand: dict[str, Any]) -> float:
    if kind == "prefill_speedup":
        return dense["prefill_seconds"]["median"] / cand["prefill_seconds"]["median"]
    return cand["decode_tokens_per_s"] / dense["decode_tokens_per_s"]


def _refuse_met_by_dense(target: Target, sizes: Sizes) -> None:
    dense = sizes.after([])[target.kind]
    if target_met(target, dense, dense):
        raise LayerpruneError(f"target {target.describe()} is already met by the dense model: nothing needs to be "
                              "removed")


def check_reachable(target: Target, sizes: Sizes, max_k: int) -> None:
    """Before any scoring: refuse an analytic target that the dense model already meets (removing a layer would
    be a silent reinterpretation) or that even the largest allowed removal cannot meet."""
    if target.kind not in ANALYTIC:
        return
    _refuse_met_by_dense(target, sizes)
    biggest = sorted(range(len(sizes.layer_params)), key=lambda i: -sizes.layer_params[i])[:max_k]
    v, dense = sizes.after(biggest)[target.kind], sizes.after([])[target.kind]
    if not target_met(target, v, dense):
        raise LayerpruneError(f"target {target.describe()} cannot be met: removing the most allowed ({max_k} "
                              f"layers) reaches {target.kind} = {fmt_count(v)} "
                              f"(limit {fmt_count(_limit(target, dense))})")


def choose(target: Target, candidates: Callable[[int], list[int]], max_k: int, *, model: Any = None,
           sizes: Sizes | None = None, measure_opts: dict[str, Any] | None = None) -> Choice:
    """The smallest k (1..max_k) whose removal ``candidates(k)`` (positions in ``model``) meets ``target``.

    Analytic kinds need ``sizes`` (or ``model``); measured ones a loaded ``model``, timed dense and then per k
    with the layers skipped in place. A target that no k meets is a one-line error naming the best value.
    """
    tried: list[dict[str, Any]] = []
    if target.kind in ANALYTIC:
        sz = sizes or Sizes.of(model)
        dense = sz.after([])[target.kind]
        _refuse_met_by_dense(target, sz)
        best: tuple[float, list[int]] | None = None
        for k in range(1, max_k + 1):
            rem = candidates(k)
            v = sz.after(rem)[target.kind]
            tried.append({"k": k, "value": v})
            if best is None or v < best[0]:
                best = (v, rem)
            if target_met(target, v, dense):
                return Choice(target, rem, v, dense, tried)
        assert best is not None
        raise LayerpruneError(f"target {target.describe()} cannot be met: the largest allowed removal ({max_k} "
                              f"layers) reaches {target.kind} = {fmt_count(best[0])} "
                              f"(limit {fmt_count(_limit(target, dense))})")
    from .prune import skipped

    if model is None:
        raise LayerpruneError(f"target {target.kind} is measured on a loaded model")
    opts = measure_opts or {}
    with torch.no_grad():
        d = time_model(model, opts)
        best_v, best_rem = 0.0, []
        for k in range(1, max_k + 1):
            rem = candidates(k)
            with skipped(model, rem):
                c = time_model(model, opts)
            v = speedup_value(target.kind, d, c)
            tried.append({"k": k, "value": v})
            if v > best_v:
                best_v, best_rem = v, rem
            if target_met(target, v, 1.0):
                return Choice(target, rem, v, 1.0, tried,
                              measurement={"dense": d, "chosen": c, "settings": opts or "measure defaults"})
    raise LayerpruneError(f"target {target.describe()} cannot be met: the largest allowed removal ({max_k} layers) "
                          f"measures {target.kind} = {best_v:.3f} at best (k = {len(best_rem)})")


def fmt_count(v: float) -> str:
    """12.3M, 4.56G, 789 (for messages and tables)."""
    for unit, f in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.2f}{unit}"
    return f"{v:.0f}"


__all__ = ["ANALYTIC", "KINDS", "MEASURED", "Choice", "Sizes", "Target", "check_reachable", "choose"]
