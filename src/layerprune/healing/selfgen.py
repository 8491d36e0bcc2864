"""Self-generated healing data (``--data self:N``): N sequences sampled from the dense teacher, for data-free
distillation.

Each sequence starts from the opening tokens of a calibration document (the local C4 sample by default, never
evaluation text) and is continued by the teacher with nucleus sampling up to the cutoff length. The texts are
written once per (teacher weights, N, cutoff, prompt source, seed) as a JSONL file of ``{"text": ...}`` rows in
``$LAYERPRUNE_CACHE/selfgen/`` and then read as general text (packed windows, every token trained), so a
re-run, a resume, the search's probes and every sweep cell reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import LayerpruneError

PREFIX = "self:"
PROMPT_TOKENS = 8  # opening tokens of a calibration document that a sequence starts from
PROMPT_SOURCE = "c4"
TOP_P = 0.95
MAX_N = 100_000


def self_count(data: str) -> int | None:
    """N for ``self:N``; None for any other data source; a one-line error for a malformed count."""
    if not data.startswith(PREFIX):
        return None
    raw = data[len(PREFIX):]
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_N:
        raise LayerpruneError(f"--data {data}: self:N needs a whole number of sequences between 1 and {MAX_N}")
    return int(raw)


def _prompts(tokenizer: Any, n: int, seed: int, data_dir: str | None) -> tuple[list[list[int]], dict[str, Any]]:
    from ..data.calibration import CalibSpec, load_texts

    texts, info = load_texts(CalibSpec(source=PROMPT_SOURCE, seed=seed, data_dir=data_dir))
    out: list[list[int]] = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])[:PROMPT_TOKENS]
        if len(ids) == PROMPT_TOKENS:
            out.append(ids)
        if len(out) == n:
            break
    if not out:
        raise LayerpruneError(f"no {PROMPT_SOURCE} document has {PROMPT_TOKENS} tokens to start a sequence from")
    while len(out) < n:  # fewer documents than sequences: prompts repeat, sampling differs
        out.append(out[len(out) % max(1, len(texts))])
    return out, info


def self_generated(teacher_path: str, tokenizer: Any, n: int, *, cutoff_len: int, seed: int,
                   data_dir: str | None, device: str, root: Path | None = None, batch_size: int = 16,
                   progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The JSONL file of ``n`` teacher-sampled texts (built on the first call); returns (path, info)."""
    from .teacher_cache import cache_root, weights_fingerprint

    base = root or cache_root().parent
    key = {"teacher": weights_fingerprint(teacher_path, cache_root() if root is None else root / "teacher"),
           "n": n, "cutoff_len": cutoff_len, "seed": seed, "prompts": f"{PROMPT_SOURCE}:{PROMPT_TOKENS}",
           "top_p": TOP_P, "format": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = base / "selfgen" / f"{digest}.jsonl"
    info = {"self_generated": {**key, "file": str(path)}}
    if path.is_file():
        info["self_generated"]["hit"] = True
        return path, info
    from ..models import load_model

    t0 = time.perf_counter()
    prompts, _ = _prompts(tokenizer, n, seed, data_dir)
    model: Any = load_model(teacher_path, dtype=torch.float32 if device == "cpu" else "auto").to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[str] = []
    torch.manual_seed(seed)  # generate() samples from torch's global generator
    with torch.no_grad():
        for i in tqdm(range(0, n, batch_size), desc="self-generated data", disable=not progress, leave=False):
            batch = torch.tensor(prompts[i:i + batch_size], device=device)  # equal lengths: no padding
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, top_p=TOP_P,
                                 temperature=1.0, top_k=0, max_new_tokens=max(1, cutoff_len - PROMPT_TOKENS),
                                 pad_token_id=pad)
            rows.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    tmp.replace(path)
    info["self_generated"].update(hit=False, seconds=round(time.perf_counter() - t0, 2))
    return path, info


__all__ = ["PREFIX", "self_count", "self_generated"]
