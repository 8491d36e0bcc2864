"""Cached teacher for distillation: the teacher's log-probabilities at every loss position of the training
set, computed once per (teacher weights, encoded data, what is kept) and stored on disk.

A distillation run, its ``--resume``, every search probe and every sweep cell with the same key read the file
and never load the teacher, so distillation costs what partial healing costs plus one log-softmax.

What is kept: the whole distribution where the vocabulary has at most ``full_max`` entries (the cached loss
then equals the live teacher's to float rounding); otherwise the top ``k`` log-probs per position (LinearPatch
keeps 50, DistillKit 64–128). Top-K is a biased estimate of the teacher (arXiv 2503.16870): the tail mass is
dropped and the K kept probabilities are renormalised, so the KL pulls the student towards a sharper teacher.
docs/healing.md states the default and the bias.

Files (``<root>/<key>/``): ``teacher.safetensors`` (``values`` [P, K] float32 log-probs at temperature 1,
``indices`` [P, K] int32 for top-K, ``offsets`` [R + 1] int64: sample r owns rows ``offsets[r]:offsets[r+1]``)
and ``meta.json``; both written to a temporary folder and renamed, so a killed build leaves no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.instruct import IGNORE_INDEX
from ..errors import LayerpruneError

FILE = "teacher.safetensors"
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
    """The cached teacher log-probs of one training set; :meth:`targets` hands a batch its rows."""

    def __init__(self, folder: Path, values: torch.Tensor, indices: torch.Tensor | None, offsets: torch.Tensor,
                 meta: dict[str, Any], hit: bool):
        self.folder, self.values, self.indices, self.offsets, self.meta, self.hit = (
            folder, values, indices, offsets, meta, hit)

    # ------------------------------------------------------------------------------------------- key

    @staticmethod
    def key(teacher_fp: str, data_fp: str, vocab: int, k: int, full_max: int, dtype: str) -> dict[str, Any]:
        full = vocab <= full_max
        return {"format": FORMAT, "teacher": teacher_fp, "data": data_fp, "dtype": dtype,
                "kept": "full" if full else f"top-{k}", "vocab": vocab}

    @staticmethod
    def folder_for(key: dict[str, Any], root: Path | None = None) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return (root or cache_root()) / digest

    # ------------------------------------------------------------------------------------------- open / build

    @classmethod
    def open(cls, folder: Path, key: dict[str, Any]) -> TeacherCache | None:
        """The cache in ``folder`` if it is complete and made for ``key``; None otherwise."""
        from safetensors.torch import load_file

        try:
            meta = json.loads((folder / META).read_text())
            if meta.get("key") != key:
                return None
            t = load_file(str(folder / FILE))
        except (OSError, ValueError):
            return None
        return cls(folder, t["values"], t.get("indices"), t["offsets"], meta, hit=True)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, rows: list[dict[str, list[int]]], folder: Path, key: dict[str, Any], *,
              k: int, pad_id: int, batch_tokens: int = 8192, progress: bool = True) -> TeacherCache:
        """Run the teacher over ``rows`` (padded batches of similar length, the head only at the loss
        positions), keep the full log-probs or the top ``k``, write the files atomically."""
        from safetensors.torch import save_file

        from ..arch import parts
        from .train import HeadSelector

        t0 = time.perf_counter()
        full = key["kept"] == "full"
        device = next(teacher.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        per_row: list[tuple[torch.Tensor, torch.Tensor | None]] = [None] * len(rows)  # type: ignore[list-item]
        selector = HeadSelector(parts(teacher).head)
        bar = tqdm(total=len(rows), desc="teacher cache", disable=not progress, leave=False)
        try:
            i = 0
            while i < len(order):
                longest = len(rows[order[i]]["input_ids"])
                j = i + 1
                while j < len(order) and (j - i + 1) * len(rows[order[j]]["input_ids"]) <= batch_tokens:
                    j += 1
                chunk = order[i:j]
                longest = max(len(rows[r]["input_ids"]) for r in chunk)
                ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                keep = torch.zeros_like(ids, dtype=torch.bool)
                for b, r in enumerate(chunk):
                    n = len(rows[r]["input_ids"])
                    ids[b, :n] = torch.tensor(rows[r]["input_ids"])
                    mask[b, :n] = 1
                    keep[b, loss_positions(rows[r]["labels"])] = True
                with selector.select(keep.to(device)):
                    logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                if logits.dim() == 3:
                    logits = logits[keep.to(device)]
                logp = F.log_softmax(logits.float(), dim=-1).cpu()
                counts = keep.sum(1).tolist()
                for r, piece in zip(chunk, logp.split(counts)):
                    if full:
                        per_row[r] = (piece.clone(), None)
                    else:
                        v, ix = piece.topk(min(k, piece.shape[-1]), dim=-1)
                        per_row[r] = (v.clone(), ix.to(torch.int32))
                bar.update(len(chunk))
                i = j
        finally:
            selector.remove()
            bar.close()
        vocab = int(logp.shape[-1]) if rows else 0
        values = torch.cat([v for v, _ in per_row])
        indices = None if full else torch.cat([ix for _, ix in per_row if ix is not None])
        offsets = torch.tensor([0] + [len(v) for v, _ in per_row]).cumsum(0)
        tensors = {"values": values.contiguous(), "offsets": offsets}
        if indices is not None:
            tensors["indices"] = indices.contiguous()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        meta = {"key": key, "vocab": vocab, "rows": len(rows), "positions": int(values.shape[0]), "k": int(values.shape[1]),
                "bytes": size, "build_seconds": round(time.perf_counter() - t0, 2)}
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_file(tensors, str(tmp / FILE))
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if folder.exists():  # an incomplete or stale cache under the same key
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(folder, values, indices, offsets, meta, hit=False)

    # ------------------------------------------------------------------------------------------- use

    def targets(self, sample_index: torch.Tensor, expected: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached log-probs of the batch's samples, in batch order (the order of the selected logits)."""
        parts_v, parts_i = [], []
        for r in sample_index.flatten().tolist():
            a, b = int(self.offsets[r]), int(self.offsets[r + 1])
            parts_v.append(self.values[a:b])
            if self.indices is not None:
                parts_i.append(self.indices[a:b])
        v = torch.cat(parts_v)
        if v.shape[0] != expected:
            raise LayerpruneError(f"teacher cache {self.folder}: {v.shape[0]} cached positions for a batch with "
                                  f"{expected} loss positions (a stale cache: delete the folder)")
        return v, (torch.cat(parts_i).long() if parts_i else None)

    def summary(self) -> dict[str, Any]:
        return {"used": True, "hit": self.hit, "folder": str(self.folder), "kept": self.meta["key"]["kept"],
                "k": self.meta["k"], "bytes": self.meta["bytes"], "positions": self.meta["positions"],
                "build_seconds": None if self.hit else self.meta["build_seconds"]}


def cached_kd_loss_sum(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None,
                       temperature: float) -> torch.Tensor:
    """``T² · KL(p_teacher || p_student)`` summed over positions from cached teacher log-probs (temperature 1).

    Full distribution: exactly the live loss (``log_softmax`` is shift-invariant, so the cached log-probs at
    T = 1 give the tempered teacher). Top-K: the teacher renormalised over its K kept tokens, the student's
    full tempered log-probs gathered there."""
    t = float(temperature)
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(values.to(s_logp.device).float() / t, dim=-1)
    if indices is not None:
        s_logp = s_logp.gather(-1, indices.to(s_logp.device))
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * (t * t)


__all__ = ["TeacherCache", "cache_root", "cached_kd_loss_sum", "loss_positions", "weights_fingerprint"]
