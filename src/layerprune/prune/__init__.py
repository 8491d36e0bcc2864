"""The prune stage: remove layers in memory (:mod:`.surgery`) or by rewriting shards (:mod:`.streaming`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..arch import layer_count
from ..errors import LayerpruneError
from ..models import build_manifest, count_parameters, load_model, parse_dtype, resolve_model, save_pruned
from .streaming import prune_checkpoint_streaming
from .surgery import PruneRecord, parse_layer_list, prune_layers, tail_layers, validate_removal

__all__ = ["PruneRecord", "parse_layer_list", "prune_by_metric", "prune_checkpoint", "prune_checkpoint_streaming",
           "prune_layers", "tail_layers", "validate_removal"]


def prune_checkpoint(model: str | os.PathLike, out_dir: str | os.PathLike, *, remove: list[int] | None = None,
                     tail: int | None = None, streaming: bool = False, dtype: str | None = "auto",
                     overwrite: bool = False, method: str | None = None, method_params: dict | None = None,
                     scores: Any = None) -> PruneRecord:
    """Prune a checkpoint folder (or ``default``) and save the result with its manifest.

    Give either ``remove`` (0-based original indices) or ``tail`` (drop the last k layers).
    """
    path = resolve_model(model)
    if (remove is None) == (tail is None):
        raise LayerpruneError("give exactly one of --remove or --tail")
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():  # validate against the config before any (slow) load
        n = layer_count(json.loads(cfg_file.read_text()))
        if tail is not None:
            remove = tail_layers(n, tail)
            method = method or "reverse"
            method_params = method_params or {"k": tail}
        remove = validate_removal(remove, n)
    elif tail is not None:
        raise LayerpruneError(f"--tail needs a local model folder with config.json: {path}")
    method = method or "manual"
    if streaming:
        dt = parse_dtype(dtype)
        return prune_checkpoint_streaming(path, remove, out_dir, overwrite=overwrite,
                                          dtype=None if dt == "auto" else dt, method=method,
                                          method_params=method_params, scores=scores, source=str(model))
    from ..io import check_out_dir

    check_out_dir(out_dir, overwrite)  # fail before the (slow) load
    m = load_model(path, dtype=dtype)
    before = count_parameters(m)
    record = prune_layers(m, remove)
    manifest = build_manifest(str(model), record, method=method, params=method_params, scores=scores,
                              params_before=before, params_after=count_parameters(m), mode="in-memory")
    # The tokenizer files are copied, not re-serialised, so they stay byte-identical to the source.
    save_pruned(m, None, out_dir, manifest, overwrite=overwrite, copy_from=path)
    return record


def prune_by_metric(model: str | os.PathLike, out_dir: str | os.PathLike, *, metric: str,
                    k: int | None = None, ratio: float | None = None, metric_options: dict | None = None,
                    iterative: bool = False, step: int = 1, protect_first: int = 0, protect_last: int = 0,
                    calib: Any = None, score_mode: str = "memory", streaming: bool = False,
                    dtype: str | None = "auto", batch_size: int | None = None, overwrite: bool = False,
                    cache: bool = True, device: str | None = None, offload_folder: str | None = None,
                    max_memory: dict | None = None, progress: bool = True,
                    compensation: Any = None) -> tuple[PruneRecord, Any]:
    """Score with ``metric``, select ``k`` layers (or ``ratio`` of them), prune and save with the manifest.

    One-shot by default; ``iterative`` re-scores the pruned model after every ``step`` removals (SLEB-style,
    in memory). The manifest's ``method`` is the metric, ``method_params`` its parameters, the selection
    settings and the calibration, and ``scores`` the selection with the scores it was made from (per step
    when iterative). ``compensation`` (a CompensationConfig) folds a training-free map for each removed block
    into the weights (one-shot only). Returns (PruneRecord, Selection).
    """
    from ..data.calibration import CalibSpec, build_calibration
    from ..io import check_out_dir
    from ..metrics import make_metric
    from ..models import load
    from ..scoring import model_fingerprint, score
    from ..select import iterative_prune, resolve_k, select_one_shot

    path = resolve_model(model)
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise LayerpruneError(f"pruning by a metric needs a local model folder with config.json: {path}")
    n = layer_count(json.loads(cfg_file.read_text()))
    k = resolve_k(n, k, ratio)
    m = make_metric(metric, **(metric_options or {}))
    spec = calib if isinstance(calib, CalibSpec) else CalibSpec()
    check_out_dir(out_dir, overwrite)
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
        record, sel = iterative_prune(mdl, m, k, step=step, calib=cal, protect_first=protect_first,
                                      protect_last=protect_last, batch_size=batch_size, progress=progress)
        params["calibration"] = cal.describe() if cal is not None else None
        manifest = build_manifest(str(model), record, method=m.label, params=params, scores=sel.to_dict(),
                                  params_before=before, params_after=count_parameters(mdl), mode="in-memory")
        save_pruned(mdl, None, out_dir, manifest, overwrite=overwrite, copy_from=path)
        return record, sel

    fp = model_fingerprint(path)
    if compensation is not None:
        from ..compensation import compensate_checkpoint

        res = score(path, [m], spec if m.needs_calibration else None, mode=score_mode, batch_size=batch_size,
                    cache=cache, dtype=dtype, device=device, offload_folder=offload_folder, max_memory=max_memory,
                    progress=progress)
        r = res.results[m.label]
        sel = select_one_shot(r, k, protect_first=protect_first, protect_last=protect_last, metric=m)
        params["calibration"] = res.calibration
        man = compensate_checkpoint(path, out_dir, remove=sel.removed, config=compensation, seed=spec.seed,
                                    calib_data_dir=spec.data_dir, dtype=dtype, device=device, overwrite=overwrite,
                                    method_name=m.label, method_params=params,
                                    scores={**sel.to_dict(), "metric_scores": r.to_dict()}, progress=progress)
        return PruneRecord(man["original_num_layers"], man["removed_layers"], man["kept_layers"]), sel
    if score_mode == "memory" and not streaming:
        # Load once: score the model, then prune that same object.
        mdl, tok = load(path, dtype=dtype, device=device)
        cal = build_calibration(tok, spec) if m.needs_calibration else None
        res = score(mdl, [m], cal, batch_size=batch_size, cache=cache, fingerprint=fp, progress=progress)
        r = res.results[m.label]
        sel = select_one_shot(r, k, protect_first=protect_first, protect_last=protect_last, metric=m)
        params["calibration"] = res.calibration
        before = count_parameters(mdl)
        record = prune_layers(mdl, sel.removed)
        manifest = build_manifest(str(model), record, method=m.label, params=params,
                                  scores={**sel.to_dict(), "metric_scores": r.to_dict()}, params_before=before,
                                  params_after=count_parameters(mdl), mode="in-memory")
        save_pruned(mdl, None, out_dir, manifest, overwrite=overwrite, copy_from=path)
        return record, sel
    res = score(path, [m], spec if m.needs_calibration else None, mode=score_mode, batch_size=batch_size,
                cache=cache, dtype=dtype, device=device, offload_folder=offload_folder, max_memory=max_memory,
                progress=progress)
    r = res.results[m.label]
    sel = select_one_shot(r, k, protect_first=protect_first, protect_last=protect_last, metric=m)
    params["calibration"] = res.calibration
    record = prune_checkpoint(path, out_dir, remove=sel.removed, streaming=streaming, dtype=dtype,
                              overwrite=overwrite, method=m.label, method_params=params,
                              scores={**sel.to_dict(), "metric_scores": r.to_dict()})
    return record, sel
