"""Cached teacher for distillation: the teacher's log-probabilities at every loss position of the training
set, computed once per (teacher weights, encoded data, what is kept) and stored on disk.

A distillation run, its ``--resume``, every search probe and every sweep cell with the same key read the file
and never load the teacher, so distillation costs what partial healing costs plus one log-softmax.

What is kept: the whole distribution where the vocabulary has at most ``full_max`` entries (the cached loss
then equals the live teacher's to float rounding); otherwise the top ``k`` log-probs per position (LinearPatch
keeps 50, DistillKit 64–128). Top-K is a biased estimate of the teacher (arXiv 2503.16870): the tail mass is
dropped and the K kept probabilities are renormalised, so the KL pulls the student towards a sharper teacher.
docs/healing.md states the default and the bias.

The cache fills as training reaches each sample: a first run computes (and stores) what it uses, like live
distillation would; a later run reads it. Files (``<root>/<key>/``): ``meta.json`` and one
``part-*.safetensors`` shard per flush (``ids`` of the samples, ``offsets``, ``values`` [P, K] float32
log-probs at temperature 1, ``indices`` [P, K] int32 for top-K), each written under a temporary name and
renamed, so a killed run leaves only whole shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..data.instruct import IGNORE_INDEX
from ..errors import LayerpruneError

META = "meta.json"
FORMAT = 1


def cache_root() -> Path:
    """``$LAYERPRUNE_CACHE/teacher`` or ``~/.cache/layerprune/teacher``."""
    base = os.environ.get("LAYERPRUNE_CACHE") or str(Path.home() / ".cache" / "layerprune")
    return Path(base) / "teacher"


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")


def weights_fingerprint(path: str | os.PathLike, root: Path | None = None) -> str:
    """SHA-256 over the teacher's config and weight files (content, not names). Hashes are remembered per
    (file, size, mtime) in ``<root>/hashes.json`` so a large teacher is read once."""
    folder = Path(path)
    if not folder.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]  # a Hub id: its name is all we know
    memo_file = (root or cache_root()) / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for f in _weight_files(folder):
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            fh = hashlib.sha256()
            with f.open("rb") as src:
                for chunk in iter(lambda: src.read(1 << 24), b""):
                    fh.update(chunk)
            memo[key] = fh.hexdigest()
            changed = True
        h.update(f"{f.name}:{memo[key]}\n".encode())
    if changed:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            tmp.replace(memo_file)
        except OSError:
            pass  # a read-only cache root: hash again next time
    return h.hexdigest()[:16]


def loss_positions(labels: list[int]) -> list[int]:
    """Positions whose next token is trained (the logits at t predict token t + 1)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


