"""The prune stage: remove layers in memory (:mod:`.surgery`) or by rewriting shards (:mod:`.streaming`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..arch import layer_count
from ..errors import LayerpruneError
from ..models import (
    build_manifest,
    count_parameters,
    load_model,
    parse_dtype,
    read_config,
    resolve_model,
    save_pruned,
)
from .skip import skipped
from .streaming import prune_checkpoint_streaming
from .surgery import PruneRecord, parse_layer_list, prune_layers, tail_layers, validate_removal

__all__ = ["PruneRecord", "parse_layer_list", "prune_checkpoint", "prune_checkpoint_streaming",
           "prune_layers", "skipped", "tail_layers", "validate_removal"]


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
        n = layer_count(read_config(path))
        if tail is not None:
            remove = tail_layers(n, tail)
            method = method or "reverse"
            method_params = method_params or {"k": tail}
        remove = validate_removal(remove or [], n)
    elif tail is not None:
        raise LayerpruneError(f"--tail needs a local model folder with config.json: {path}")
    assert remove is not None
    method = method or "manual"
    if streaming:
        dt = parse_dtype(dtype)
        return prune_checkpoint_streaming(path, remove, out_dir, overwrite=overwrite,
                                          dtype=None if dt == "auto" else dt, method=method,
                                          method_params=method_params, scores=scores, source=str(model))
    from ..io import check_out_dir

    check_out_dir(out_dir, overwrite, (path,))  # fail before the (slow) load
    m = load_model(path, dtype=dtype)
    before = count_parameters(m)
    record = prune_layers(m, remove)
    manifest = build_manifest(str(model), record, method=method, params=method_params, scores=scores,
                              params_before=before, params_after=count_parameters(m), mode="in-memory")
    # The tokenizer files are copied, not re-serialised, so they stay byte-identical to the source.
    save_pruned(m, None, out_dir, manifest, overwrite=overwrite, copy_from=path)
    return record
