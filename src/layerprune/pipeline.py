"""Orchestration above the stages: prune by a metric (score -> select -> prune [-> compensate]) and
SLEB-style iterative pruning. Stage modules never import this one; the CLI and the recipe runner do."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .arch import layer_count, parts
from .budget import MEASURED, Sizes, Target, check_reachable, choose
from .compensation import compensate_checkpoint
from .data.calibration import CalibSpec, build_calibration
from .errors import LayerpruneError
from .io import check_out_dir
from .metrics import make_metric
from .metrics.base import Metric
from .models import build_manifest, count_parameters, load, read_config, resolve_model, save_pruned
from .prune import PruneRecord, prune_checkpoint, prune_layers
from .scoring import model_fingerprint, score
from .select import IterationStep, Selection, resolve_k, select_one_shot

StepCallback = Callable[[nn.Module, IterationStep, list[int]], None]


def score_and_select(model: Any, metrics: list[Any], k: int, calib: Any = None, *, protect_first: int = 0,
                     protect_last: int = 0, **score_kwargs: Any) -> tuple[Any, Selection]:
    """Score ``model`` with ``metrics`` (the first selects) and choose ``k`` layers: the one step that
    prune-by-metric, every round of iterative pruning and the recipe's score stage share.

    ``score_kwargs`` go to :func:`layerprune.scoring.score` (``layer_map``/``num_layers`` for a model that is
    already pruned, ``mode``, ``cache``, ...). Returns (ScoreResults, Selection in original indices).
    """
    res = score(model, metrics, calib, **score_kwargs)
    label = next(iter(res.results))  # results keep the requested order: the selecting metric first
    sel = select_one_shot(res.results[label], k, protect_first=protect_first, protect_last=protect_last,
                          metric=res.metric_objects.get(label))
    return res, sel


def iterative_prune(model: nn.Module, metric: str | Metric, k: int, *, step: int = 1, calib: Any = None,
                    protect_first: int = 0, protect_last: int = 0, batch_size: int | None = None,
                    progress: bool = True, on_step: StepCallback | None = None,
                    metric_options: dict[str, Any] | None = None,
                    until: Callable[[nn.Module], bool] | None = None) -> tuple[Any, Selection]:
    """SLEB-style iterative pruning IN PLACE: score, remove ``step`` layers, re-score the pruned model, ...

    ``on_step(model, step, kept)`` runs after each removal (``kept``: original indices still present); the
    recipe stage plugs healing in there. ``until(model)``: stop as soon as it holds (a budget target; ``k`` is
    then the most that may be removed). Returns (PruneRecord against the original indices, Selection).
    """
    if step < 1:
        raise LayerpruneError("--step must be >= 1")
    m = make_metric(metric, **(metric_options or {}))
    n0 = parts(model).num_layers
    k = resolve_k(n0, k)
    kept = list(range(n0))
    steps: list[IterationStep] = []
    order: list[int] = []
    it = 0
    bar = tqdm(total=k, desc=f"iterative {m.label}", disable=not progress, leave=False)
    while len(order) < k and not (until is not None and order and until(model)):
        it += 1
        s = min(step, k - len(order))
        results, picked = score_and_select(model, [m], s, calib, protect_first=protect_first,
                                           protect_last=protect_last, layer_map=kept, num_layers=n0,
                                           batch_size=batch_size, progress=progress, cache=False)
        res, chosen = results.results[m.label], picked.removed
        positions = [kept.index(i) for i in chosen]
        prune_layers(model, positions)
        order.extend(i for i in res.removal_order() if i in set(chosen))
        kept = [i for i in kept if i not in set(chosen)]
        st = IterationStep(it, chosen, res)
        steps.append(st)
        bar.update(len(chosen))
        if on_step is not None:
            on_step(model, st, list(kept))
    bar.close()
    if until is not None and not until(model):
        raise LayerpruneError(f"the budget target cannot be met: even {len(order)} layers removed (the most "
                              "allowed) do not reach it")
    k = len(order)
    removed = sorted(order)
    record = PruneRecord(n0, removed, kept)
    sel = Selection(m.label, k, removed, order, iterative=True, step=step, protect_first=protect_first,
                    protect_last=protect_last, steps=steps)
    return record, sel


@dataclass
class PrunePlan:
    """What prune-by-metric resolved before any work: the checkpoint, the metric, how many layers may go (the
    most allowed when a target decides), the budget and the manifest's parameters (filled in by the steps)."""

    path: str
    source: str
    out_dir: str | os.PathLike
    metric: Metric
    k: int
    target: Target | None
    sizes: Sizes | None
    spec: CalibSpec
    protect: dict[str, int]
    params: dict[str, Any]
    load: dict[str, Any]  # dtype, device, ... for loading and scoring
    overwrite: bool
    progress: bool

    @property
    def calib(self) -> CalibSpec | None:
        return self.spec if self.metric.needs_calibration else None


