"""General-text healing data: documents packed into ``cutoff_len`` windows, every token trained.

Healing on instruction data improves instruction following but not what perplexity and zero-shot accuracy read
(general text); on SmolLM2 100 Alpaca steps left the searched cut's wikitext-2 perplexity where compensation had
put it. A text source — the ``c4`` preset (the local C4 sample), a ``.txt`` file (a document per line), or
JSON/JSONL/Parquet rows with only a ``text`` field — is split by document into train and validation, each
document tokenized with the tokenizer's BOS, joined with EOS, and cut into windows. Evaluation text (the
perplexity sets, the zero-shot task files) is refused.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from ..errors import LayerpruneError

TEXT_FORMAT = "text"
VAL_FRACTION = 0.05  # validation documents by default (at least one)
EVAL_FOLDERS = ("ppl", "eval")  # under a data folder: evaluation text, never healed on


def is_text_rows(rows: list[dict[str, Any]]) -> bool:
    """Rows of plain text: a ``text`` field and no instruction field."""
    cols = set(rows[0]) if rows else set()
    return "text" in cols and not {"instruction", "output", "response"} & cols


def check_not_eval_text(path: str | Path, data_dir: str | Path | None) -> None:
    """Refuse a healing source that is evaluation text: a file under the data folder's evaluation folders or
    named like an evaluation split."""
    from .calibration import _is_eval_file

    p = Path(path).resolve()
    if data_dir is not None:
        for sub in EVAL_FOLDERS:
            root = (Path(data_dir) / sub).resolve()
            if p == root or root in p.parents:
                raise LayerpruneError(f"{path} is evaluation text ({sub}/ of the data folder): healing on it would "
                                      "train on what is reported")
    if _is_eval_file(p):
        raise LayerpruneError(f"{path} looks like an evaluation split (file named '{p.name}'): healing on it would "
                              "train on what is reported")


def document_order(n: int, seed: int) -> list[int]:
    """The seeded order documents are given to validation in (its head) and training (the rest)."""
    if n < 2:
        raise LayerpruneError("general-text healing needs at least two documents (one for validation)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _tokens(tokenizer: Any, text: str) -> list[int]:
    eos = tokenizer.eos_token_id
    return list(tokenizer(text, add_special_tokens=True)["input_ids"]) + ([eos] if eos is not None else [])


def windows(stream: list[int], cutoff_len: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": stream[i:i + cutoff_len], "labels": stream[i:i + cutoff_len]}
            for i in range(0, len(stream) - cutoff_len + 1, cutoff_len)]


def split_and_pack(tokenizer: Any, texts: list[str], cutoff_len: int, val_size: int | float | None, seed: int
                   ) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], int]:
    """(train windows, validation windows, validation documents): whole documents go to validation in the
    seeded order until it holds ``val_size`` windows (a fraction: of all documents; default 5% of them)."""
    order = document_order(len(texts), seed)
    toks = [_tokens(tokenizer, t) for t in texts]
    if val_size is None or (isinstance(val_size, float) and 0 < val_size < 1):
        docs = max(1, round(len(texts) * (val_size or VAL_FRACTION)))
        val_stream = [x for i in order[:docs] for x in toks[i]]
    else:
        docs, val_stream = 0, []
        while docs < len(order) and len(val_stream) // cutoff_len < int(val_size):
            val_stream += toks[order[docs]]
            docs += 1
    if docs >= len(texts):
        raise LayerpruneError(f"val_size {val_size} leaves no documents to train on ({len(texts)} in all)")
    train_stream = [x for i in order[docs:] for x in toks[i]]
    val = windows(val_stream, cutoff_len)
    return windows(train_stream, cutoff_len), val[:int(val_size)] if isinstance(val_size, int) else val, docs


def build_text_data(tokenizer: Any, rows: list[dict[str, Any]], where: str, kind: str, *, cutoff_len: int,
                    val_size: int | float | None, max_train_samples: int | None, seed: int
                    ) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], dict[str, Any]]:
    """(train windows, validation windows, description) of a general-text source (see the module docstring)."""
    texts = _texts(rows)
    train, val, val_docs = split_and_pack(tokenizer, texts, cutoff_len, val_size, seed)
    if max_train_samples is not None:
        train = train[:max_train_samples]
    if not train or not val:
        raise LayerpruneError(f"{where}: too little text for one {cutoff_len}-token window in train and validation")
    h = hashlib.sha256()
    for part in (train, val):
        h.update(json.dumps([r["input_ids"] for r in part], separators=(",", ":")).encode())
    tokens = sum(len(r["input_ids"]) for r in train)
    return train, val, {
        "source": where, "source_kind": kind, "format": TEXT_FORMAT, "rows": len(rows), "documents": len(texts),
        "train_documents": len(texts) - val_docs, "val_documents": val_docs, "train_rows": len(train),
        "val_rows": len(val), "cutoff_len": cutoff_len, "packing": "documents joined, full windows",
        "split_seed": seed, "train_tokens": tokens, "trained_tokens": tokens - len(train),
        "fingerprint": h.hexdigest()[:16]}


def _texts(rows: list[dict[str, Any]]) -> list[str]:
    return [t for t in (str(r.get("text") or "").strip() for r in rows) if t]


def text_prompts(rows: list[dict[str, Any]], n: int, seed: int, chars: int = 200) -> list[str]:
    """The opening of the first ``n`` documents in validation order (held out whenever validation holds at
    least ``n`` documents), as generation prompts."""
    texts = _texts(rows)
    return [texts[i][:chars] for i in document_order(len(texts), seed)[:n]]


__all__ = ["TEXT_FORMAT", "build_text_data", "check_not_eval_text", "document_order", "is_text_rows",
           "split_and_pack", "text_prompts", "windows"]
