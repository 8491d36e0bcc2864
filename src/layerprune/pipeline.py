"""Orchestration above the stages: prune by a metric (score -> select -> prune [-> compensate]) and
SLEB-style iterative pruning. Stage modules never import this one; the CLI and the recipe runner do."""

from __future__ import annotations

import os
from collections.abc import Callable
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
    """

    path = resolve_model(model)
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
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
    spec = calib if isinstance(calib, CalibSpec) else CalibSpec()
    check_out_dir(out_dir, overwrite)
    sizes = None
    if tgt is not None:
        sizes = Sizes.of_checkpoint(path, dtype)
        check_reachable(tgt, sizes, k)  # before any scoring
    params: dict[str, Any] = {"metric": m.label, "metric_params": m.params(), "k": k, "ratio": ratio,
                              "iterative": iterative, "step": step if iterative else None,
                              "protect_first": protect_first, "protect_last": protect_last,
                              "score_mode": "memory" if iterative else score_mode}
    if iterative and compensation is not None:
        raise LayerpruneError("compensation after iterative pruning is not supported: prune one-shot, or "
                              "compensate the final removal with 'layerprune compensate'")
    if iterative:
        if streaming or score_mode != "memory":
            raise LayerpruneError("--iterative re-scores the pruned model in memory: it cannot be combined "
                                  "with --streaming or a non-memory --score-mode")
        mdl, tok = load(path, dtype=dtype, device=device)
        cal = build_calibration(tok, spec) if m.needs_calibration else None
        before = count_parameters(mdl)
        until = _target_reached(mdl, tgt, measure_opts, params) if tgt is not None else None
        record, sel = iterative_prune(mdl, m, k, step=step, calib=cal, protect_first=protect_first,
                                      protect_last=protect_last, batch_size=batch_size, progress=progress,
                                      until=until)
        params["k"] = len(record.removed_layers)
        params["calibration"] = cal.describe() if cal is not None else None
        manifest = build_manifest(str(model), record, method=m.label, params=params, scores=sel.to_dict(),
                                  params_before=before, params_after=count_parameters(mdl), mode="in-memory")
        save_pruned(mdl, None, out_dir, manifest, overwrite=overwrite, copy_from=path)
        return record, sel

    fp = model_fingerprint(path)
    in_memory = score_mode == "memory" and not streaming and compensation is None
    if tgt is not None and not in_memory:
        # Analytic (measured kinds need the in-memory path): the scores are cached for the scoring below,
        # which then selects the chosen k.
        res = score(path, [m], spec if m.needs_calibration else None, mode=score_mode, batch_size=batch_size,
                    cache=cache, dtype=dtype, device=device, offload_folder=offload_folder, max_memory=max_memory,
                    progress=progress)
        choice = choose(tgt, _candidates(res.results[m.label], m, protect_first, protect_last), k, sizes=sizes)
        k = len(choice.removed)
        params.update(k=k, target=choice.to_dict())
    if compensation is not None:
        res, sel = score_and_select(path, [m], k, spec if m.needs_calibration else None,
                                    protect_first=protect_first, protect_last=protect_last, mode=score_mode,
                                    batch_size=batch_size, cache=cache, dtype=dtype, device=device,
                                    offload_folder=offload_folder, max_memory=max_memory, progress=progress)
        r = res.results[m.label]
        params["calibration"] = res.calibration
        man = compensate_checkpoint(path, out_dir, remove=sel.removed, config=compensation, seed=spec.seed,
                                    calib_data_dir=spec.data_dir, dtype=dtype, device=device, overwrite=overwrite,
                                    method_name=m.label, method_params=params,
                                    scores={**sel.to_dict(), "metric_scores": r.to_dict()}, progress=progress)
        return PruneRecord(man["original_num_layers"], man["removed_layers"], man["kept_layers"]), sel
    if in_memory:
        # Load once: score the model (and, for a target, time or size its cuts), then prune that same object.
        mdl, tok = load(path, dtype=dtype, device=device)
        cal = build_calibration(tok, spec) if m.needs_calibration else None
        res = score(mdl, [m], cal, batch_size=batch_size, cache=cache, fingerprint=fp, progress=progress)
        r = res.results[m.label]
        if tgt is not None:
            choice = choose(tgt, _candidates(r, m, protect_first, protect_last), k, model=mdl, sizes=sizes,
                            measure_opts=measure_opts)
            k = len(choice.removed)
            params.update(k=k, target=choice.to_dict())
        sel = select_one_shot(r, k, protect_first=protect_first, protect_last=protect_last, metric=m)
        params["calibration"] = res.calibration
        before = count_parameters(mdl)
        record = prune_layers(mdl, sel.removed)
        manifest = build_manifest(str(model), record, method=m.label, params=params,
                                  scores={**sel.to_dict(), "metric_scores": r.to_dict()}, params_before=before,
                                  params_after=count_parameters(mdl), mode="in-memory")
        save_pruned(mdl, None, out_dir, manifest, overwrite=overwrite, copy_from=path)
        return record, sel
    res, sel = score_and_select(path, [m], k, spec if m.needs_calibration else None, protect_first=protect_first,
                                protect_last=protect_last, mode=score_mode, batch_size=batch_size, cache=cache,
                                dtype=dtype, device=device, offload_folder=offload_folder, max_memory=max_memory,
                                progress=progress)
    r = res.results[m.label]
    params["calibration"] = res.calibration
    record = prune_checkpoint(path, out_dir, remove=sel.removed, streaming=streaming, dtype=dtype,
                              overwrite=overwrite, method=m.label, method_params=params,
                              scores={**sel.to_dict(), "metric_scores": r.to_dict()})
    return record, sel


def _candidates(r: Any, m: Metric, protect_first: int, protect_last: int) -> Callable[[int], list[int]]:
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


__all__ = ["StepCallback", "iterative_prune", "prune_by_metric", "score_and_select"]