def plan_prune(model: str | os.PathLike, out_dir: str | os.PathLike, *, metric: str, k: int | None,
               ratio: float | None, metric_options: dict | None, iterative: bool, step: int, protect_first: int,
               protect_last: int, calib: Any, score_mode: str, streaming: bool, compensation: Any,
               target: str | Target | None, overwrite: bool, load: dict[str, Any], progress: bool) -> PrunePlan:
    """Every check that needs no scoring: the folder, the removal count or budget, the metric, the output."""
    path = resolve_model(model)
    if not (Path(path) / "config.json").is_file():
        raise LayerpruneError(f"pruning by a metric needs a local model folder with config.json: {path}")
    n = layer_count(read_config(path))
    tgt = Target.parse(target) if isinstance(target, str) else target
    if tgt is not None and (k is not None or ratio is not None):
        raise LayerpruneError("give a layer count (--num/--ratio) or a --target, not both")
    if tgt is not None and tgt.kind in MEASURED and (streaming or score_mode != "memory" or
                                                     compensation is not None):
        raise LayerpruneError(f"target {tgt.kind} is measured on the model in memory: it cannot be combined with "
                              "--streaming, a non-memory --score-mode or compensation")
    k = n - 1 - protect_first - protect_last if tgt is not None else resolve_k(n, k, ratio)
    if k < 1:
        raise LayerpruneError("the protected layers leave nothing to remove")
    m = make_metric(metric, **(metric_options or {}))
    check_out_dir(out_dir, overwrite, (path,))
    sizes = None
    if tgt is not None:
        sizes = Sizes.of_checkpoint(path, load["dtype"])
        check_reachable(tgt, sizes, k)  # before any scoring
    if iterative and compensation is not None:
        raise LayerpruneError("compensation after iterative pruning is not supported: prune one-shot, or "
                              "compensate the final removal with 'layerprune compensate'")
    if iterative and (streaming or score_mode != "memory"):
        raise LayerpruneError("--iterative re-scores the pruned model in memory: it cannot be combined "
                              "with --streaming or a non-memory --score-mode")
    params: dict[str, Any] = {"metric": m.label, "metric_params": m.params(), "k": k, "ratio": ratio,
                              "iterative": iterative, "step": step if iterative else None,
                              "protect_first": protect_first, "protect_last": protect_last,
                              "score_mode": "memory" if iterative else score_mode}
    return PrunePlan(path, str(model), out_dir, m, k, tgt, sizes, calib if isinstance(calib, CalibSpec)
                     else CalibSpec(), {"protect_first": protect_first, "protect_last": protect_last}, params, load,
                     overwrite, progress)


def choose_cut(plan: PrunePlan, result: Any, *, model: Any = None, measure_opts: dict[str, Any] | None = None
               ) -> Selection:
    """Scores -> the removal: ``plan.k`` layers, or the smallest removal in the metric's order that meets the
    plan's target (recorded in ``plan.params``)."""
    k = plan.k
    if plan.target is not None:
        choice = choose(plan.target, _candidates(result, plan.metric, **plan.protect), k, model=model,
                        sizes=plan.sizes, measure_opts=measure_opts)
        k = len(choice.removed)
        plan.params.update(k=k, target=choice.to_dict())
    return select_one_shot(result, k, metric=plan.metric, **plan.protect)


