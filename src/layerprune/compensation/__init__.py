"""The compensation stage (between prune and heal): training-free maps that stand in for removed blocks.

``compensate(model, remove, calib)`` fits one map per removed contiguous block on calibration activations,
folds it into the weights (see :mod:`.plan` for where) and removes the layers — the result is a vanilla
checkpoint. ``compensate_checkpoint`` does the same from a folder, in memory or layer by layer from
safetensors (``mode="layerwise"``: one decoder layer in memory at a time, output written by the streaming
pruner). Methods live in a registry (:mod:`.methods`): ``lstsq``, ``cosine``, ``scale``, ``none``, and
``reconstruct`` (lstsq, then the kept layer beside each block trained to the dense state: :mod:`.reconstruct`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import options
from ..errors import LayerpruneError
from ..options import opt
from .methods import METHODS, RECON_LAYERS, RECON_LOSSES, CompMethod, ReconSpec, make_method
from .plan import supported_fold_types

MODES = ("memory", "layerwise")


@dataclass
class CompensationConfig:
    """Settings of one compensation run: the single source of its options (CLI flags and recipe keys)."""

    method: str = opt("lstsq", "compensation method", "compensation", tuple(METHODS))
    ridge: float = opt(0.0, "ridge penalty towards no compensation, relative to the mean activation energy "
                            "(lstsq/cosine)", "compensation")
    calib: str = opt("c4", "calibration text: preset (c4, wikitext2, ptb) or a file", "compensation")
    nsamples: int = opt(64, "calibration windows", "compensation")
    seqlen: int = opt(256, "tokens per calibration window", "compensation")
    batch_size: int = opt(8, "calibration windows per forward pass", "compensation")
    mode: str = opt("memory", "memory (load the model) or layerwise (one layer at a time from safetensors)",
                    "compensation", MODES)
    steps: int = opt(100, "cosine: Adam steps", "compensation")
    lr: float = opt(1e-3, "cosine: Adam learning rate", "compensation")
    max_tokens: int = opt(16384, "cosine: activations kept for the fit", "compensation")
    recon_steps: int = opt(ReconSpec.steps, "reconstruct: Adam steps per removed block", "compensation")
    recon_lr: float = opt(ReconSpec.lr, "reconstruct: Adam learning rate (cosine decay)", "compensation")
    recon_layers: str = opt(ReconSpec.layers, "reconstruct: which kept layers are trained: the one before the "
                                              "block, the one after, or both", "compensation", RECON_LAYERS)
    recon_loss: str = opt(ReconSpec.loss, "reconstruct: mse or cosine distance to the dense hidden state (after "
                                          "the final norm for a tail block)", "compensation", RECON_LOSSES)
    recon_batch: int = opt(ReconSpec.batch, "reconstruct: calibration windows per training step", "compensation")
    recon_depth: int = opt(ReconSpec.depth, "reconstruct: kept layers trained on each chosen side of a block",
                           "compensation")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LayerpruneError(f"unknown compensation method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise LayerpruneError(f"unknown compensation mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise LayerpruneError("compensation needs nsamples >= 1, seqlen >= 2 and batch_size >= 1")
        if self.steps < 0 or self.lr <= 0 or self.max_tokens < 1:
            raise LayerpruneError("cosine needs steps >= 0, lr > 0 and max_tokens >= 1")
        if self.ridge < 0:
            raise LayerpruneError("--ridge must be >= 0")
        self.recon_spec().validate()

    def recon_spec(self) -> ReconSpec:
        return ReconSpec(self.recon_steps, self.recon_lr, self.recon_layers, self.recon_loss, self.recon_batch,
                         self.recon_depth)

    def make_method(self) -> CompMethod:
        self.validate()
        return make_method(self.method, ridge=self.ridge, steps=self.steps, lr=self.lr, max_tokens=self.max_tokens,
                           recon=self.recon_spec())

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> CompensationConfig:
        return options.from_kwargs(cls, "compensation", kwargs)


def compensate(model: Any, remove: list[int], calib: Any, *, method: str | CompMethod = "lstsq",
               batch_size: int | None = 8, progress: bool = True, **params: Any) -> dict[str, Any]:
    """Fit, fold and prune ``model`` in place; returns ``{"record": PruneRecord, "compensation": summary}``.

    ``calib``: a :class:`~layerprune.data.calibration.Calibration`. ``params``: method parameters (ridge, ...).
    """
    from ..arch import parts
    from ..prune.surgery import prune_layers, validate_removal
    from .core import fit_in_memory, fit_summary
    from .reconstruct import Reconstruction

    t0 = time.perf_counter()
    m = method if isinstance(method, CompMethod) else make_method(method, **params)
    p = parts(model)
    removed = validate_removal(remove, p.num_layers)
    # One dense pass records reconstruct's targets and gives the lstsq fits their dense side.
    rec = Reconstruction.in_memory(model, calib, removed, m.recon, progress) if m.trains else None
    fits = fit_in_memory(model, removed, calib, m, batch_size=batch_size, progress=progress,
                         rec=rec.rec if rec is not None else None)
    trained = fold_and_train(model, removed, fits, m, calib, progress, rec)
    record = prune_layers(model, removed)
    summary = fit_summary(fits, p.adapter, m, calib, "in-memory", time.perf_counter() - t0, trained)
    return {"record": record, "compensation": summary}


def fold_and_train(model: Any, removed: list[int], fits: list[Any], method: CompMethod, calib: Any,
                   progress: bool = True, rec: Any = None) -> list[dict[str, Any]] | None:
    """Fold ``fits`` into the (not yet pruned) model; a training method (``reconstruct``) then trains the kept
    layers beside each block, on targets taken from the dense weights before the fold (``rec``: that recording
    when already made). Returns its reports."""
    from ..arch import parts
    from .core import fold_in_memory
    from .reconstruct import Reconstruction
    from .stream import InMemoryLayers

    if rec is None and method.trains:
        rec = Reconstruction.in_memory(model, calib, removed, method.recon, progress)
    fold_in_memory(model, fits, removed)
    return rec.run(InMemoryLayers(parts(model).layers)) if rec is not None else None


def compensate_checkpoint(model: str | os.PathLike, out_dir: str | os.PathLike, *, remove: list[int] | None = None,
                          tail: int | None = None, config: CompensationConfig | None = None,
                          calib_data_dir: str | None = None, seed: int = 42, dtype: str | None = "auto",
                          device: str | None = None, overwrite: bool = False, method_name: str | None = None,
                          method_params: dict | None = None, scores: Any = None,
                          progress: bool = True) -> dict[str, Any]:
    """Prune ``model`` (a folder or ``default``) with compensation into ``out_dir``; returns the manifest.

    Everything that can be checked is checked before the model is loaded: the removal, the method, the fold
    point, a tied embedding under a block at layer 0, the calibration size (without ridge).
    """
    from ..arch import adapter_for_config, layer_count
    from ..data.calibration import CalibSpec, build_calibration
    from ..io import check_out_dir
    from ..models import (
        build_manifest,
        count_parameters,
        load,
        load_tokenizer,
        read_config,
        resolve_model,
        save_pruned,
    )
    from ..prune.surgery import tail_layers, validate_removal
    from .core import fit_layerwise, fit_summary, fold_overrides
    from .plan import Block, plan_blocks

    cfg = config or CompensationConfig()
    comp = cfg.make_method()
    path = resolve_model(model)
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise LayerpruneError(f"compensation needs a local model folder with config.json: {path}")
    mcfg = read_config(path)
    n = layer_count(mcfg)
    if (remove is None) == (tail is None):
        raise LayerpruneError("give exactly one of --remove or --tail")
    removed = validate_removal(tail_layers(n, tail) if tail is not None else list(remove or []), n)
    adapter = adapter_for_config(mcfg)
    blocks: list[Block] = plan_blocks(removed, n)
    if comp.map_shape == "matrix" and not adapter.mlp_out and any(b.fold_layer is not None for b in blocks):
        raise LayerpruneError(f"no compensation fold point known for '{adapter.name}'; supported model types: "
                              f"{', '.join(supported_fold_types())}")
    tied = bool(mcfg.get("tie_word_embeddings", True))
    if comp.map_shape == "matrix" and tied and any(b.fold_layer is None for b in blocks):
        raise LayerpruneError(f"block {blocks[0].label()} starts at layer 0 and the input embeddings are tied to "
                              "the output head: there is no layer to fold its map into (keep layer 0)")
    hidden = mcfg.get("hidden_size") or mcfg.get("n_embd")
    if isinstance(hidden, int):
        comp.check_tokens(cfg.nsamples * cfg.seqlen, hidden, "diag" if adapter.mlp_post_norm else "matrix")
    check_out_dir(out_dir, overwrite, (path,))
    spec = CalibSpec(source=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=seed, data_dir=calib_data_dir)
    method_name = method_name or ("reverse" if tail is not None else "manual")
    params = dict(method_params or ({"k": tail} if tail is not None else {}))
    t0 = time.perf_counter()
    if cfg.mode == "layerwise":
        from ..metrics.layerwise import LayerwiseModel
        from ..prune.streaming import prune_checkpoint_streaming
        from .reconstruct import Reconstruction
        from .stream import DiskLayers

        tok = load_tokenizer(path)
        cal = build_calibration(tok, spec)
        lw = LayerwiseModel(path, dtype=dtype, device=device)
        # As in memory: reconstruct's one recorded dense pass also gives the fits their dense side.
        rec = Reconstruction.layerwise(lw, cal, removed, comp.recon, progress) if comp.trains else None
        fits = fit_layerwise(lw, removed, cal, comp, batch_size=cfg.batch_size, progress=progress,
                             rec=rec.rec if rec is not None else None)
        overrides = fold_overrides(lw, fits, removed)
        trained = rec.run(DiskLayers(lw, overrides)) if rec is not None else None  # trained layers join them
        summary = fit_summary(fits, lw.adapter, comp, cal, "layerwise", time.perf_counter() - t0, trained)
        del lw
        prune_checkpoint_streaming(path, removed, out_dir, overwrite=overwrite, method=method_name,
                                   method_params=params, scores=scores, source=str(model), overrides=overrides,
                                   extra_manifest={"compensation": summary})
        return json.loads((Path(out_dir) / "layerprune.json").read_text())
    mdl, tok = load(path, dtype=dtype, device=device)
    cal = build_calibration(tok, spec)
    before = count_parameters(mdl)
    out = compensate(mdl, removed, cal, method=comp, batch_size=cfg.batch_size, progress=progress)
    record, summary = out["record"], out["compensation"]
    manifest = build_manifest(str(model), record, method=method_name, params=params, scores=scores,
                              params_before=before, params_after=count_parameters(mdl), mode="in-memory",
                              compensation=summary)
    save_pruned(mdl, None, out_dir, manifest, overwrite=overwrite, copy_from=path)
    return manifest


__all__ = ["METHODS", "MODES", "CompensationConfig", "ReconSpec", "compensate", "compensate_checkpoint",
           "fold_and_train", "make_method"]
