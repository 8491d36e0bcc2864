"""Prune a safetensors checkpoint without loading the model: rewrite the shards tensor by tensor.

Tensors of kept layers are renamed to their new index and their bytes copied in chunks; removed layers'
tensors are skipped. Only tensors an architecture quirk must rewrite (or a dtype change) are decoded, one at
a time, so peak memory stays about one tensor. The safetensors library has no incremental writer, so the
(simple, documented) file format is written here: 8-byte little-endian header size, JSON header, raw data.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from ..arch import Adapter, adapter_for_config, layer_count, sliced_config
from ..errors import LayerpruneError
from ..io import atomic_dir, check_out_dir, write_json
from ..models import MANIFEST, build_manifest, check_checkpoint_tensors, copy_aux_files, read_config
from .surgery import PruneRecord, validate_removal

INDEX_FILE = "model.safetensors.index.json"
_CHUNK = 64 << 20
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}
_FLOAT = set(_ST_TO_TORCH)


@dataclass
class _Entry:
    name: str  # output name
    src_file: Path
    src_name: str
    dtype: str
    shape: list[int]
    begin: int  # absolute offset of the data in src_file
    nbytes: int
    layer_rel: str | None = None  # name relative to its layer (for quirks)
    old: int = -1
    new: int = -1


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; returns (header, data_start). One-line errors for corrupt files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LayerpruneError(f"corrupt safetensors file (truncated header): {path}")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise LayerpruneError(f"corrupt safetensors file (bad header size): {path}")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerpruneError(f"corrupt safetensors file {path}: {type(e).__name__}") from None
    data_start = 8 + n
    data_len = size - data_start
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = v["data_offsets"]
            ok = 0 <= a <= b <= data_len and b - a == _numel(v["shape"]) * _DTYPE_SIZES[v["dtype"]]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LayerpruneError(f"corrupt or partial safetensors file {path}: tensor '{k}' out of bounds")
    return header, data_start


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _layer_regex(adapter: Adapter) -> re.Pattern[str]:
    # Checkpoints may store keys with or without the base-model prefix (GPT-2: "h.0." or "transformer.h.0.").
    parent, _, leaf = adapter.layers.rpartition(".")
    parts = parent.split(".") if parent else []
    prefixes = ["".join(p + "." for p in parts[i:]) for i in range(len(parts) + 1)]
    alts = "|".join(re.escape(p) for p in prefixes)
    return re.compile(rf"^((?:{alts}){re.escape(leaf)})\.(\d+)\.(.+)$")


def _source_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise LayerpruneError(f"corrupt shard index: {index}") from None
        files = sorted({model_dir / f for f in wm.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LayerpruneError(f"shard index names missing files: {', '.join(missing[:3])}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    raise LayerpruneError(f"no safetensors weights in {model_dir} (streaming pruning needs .safetensors files)")


def _plan(model_dir: Path, remove: list[int], cfg: dict[str, Any], adapter: Adapter) -> tuple[list[list[_Entry]], dict[str, Any], PruneRecord]:
    n = layer_count(cfg)
    removed = validate_removal(remove, n)
    kept = [i for i in range(n) if i not in set(removed)]
    remap = {old: new for new, old in enumerate(kept)}
    rx = _layer_regex(adapter)
    shards: list[list[_Entry]] = []
    meta: dict[str, Any] = {}
    seen_layers: set[int] = set()
    for f in _source_files(model_dir):
        header, start = read_header(f)
        meta = header.get("__metadata__", meta) or meta
        entries = []
        for name, v in header.items():
            if name == "__metadata__":
                continue
            a, b = v["data_offsets"]
            e = _Entry(name, f, name, v["dtype"], list(v["shape"]), start + a, b - a)
            m = rx.match(name)
            if m:
                old = int(m.group(2))
                seen_layers.add(old)
                if old >= n:
                    raise LayerpruneError(f"tensor {name} names layer {old} but config has {n} layers")
                if old not in remap:
                    continue
                e.name = f"{m.group(1)}.{remap[old]}.{m.group(3)}"
                e.layer_rel, e.old, e.new = m.group(3), old, remap[old]
            entries.append(e)
        shards.append(entries)
    if not seen_layers:
        raise LayerpruneError(f"no decoder-layer tensors matching '{adapter.layers}.N.' found in {model_dir}")
    return shards, meta, PruneRecord(n, removed, kept)


def _write_shard(path: Path, entries: list[_Entry], meta: dict[str, Any], cfg: dict[str, Any],
                 adapter: Adapter, dtype: torch.dtype | None, bar: tqdm,
                 overrides: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Write one output shard: header first (sizes are known up front), then each tensor's bytes."""
    # Decide each tensor's output dtype and size before writing anything.
    out_dtype = {}
    for e in entries:
        out_dtype[e.name] = _TORCH_TO_ST[dtype] if (dtype is not None and e.dtype in _FLOAT) else e.dtype
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for e in sorted(entries, key=lambda e: e.name):
        size = _numel(e.shape) * _DTYPE_SIZES[out_dtype[e.name]]
        header[e.name] = {"dtype": out_dtype[e.name], "shape": e.shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align data to 8 bytes like the reference writer
    sizes = {}
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for e in sorted(entries, key=lambda e: e.name):
            needs_quirk = (e.layer_rel is not None and e.old != e.new and adapter.tensor_quirk is not None
                           and e.layer_rel in adapter.quirk_tensors)
            override = (overrides or {}).get(e.src_name)
            if override is not None and (list(override.shape) != e.shape or
                                         _TORCH_TO_ST.get(override.dtype) != e.dtype):
                raise LayerpruneError(f"replacement for {e.src_name} has the wrong shape or dtype")
            if needs_quirk or out_dtype[e.name] != e.dtype or override is not None:
                t = override if override is not None else _load_tensor(e)
                if needs_quirk and adapter.tensor_quirk is not None and e.layer_rel is not None:
                    t = adapter.tensor_quirk(e.layer_rel, t, e.old, e.new, cfg)
                if out_dtype[e.name] != e.dtype:
                    t = t.to(_ST_TO_TORCH[out_dtype[e.name]])
                data = _tensor_bytes(t)
                out.write(data)
                del t, data
            else:
                _copy_bytes(e, out)
            sizes[e.name] = header[e.name]["data_offsets"][1] - header[e.name]["data_offsets"][0]
            bar.update(e.nbytes)
    return sizes


def _load_tensor(e: _Entry) -> torch.Tensor:
    with open(e.src_file, "rb") as f:
        f.seek(e.begin)
        buf = bytearray(f.read(e.nbytes))
    if e.dtype not in _ST_TO_TORCH:
        raise LayerpruneError(f"cannot convert tensor {e.src_name} of dtype {e.dtype}")
    return torch.frombuffer(buf, dtype=_ST_TO_TORCH[e.dtype]).reshape(e.shape) if e.nbytes else \
        torch.empty(e.shape, dtype=_ST_TO_TORCH[e.dtype])


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _copy_bytes(e: _Entry, out: BinaryIO) -> None:
    with open(e.src_file, "rb") as f:
        f.seek(e.begin)
        left = e.nbytes
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise LayerpruneError(f"truncated safetensors file: {e.src_file}")
            out.write(chunk)
            left -= len(chunk)


def prune_checkpoint_streaming(model_dir: str | os.PathLike, remove: list[int], out_dir: str | os.PathLike,
                               *, overwrite: bool = False, dtype: torch.dtype | None = None,
                               method: str = "manual", method_params: dict | None = None,
                               scores: Any = None, source: str | None = None,
                               overrides: dict[str, torch.Tensor] | None = None,
                               extra_manifest: dict[str, Any] | None = None) -> PruneRecord:
    """Rewrite ``model_dir``'s safetensors without the ``remove`` layers into ``out_dir`` (atomic).

    Keys of kept layers are renamed to their new index, ``config.json`` per-layer fields are sliced, the shard
    index is rewritten, tokenizer and generation files are copied, and ``layerprune.json`` is added.
    ``overrides`` replaces tensors (by source name, same shape and dtype) — the folded weights of compensation;
    ``extra_manifest`` adds keys to the manifest.
    """
    src = Path(model_dir)
    cfg = read_config(src)
    adapter = adapter_for_config(cfg)
    check_out_dir(out_dir, overwrite, (src,))
    shards, meta, record = _plan(src, remove, cfg, adapter)  # corrupt shards: its own precise errors
    check_checkpoint_tensors(src)  # a missing tensor must stop the cut, not vanish from it
    new_cfg = {**cfg, **sliced_config(cfg, record.kept_layers, adapter)}
    new_cfg.pop("auto_map", None)
    if dtype is not None:
        new_cfg["dtype"] = str(dtype).removeprefix("torch.")
        new_cfg.pop("torch_dtype", None)

    shards = [s for s in shards if s]
    params_before = _param_count(src)
    total = sum(e.nbytes for s in shards for e in s)
    with atomic_dir(out_dir, overwrite=overwrite, need_bytes=total) as tmp:
        weight_map: dict[str, str] = {}
        total_size = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc="streaming prune", disable=None) as bar:
            for i, entries in enumerate(shards):
                name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                sizes = _write_shard(tmp / name, entries, meta, cfg, adapter, dtype, bar, overrides)
                total_size += sum(sizes.values())
                weight_map.update({k: name for k in sizes})
        if len(shards) > 1:
            write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total_size},
                                          "weight_map": dict(sorted(weight_map.items()))})
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        copy_aux_files(src, tmp)
        write_json(tmp / MANIFEST, build_manifest(
            source or str(src), record, method=method, params=method_params, scores=scores,
            params_before=params_before, params_after=_param_count(tmp), mode="streaming",
            **(extra_manifest or {})))
    return record


def _param_count(folder: Path) -> int:
    return sum(_numel(v["shape"]) for f in _source_files(folder) for k, v in read_header(f)[0].items()
               if k != "__metadata__")