class TeacherCache:
    """The cached teacher log-probs of one training set, filled as training reaches each sample.

    :meth:`targets` hands a batch its rows: read from disk where cached, else computed by the teacher (loaded on
    the first miss only) and kept; :meth:`flush` writes the new rows as one more shard file. A run whose
    samples were all cached never loads the teacher (``hit``); a first run costs what live distillation costs
    and leaves the cache warm for every later run with the same key."""

    def __init__(self, folder: Path, key: dict[str, Any], rows: list[dict[str, list[int]]], k: int, pad_id: int,
                 load_teacher: Callable[[], nn.Module]):
        self.folder, self.key, self.rows, self.k, self.pad_id = folder, key, rows, k, pad_id
        self.full = key["kept"] == "full"
        self._load_teacher = load_teacher
        self.teacher: nn.Module | None = None
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.new: list[int] = []
        self.read_rows = self.computed_rows = 0
        self.seconds = 0.0  # spent in the teacher
        self.vocab: int | None = None
        self._load()

    # ------------------------------------------------------------------------------------------- key

    @staticmethod
    def make_key(teacher_fp: str, data_fp: str, vocab: int, k: int, full_max: int, dtype: str) -> dict[str, Any]:
        full = vocab <= full_max
        return {"format": FORMAT, "teacher": teacher_fp, "data": data_fp, "dtype": dtype,
                "kept": "full" if full else f"top-{k}", "vocab": vocab}

    @staticmethod
    def folder_for(key: dict[str, Any], root: Path | None = None) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return (root or cache_root()) / digest

    # ------------------------------------------------------------------------------------------- disk

    def _load(self) -> None:
        """Read every complete shard of a folder made for this key (a folder for another key is ignored)."""
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.folder / META).read_text())
        except (OSError, ValueError):
            return
        if meta.get("key") != self.key:
            return
        self.vocab = meta.get("vocab")
        for shard in sorted(self.folder.glob("part-*.safetensors")):
            try:
                t = load_file(str(shard))
            except (OSError, ValueError):
                continue  # a torn file cannot exist (atomic rename), but never trust one
            ids, offsets = t["ids"].tolist(), t["offsets"].tolist()
            for j, r in enumerate(ids):
                a, b = offsets[j], offsets[j + 1]
                self.store[r] = (t["values"][a:b], t["indices"][a:b] if "indices" in t else None)

    def flush(self) -> None:
        """Write the rows computed since the last flush as one shard (temporary name, then renamed)."""
        from safetensors.torch import save_file

        if not self.new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_file = self.folder / META
        if not meta_file.is_file():
            tmp_meta = self.folder / f".{META}.{os.getpid()}.tmp"
            tmp_meta.write_text(json.dumps({"key": self.key, "vocab": self.vocab, "k": self._width()}, indent=1))
            tmp_meta.replace(meta_file)
        ids = sorted(self.new)
        vals = [self.store[r][0] for r in ids]
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64),
                   "offsets": torch.tensor([0] + [len(v) for v in vals]).cumsum(0),
                   "values": torch.cat(vals).contiguous()}
        if not self.full:
            tensors["indices"] = torch.cat([self.store[r][1] for r in ids]).contiguous()  # type: ignore[misc]
        name = f"part-{time.time_ns()}-{os.getpid()}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        try:
            save_file(tensors, str(tmp))
            tmp.replace(self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.new = []

    def _width(self) -> int:
        return int(next(iter(self.store.values()))[0].shape[1]) if self.store else 0

    # ------------------------------------------------------------------------------------------- teacher

    @torch.no_grad()
    def _compute(self, missing: list[int]) -> None:
        """The teacher's log-probs for ``missing`` samples (one padded batch, the head only at loss positions)."""
        from ..arch import parts
        from .heads import HeadSelector

        t0 = time.perf_counter()
        if self.teacher is None:
            self.teacher = self._load_teacher()
        teacher = self.teacher
        device = next(teacher.parameters()).device
        longest = max(len(self.rows[r]["input_ids"]) for r in missing)
        ids = torch.full((len(missing), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        for b, r in enumerate(missing):
            n = len(self.rows[r]["input_ids"])
            ids[b, :n] = torch.tensor(self.rows[r]["input_ids"])
            mask[b, :n] = 1
            keep[b, loss_positions(self.rows[r]["labels"])] = True
        selector = HeadSelector(parts(teacher).head)
        try:
            with selector.select(keep.to(device)):
                logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        finally:
            selector.remove()
        if logits.dim() == 3:
            logits = logits[keep.to(device)]
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        self.vocab = int(logp.shape[-1])
        if self.vocab != self.key["vocab"]:
            raise LayerpruneError(f"teacher vocabulary ({self.vocab}) differs from the student's ({self.key['vocab']}); "
                                  "distillation needs the same tokenizer")
        for r, piece in zip(missing, logp.split(keep.sum(1).tolist())):
            if self.full:
                self.store[r] = (piece.clone(), None)
            else:
                v, ix = piece.topk(min(self.k, piece.shape[-1]), dim=-1)
                self.store[r] = (v.clone(), ix.to(torch.int32))
            self.new.append(r)
        self.computed_rows += len(missing)
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------- use

    def targets(self, sample_index: torch.Tensor, expected: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher log-probs of the batch's samples, in batch order (the order of the selected logits)."""
        order = [int(r) for r in sample_index.flatten().tolist()]
        missing = sorted({r for r in order if r not in self.store})
        if missing:
            self._compute(missing)
        self.read_rows += len(order) - len(missing)
        v = torch.cat([self.store[r][0] for r in order])
        if v.shape[0] != expected:
            raise LayerpruneError(f"teacher cache {self.folder}: {v.shape[0]} cached positions for a batch with "
                                  f"{expected} loss positions (a stale cache: delete the folder)")
        ix = None if self.full else torch.cat([self.store[r][1] for r in order]).long()  # type: ignore[misc]
        return v, ix

    @property
    def hit(self) -> bool:
        return self.computed_rows == 0  # the teacher was never needed (never loaded)

    def summary(self) -> dict[str, Any]:
        files = list(self.folder.glob("part-*.safetensors")) if self.folder.is_dir() else []
        return {"used": True, "hit": self.hit, "folder": str(self.folder), "kept": self.key["kept"],
                "k": self._width(), "rows_read": self.read_rows, "rows_computed": self.computed_rows,
                "teacher_seconds": round(self.seconds, 2), "bytes": sum(f.stat().st_size for f in files)}

    def close(self) -> None:
        self.flush()
        self.teacher = None


class FlushAtSave(TrainerCallback):
    """The cache's new rows are written with every checkpoint (a killed run keeps them)."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.cache.flush()
        return control


__all__ = ["FlushAtSave", "TeacherCache", "cache_root", "loss_positions", "weights_fingerprint"]