def _scores(sel: Selection, r: Any) -> dict[str, Any]:
    return {**sel.to_dict(), "metric_scores": r.to_dict()}


def _iterative_to_disk(plan: PrunePlan, step: int, measure_opts: dict[str, Any] | None
                       ) -> tuple[PruneRecord, Selection]:
    mdl, tok = load(plan.path, dtype=plan.load["dtype"], device=plan.load["device"])
    cal = build_calibration(tok, plan.spec) if plan.metric.needs_calibration else None
    before = count_parameters(mdl)
    until = _target_reached(mdl, plan.target, measure_opts, plan.params) if plan.target is not None else None
    record, sel = iterative_prune(mdl, plan.metric, plan.k, step=step, calib=cal, batch_size=plan.load["batch_size"],
                                  progress=plan.progress, until=until, protect_first=plan.protect["protect_first"],
                                  protect_last=plan.protect["protect_last"])
    plan.params["k"] = len(record.removed_layers)
    plan.params["calibration"] = cal.describe() if cal is not None else None
    manifest = build_manifest(plan.source, record, method=plan.metric.label, params=plan.params,
                              scores=sel.to_dict(), params_before=before, params_after=count_parameters(mdl),
                              mode="in-memory")
    save_pruned(mdl, None, plan.out_dir, manifest, overwrite=plan.overwrite, copy_from=plan.path)
    return record, sel


def _score_checkpoint(plan: PrunePlan, score_mode: str) -> Any:
    """Score the checkpoint folder (cached) with the plan's metric; the result of that metric."""
    res = score(plan.path, [plan.metric], plan.calib, mode=score_mode, progress=plan.progress, **plan.load)
    plan.params["calibration"] = res.calibration
    return res.results[plan.metric.label]


def _compensated_to_disk(plan: PrunePlan, score_mode: str, compensation: Any) -> tuple[PruneRecord, Selection]:
    r = _score_checkpoint(plan, score_mode)
    sel = choose_cut(plan, r)
    man = compensate_checkpoint(plan.path, plan.out_dir, remove=sel.removed, config=compensation,
                                seed=plan.spec.seed, calib_data_dir=plan.spec.data_dir, dtype=plan.load["dtype"],
                                device=plan.load["device"], overwrite=plan.overwrite, method_name=plan.metric.label,
                                method_params=plan.params, scores=_scores(sel, r), progress=plan.progress)
    return PruneRecord(man["original_num_layers"], man["removed_layers"], man["kept_layers"]), sel


def _in_memory_to_disk(plan: PrunePlan, measure_opts: dict[str, Any] | None) -> tuple[PruneRecord, Selection]:
    """Load once: score the model (and, for a target, time or size its cuts), then prune that same object."""
    mdl, tok = load(plan.path, dtype=plan.load["dtype"], device=plan.load["device"])
    cal = build_calibration(tok, plan.spec) if plan.metric.needs_calibration else None
    res = score(mdl, [plan.metric], cal, batch_size=plan.load["batch_size"], cache=plan.load["cache"],
                fingerprint=model_fingerprint(plan.path), progress=plan.progress)
    r = res.results[plan.metric.label]
    sel = choose_cut(plan, r, model=mdl, measure_opts=measure_opts)
    plan.params["calibration"] = res.calibration
    before = count_parameters(mdl)
    record = prune_layers(mdl, sel.removed)
    manifest = build_manifest(plan.source, record, method=plan.metric.label, params=plan.params,
                              scores=_scores(sel, r), params_before=before, params_after=count_parameters(mdl),
                              mode="in-memory")
    save_pruned(mdl, None, plan.out_dir, manifest, overwrite=plan.overwrite, copy_from=plan.path)
    return record, sel


def _from_disk(plan: PrunePlan, score_mode: str, streaming: bool) -> tuple[PruneRecord, Selection]:
    r = _score_checkpoint(plan, score_mode)
    sel = choose_cut(plan, r)
    record = prune_checkpoint(plan.path, plan.out_dir, remove=sel.removed, streaming=streaming,
                              dtype=plan.load["dtype"], overwrite=plan.overwrite, method=plan.metric.label,
                              method_params=plan.params, scores=_scores(sel, r))
    return record, sel


