"""Search stage 1: candidate cuts that meet the budget — every metric's cut (one-shot, and re-scored after each
removal for the calibration metrics), every contiguous block, random controls — deduplicated.

Everything runs on the one loaded model: iterative re-scoring skips the chosen layers in place
(:func:`~layerprune.prune.skipped`, restored after), so no copy of the model is ever made.
"""

from __future__ import annotations

import contextlib
import random as _random
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..arch import parts
from ..budget import Sizes, Target, choose, target_met
from ..data.calibration import Calibration
from ..metrics import make_metric
from ..prune import skipped, tail_layers
from ..scoring import score
from ..select import protected_layers, select_one_shot
from .config import SearchConfig


def cut_key(removed: Any) -> str:
    """The one text key of a cut (its removed layers), used for fits, probes and stage records."""
    return ",".join(map(str, removed))


@dataclass
class Candidate:
    """One cut: the removed layers (original 0-based indices) and every way it was proposed."""

    removed: tuple[int, ...]
    sources: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return cut_key(self.removed)

    @property
    def name(self) -> str:
        return self.sources[0]

    def to_dict(self) -> dict[str, Any]:
        return {"removed": list(self.removed), "sources": self.sources}


def needed_k(model: Any, target: Target, sizes: Sizes, max_k: int, measure_opts: dict[str, Any] | None) -> int:
    """How many layers the budget asks for (the seed's reverse order decides; with uniform layers every cut of
    that size meets the same analytic budget, and each candidate is checked again)."""
    n = parts(model).num_layers
    return len(choose(target, lambda k: tail_layers(n, k), max_k, model=model, sizes=sizes,
                      measure_opts=measure_opts).removed)


def metric_cut(model: Any, metric: str, k: int, calib: Calibration, cfg: SearchConfig, tokenizer: Any,
               iterative: bool) -> list[int]:
    """The ``k`` layers ``metric`` removes; ``iterative``: one at a time, re-scoring the model without the
    layers already chosen."""
    m = make_metric(metric)
    protect = {"protect_first": cfg.protect_first, "protect_last": cfg.protect_last}
    n = parts(model).num_layers
    cal = calib if m.needs_calibration else None
    if not iterative:
        res = score(model, [m], cal, tokenizer=tokenizer, cache=False, batch_size=cfg.batch_size, progress=False)
        return sorted(select_one_shot(res.results[m.label], k, metric=m, **protect).removed)
    removed: list[int] = []
    while len(removed) < k:
        kept = [i for i in range(n) if i not in removed]
        with skipped(model, removed) if removed else contextlib.nullcontext():
            res = score(model, [m], cal, tokenizer=tokenizer, cache=False, batch_size=cfg.batch_size,
                        layer_map=kept, num_layers=n, progress=False)
        removed += select_one_shot(res.results[m.label], 1, metric=m, **protect).removed
    return sorted(removed)


def block_cuts(n: int, k: int, cfg: SearchConfig) -> list[list[int]]:
    """Every run of ``k`` consecutive layers that avoids the protected ones."""
    keep = protected_layers(n, cfg.protect_first, cfg.protect_last)
    return [list(range(s, s + k)) for s in range(n - k + 1) if not keep & set(range(s, s + k))]


def random_cuts(n: int, k: int, cfg: SearchConfig) -> list[list[int]]:
    pool = sorted(set(range(n)) - protected_layers(n, cfg.protect_first, cfg.protect_last))
    rng = _random.Random(cfg.seed)
    return [sorted(rng.sample(pool, k)) for _ in range(cfg.random)]


def collect(model: Any, tokenizer: Any, k: int, calib: Calibration, cfg: SearchConfig, target: Target,
            sizes: Sizes, progress: bool = True) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """(candidates that meet ``target``, the proposals dropped with why). The seed's reverse cut is always
    among the candidates, as the baseline the report compares with."""
    n = parts(model).num_layers
    proposals: list[tuple[str, list[int]]] = []
    jobs = [(m, False) for m in cfg.metrics] + [(m, True) for m in cfg.iterative]
    for metric, it in tqdm(jobs, desc="search: candidates", disable=not progress, leave=False):
        proposals.append((f"{metric}{'-iterative' if it else ''}", metric_cut(model, metric, k, calib, cfg,
                                                                              tokenizer, it)))
    if "reverse" not in cfg.metrics:
        proposals.append(("reverse", tail_layers(n, k)))
    if cfg.blocks:
        proposals += [(f"block {b[0]}-{b[-1]}", b) for b in block_cuts(n, k, cfg)]
    proposals += [(f"random-{i + 1}", r) for i, r in enumerate(random_cuts(n, k, cfg))]
    dense = sizes.after([])
    by_key: dict[tuple[int, ...], Candidate] = {}
    dropped: list[dict[str, Any]] = []
    for source, removed in proposals:
        key = tuple(sorted(removed))
        if target.kind in dense and not target_met(target, sizes.after(list(key))[target.kind], dense[target.kind]):
            dropped.append({"source": source, "removed": list(key), "why": f"misses {target.describe()}"})
            continue
        by_key.setdefault(key, Candidate(key)).sources.append(source)
    return list(by_key.values()), dropped


__all__ = ["Candidate", "block_cuts", "cut_key", "collect", "metric_cut", "needed_k", "random_cuts"]
