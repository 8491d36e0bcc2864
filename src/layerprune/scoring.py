"""The score stage: compute layer-importance metrics, cache them, write ``scores.json/csv/png``.

:func:`score` takes an in-memory (or accelerate-dispatched) model, or a checkpoint path plus a mode:

* ``memory``: load the whole model (``--device``), hooks on its decoder layers;
* ``dispatch``: load with ``device_map="auto"`` (GPUs, then CPU, then disk offload into ``offload_folder``);
* ``layerwise``: never load the decoder layers together: read one layer at a time from safetensors
  (:mod:`layerprune.metrics.layerwise`).

Metrics of one group share one pass (``bi``, ``angular``, ``cka``: one forward; layer by layer, all metrics
share one sweep over the weights). Results are cached under ``cache_dir()/scores`` keyed by the model
fingerprint (config + weight file names, sizes and mtimes), the metric and its parameters, the calibration
fingerprint (hash of the token ids), the batch size and the dtype.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .arch import layer_count, parts
from .data.calibration import Calibration, CalibSpec, build_calibration
from .errors import LayerpruneError
from .io import atomic_dir, write_json
from .metrics.base import HIGHER, Metric, MetricResult, ScoreContext, make_metric
from .plots import plot_layer_scores, plot_score_heatmaps
from .select import resolve_k, select_layers

SCORES_JSON = "scores.json"
SCORES_CSV = "scores.csv"
SCORES_PNG = "scores.png"
SIMILARITY_PNG = "similarity.png"
MODES = ("memory", "dispatch", "layerwise")
# Bump when a metric's arithmetic changes so old cache entries are not reused.
CACHE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def score_cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "scores"


def model_fingerprint(path: str | os.PathLike, deep: bool = False) -> str:
    """Hash of ``config.json`` plus each weight file's name, size and mtime (``deep``: its bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    cfg = p / "config.json"
    if not cfg.is_file():
        raise LayerpruneError(f"not a model folder (no config.json): {p}")
    h.update(cfg.read_bytes())
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            if deep:
                with f.open("rb") as fh:
                    for chunk in iter(functools.partial(fh.read, 1 << 24), b""):
                        h.update(chunk)
    return h.hexdigest()[:20]