def prune_by_metric(model: str | os.PathLike, out_dir: str | os.PathLike, *, metric: str,
                    k: int | None = None, ratio: float | None = None, metric_options: dict | None = None,
                    iterative: bool = False, step: int = 1, protect_first: int = 0, protect_last: int = 0,
                    calib: Any = None, score_mode: str = "memory", streaming: bool = False,
                    dtype: str | None = "auto", batch_size: int | None = None, overwrite: bool = False,
                    cache: bool = True, device: str | None = None, offload_folder: str | None = None,
                    max_memory: dict | None = None, progress: bool = True,
                    compensation: Any = None, target: str | Target | None = None,
                    measure_opts: dict[str, Any] | None = None) -> tuple[PruneRecord, Any]:
    """Score with ``metric``, select ``k`` layers (or ``ratio`` of them), prune and save with the manifest.

    One-shot by default; ``iterative`` re-scores the pruned model after every ``step`` removals (SLEB-style,
    in memory). The manifest's ``method`` is the metric, ``method_params`` its parameters, the selection
    settings and the calibration, and ``scores`` the selection with the scores it was made from (per step
    when iterative). ``compensation`` (a CompensationConfig) folds a training-free map for each removed block
    into the weights (one-shot only). ``target`` (``"params=0.8"``, a :class:`~layerprune.budget.Target`)
    replaces ``k``/``ratio``: the smallest removal in the metric's order that meets it (see
    :mod:`layerprune.budget`; ``measure_opts`` for the measured kinds). Returns (PruneRecord, Selection).

    The path is a short sequence of steps: :func:`plan_prune` (every check), scoring, :func:`choose_cut`
    (k from the budget, then the selection), then pruning (and compensation) into ``out_dir``.
    """
    load_opts = {"dtype": dtype, "device": device, "batch_size": batch_size, "cache": cache,
                 "offload_folder": offload_folder, "max_memory": max_memory}
    plan = plan_prune(model, out_dir, metric=metric, k=k, ratio=ratio, metric_options=metric_options,
                      iterative=iterative, step=step, protect_first=protect_first, protect_last=protect_last,
                      calib=calib, score_mode=score_mode, streaming=streaming, compensation=compensation,
                      target=target, overwrite=overwrite, load=load_opts, progress=progress)
    if iterative:
        return _iterative_to_disk(plan, step, measure_opts)
    if compensation is not None:
        return _compensated_to_disk(plan, score_mode, compensation)
    if score_mode == "memory" and not streaming:
        return _in_memory_to_disk(plan, measure_opts)
    return _from_disk(plan, score_mode, streaming)


def _candidates(r: Any, m: Metric, protect_first: int = 0, protect_last: int = 0) -> Callable[[int], list[int]]:
    """k -> the layers the metric's one-shot selection removes."""
    return lambda k: select_one_shot(r, k, protect_first=protect_first, protect_last=protect_last,
                                     metric=m).removed


def _target_reached(model: nn.Module, tgt: Target, measure_opts: dict[str, Any] | None,
                    record: dict[str, Any]) -> Callable[[nn.Module], bool]:
    """For iterative pruning: a check on the (pruned in place) model against the dense model's values."""
    from .budget import speedup_value, target_met, time_model

    if tgt.kind in MEASURED:
        dense_speed = time_model(model, measure_opts or {})

        def measured(mdl: nn.Module) -> bool:
            v = speedup_value(tgt.kind, dense_speed, time_model(mdl, measure_opts or {}))
            record["target"] = {"target": tgt.describe(), "value": v, "dense_value": 1.0}
            return target_met(tgt, v, 1.0)

        return measured
    dense = Sizes.of(model).after([])[tgt.kind]

    def analytic(mdl: nn.Module) -> bool:
        v = Sizes.of(mdl).after([])[tgt.kind]
        record["target"] = {"target": tgt.describe(), "value": v, "dense_value": dense}
        return target_met(tgt, v, dense)

    return analytic


__all__ = ["PrunePlan", "StepCallback", "choose_cut", "iterative_prune", "plan_prune", "prune_by_metric",
           "score_and_select"]