def cache_key(model_fp: str, metric: Metric, calib_fp: str | None, batch_size: int | None, dtype: str,
              num_layers: int, layer_map: list[int]) -> str:
    payload = {"v": CACHE_VERSION, "model": model_fp, "metric": metric.name, "params": metric.cache_params(),
               "calib": calib_fp if metric.needs_calibration else None,
               "batch": batch_size if metric.needs_calibration else None, "dtype": dtype,
               "layers": [num_layers, layer_map]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ScoreCache:
    """One JSON file per (model, metric, parameters, calibration) under :func:`score_cache_dir`."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else score_cache_dir()

    def get(self, key: str) -> MetricResult | None:
        f = self.root / f"{key}.json"
        if not f.is_file():
            return None
        try:
            res = MetricResult.from_dict(json.loads(f.read_text()))
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry is recomputed
        res.cached = True
        return res

    def put(self, key: str, result: MetricResult) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        d = result.to_dict()
        d.pop("removal_order", None)
        d["cached"] = False
        write_json(self.root / f"{key}.json", d)


@dataclass
class ScoreResults:
    """Results of :func:`score`, keyed by metric label (the name as requested, e.g. ``magnitude_l1``)."""

    results: dict[str, MetricResult]
    num_layers: int
    model: str | None = None
    model_fingerprint: str | None = None
    calibration: dict[str, Any] | None = None
    mode: str = "memory"
    elapsed_s: float = 0.0
    metric_objects: dict[str, Metric] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> MetricResult:
        return self.results[name]

    def selections(self, k: int | None, protect_first: int = 0, protect_last: int = 0) -> dict[str, list[int]]:
        """Per metric, the k layers one-shot selection removes (empty when k is None)."""
        if k is None:
            return {}
        return {name: select_layers(r, k, protect_first=protect_first, protect_last=protect_last,
                                    metric=self.metric_objects.get(name))
                for name, r in self.results.items()}

    def to_dict(self, k: int | None = None, protect_first: int = 0, protect_last: int = 0) -> dict[str, Any]:
        from .models import library_versions

        sel = self.selections(k, protect_first, protect_last)
        metrics = {}
        for name, r in self.results.items():
            d = r.to_dict()
            d["selected"] = sel.get(name)
            metrics[name] = d
        return {"layerprune_version": library_versions().get("layerprune", "dev"), "model": self.model,
                "model_fingerprint": self.model_fingerprint, "num_layers": self.num_layers, "mode": self.mode,
                "calibration": self.calibration,
                "selection": {"k": k, "protect_first": protect_first, "protect_last": protect_last},
                "direction_convention": f"every metric here is '{HIGHER}' unless its 'direction' says otherwise",
                "metrics": metrics, "elapsed_s": self.elapsed_s}

    def write(self, out_dir: str | os.PathLike, *, k: int | None = None, protect_first: int = 0,
              protect_last: int = 0, overwrite: bool = False, plots: bool = True) -> Path:
        """Write scores.json, scores.csv, scores.png (and similarity.png) atomically into ``out_dir``."""
        data = self.to_dict(k, protect_first, protect_last)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            write_json(tmp / SCORES_JSON, data)
            write_csv(tmp / SCORES_CSV, data)
            if plots:
                plot_layer_scores({k: v for k, v in data["metrics"].items()}, (), tmp / SCORES_PNG)
                if any(m.get("extra", {}).get("matrix") is not None or m.get("block_scores")
                       for m in data["metrics"].values()):
                    plot_score_heatmaps(data, tmp / SIMILARITY_PNG)
        return Path(out_dir)


def _json_num(x: Any) -> float | None:
    return None if x is None else float(x)


def write_csv(path: Path, data: dict[str, Any]) -> None:
    """One row per original layer: each metric's score, its removal rank (1 = first out) and selection."""
    names = list(data["metrics"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["layer"] + [c for n in names for c in (n, f"{n}_rank", f"{n}_selected")])
        for i in range(data["num_layers"]):
            row: list[Any] = [i]
            for n in names:
                m = data["metrics"][n]
                rank = m["removal_order"].index(i) + 1 if i in m["removal_order"] else ""
                sel = m.get("selected")
                row += [m["scores"][i] if m["scores"][i] is not None else "", rank,
                        "" if sel is None else int(i in sel)]
            w.writerow(row)


def _load_for_mode(path: str, mode: str, dtype: Any, device: str | None, offload_folder: str | None,
                   max_memory: dict[str, Any] | None) -> Any:
    from .models import load_model

    if mode == "memory":
        return load_model(path, dtype=dtype, device=device)
    if mode == "dispatch":
        kw: dict[str, Any] = {"device_map": "auto"}
        if offload_folder:
            kw["offload_folder"] = str(offload_folder)
        if max_memory:
            kw["max_memory"] = max_memory
        return load_model(path, dtype=dtype, **kw)
    from .metrics.layerwise import LayerwiseModel

    return LayerwiseModel(path, dtype=dtype, device=device)


def score(model: nn.Module | str | os.PathLike, metrics: Sequence[str | Metric | tuple[str, dict]],
          calib: Calibration | CalibSpec | None = None, *, tokenizer: Any = None, mode: str = "memory",
          batch_size: int | None = None, cache: bool = True, fingerprint: str | None = None,
          layer_map: list[int] | None = None, num_layers: int | None = None, dtype: Any = "auto",
          device: str | None = None, offload_folder: str | None = None, max_memory: dict[str, Any] | None = None,
          metric_options: dict[str, Any] | None = None, progress: bool = True) -> ScoreResults:
    """Compute ``metrics`` for ``model`` and return them indexed by original layer.

    ``model``: a loaded (possibly dispatched) causal LM, or a checkpoint folder / Hub id / ``default`` that is
    loaded according to ``mode``. ``calib``: a :class:`Calibration`, or a :class:`CalibSpec` drawn with
    ``tokenizer`` (loaded from the checkpoint when a path is given); default spec when None and needed.
    ``layer_map``: for an already pruned in-memory model, the original index of each current layer
    (``num_layers`` then is the original count). Results are cached only when the model is a path or a
    ``fingerprint`` is given.
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise LayerpruneError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
    objs = [make_metric(s, **(metric_options or {})) for s in metrics]
    if not objs:
        raise LayerpruneError("no metric requested")
    labels = [m.label for m in objs]
    if len(set(labels)) != len(labels):
        raise LayerpruneError(f"metric requested twice: {labels}")

    source: str | None = None
    loaded: Any = None
    if isinstance(model, nn.Module):
        loaded = model
        current = parts(model).num_layers
        source = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    else:
        from .models import read_config, resolve_model

        source = str(model)
        path = resolve_model(model)
        if fingerprint is None and Path(path).is_dir():
            fingerprint = model_fingerprint(path)
        cfg_file = Path(path) / "config.json"
        current = layer_count(read_config(path)) if cfg_file.is_file() else None  # type: ignore
    layer_map = list(layer_map) if layer_map is not None else (list(range(current)) if current else None)
    if layer_map is not None and current is not None and len(layer_map) != current:
        raise LayerpruneError(f"layer_map has {len(layer_map)} entries, the model has {current} layers")

    # Calibration only when some metric needs it.
    need_calib = any(m.needs_calibration for m in objs)
    if need_calib and not isinstance(calib, Calibration):
        if tokenizer is None:
            if loaded is not None and not (source and Path(source).is_dir()):
                raise LayerpruneError("pass a tokenizer (or a Calibration) to score an in-memory model")
            from .models import load_tokenizer

            tokenizer = load_tokenizer(str(source))
        calib = build_calibration(tokenizer, calib if isinstance(calib, CalibSpec) else CalibSpec())
    calib_obj = calib if isinstance(calib, Calibration) else None

    dtype_key = str(dtype) if loaded is None else str(next(iter(loaded.parameters())).dtype)
    store = ScoreCache() if cache and fingerprint else None
    results: dict[str, MetricResult] = {}
    todo: list[Metric] = []
    keys: dict[str, str] = {}
    for m in objs:
        if store is not None and layer_map is not None:
            n_orig = num_layers or len(layer_map)
            keys[m.label] = cache_key(fingerprint, m, calib_obj.fingerprint if calib_obj else None,  # type: ignore
                                      batch_size, dtype_key, n_orig, layer_map)
            hit = store.get(keys[m.label])
            if hit is not None:
                results[m.label] = hit
                continue
        todo.append(m)

    if todo:
        if loaded is None:
            assert source is not None
            loaded = _load_for_mode(source, mode, dtype, device, offload_folder, max_memory)
        if current is None:
            current = loaded.num_layers if mode == "layerwise" else parts(loaded).num_layers
            layer_map = list(range(current))
        assert layer_map is not None
        ctx = ScoreContext(num_layers or len(layer_map), layer_map, batch_size, progress, device)
        groups: dict[str, list[Metric]] = {}
        for m in todo:
            groups.setdefault(type(m).group or m.name, []).append(m)
        if mode == "layerwise":
            from .metrics.layerwise import LayerwiseModel

            if not isinstance(loaded, LayerwiseModel):
                raise LayerpruneError("layer-by-layer mode needs a checkpoint path, not a loaded model")
            tg = time.perf_counter()
            consumers = [type(ms[0]).layerwise_consumer(ms, ctx, calib_obj) for ms in groups.values()]
            loaded.sweep(consumers, calib_obj, batch_size, progress)
            elapsed = time.perf_counter() - tg
            for c in consumers:
                for r in c.results():
                    r.elapsed_s = elapsed
                    results[r.name] = r
        else:
            for ms in groups.values():
                tg = time.perf_counter()
                out = type(ms[0]).run(ms, loaded, calib_obj, ctx)
                elapsed = time.perf_counter() - tg
                for r in out:
                    r.elapsed_s = elapsed
                    results[r.name] = r
        if store is not None:
            for m in todo:
                store.put(keys[m.label], results[m.label])

    n_orig = num_layers or (len(layer_map) if layer_map is not None else 0)
    return ScoreResults({lb: results[lb] for lb in labels}, n_orig, source,
                        fingerprint, calib_obj.describe() if calib_obj is not None else None, mode,
                        time.perf_counter() - t0, {m.label: m for m in objs})


def score_and_write(model: str | os.PathLike, metrics: Sequence[str], out_dir: str | os.PathLike, *,
                    calib: CalibSpec | None = None, k: int | None = None, ratio: float | None = None,
                    default_ratio: float | None = 0.25, protect_first: int = 0, protect_last: int = 0,
                    overwrite: bool = False, **kwargs: Any) -> tuple[ScoreResults, int | None]:
    """The ``layerprune score`` stage: score, choose k from ``k``/``ratio`` for highlighting, write files.

    Without ``k``/``ratio`` the selection shown uses ``default_ratio`` when it removes at least one layer.
    """
    from .io import check_out_dir
    from .models import resolve_model

    # Fail before the (slow) scoring; an output that is the model folder (or around it) would replace it.
    check_out_dir(out_dir, overwrite, (resolve_model(model),) if isinstance(model, (str, os.PathLike)) else ())
    res = score(model, metrics, calib, **kwargs)
    if k is not None or ratio is not None:
        kk: int | None = resolve_k(res.num_layers, k, ratio)
    elif default_ratio is not None and int(default_ratio * res.num_layers + 1e-9) >= 1:
        kk = resolve_k(res.num_layers, ratio=default_ratio)
    else:
        kk = None
    res.write(out_dir, k=kk, protect_first=protect_first, protect_last=protect_last, overwrite=overwrite)
    return res, kk


__all__ = ["MODES", "SCORES_CSV", "SCORES_JSON", "SCORES_PNG", "SIMILARITY_PNG", "ScoreCache", "ScoreResults",
           "cache_key", "model_fingerprint", "score", "score_and_write", "score_cache_dir"]
