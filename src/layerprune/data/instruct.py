"""Instruction data for healing: sources, prompt templates, label masking, cutoff and the validation split.

A row of any supported format becomes an :class:`Example` (instruction, input, output); a template turns it into
a prompt and a response; :func:`encode` tokenizes ``prompt + response`` once and masks exactly the prompt tokens
(label -100) unless ``train_on_inputs``. The boundary comes from the tokenizer's character offsets, so a BOS the
tokenizer prepends is counted with the prompt (the seed's Dolly collator masked only the BOS) and nothing depends
on how the prompt tokenizes on its own. Padding never uses a real token id in the labels: the collator pads labels
with -100.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LayerpruneError
from .presets import hub_reachable, resolve_data_dir

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Example:
    """One instruction-following sample in normalised form."""

    instruction: str
    input: str
    output: str


# Field names per known format: target field -> source column. ``input`` may be absent from a format.
FORMATS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "dolly": {"instruction": "instruction", "input": "context", "output": "response"},
    "lamini": {"instruction": "instruction", "output": "response"},
}
# The template each format was written for (the seed trains Dolly with the Dolly template, the rest with Alpaca).
FORMAT_TEMPLATE = {"alpaca": "alpaca", "dolly": "dolly", "lamini": "alpaca", "custom": "alpaca"}
# Default validation size per format (seed: 2000 for alpaca-cleaned, 200 for Dolly).
FORMAT_VAL_SIZE = {"alpaca": 2000, "dolly": 200, "lamini": 2000, "custom": 2000}


def detect_format(columns: Iterable[str]) -> str:
    """Guess the format from a row's columns: Alpaca (``output``), Dolly (``context`` + ``response``), LaMini."""
    cols = set(columns)
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"instruction", "context", "response"} <= cols:
        return "dolly"
    if {"instruction", "response"} <= cols:
        return "lamini"
    raise LayerpruneError(
        f"cannot tell the instruction format from the columns {sorted(cols)}; pass a field mapping, "
        "e.g. --fields instruction=question,input=context,output=answer")


def parse_fields(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """``"instruction=q,input=ctx,output=a"`` (or a dict) -> mapping; ``instruction`` and ``output`` required."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        out: dict[str, str] = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise LayerpruneError(f"bad field mapping '{part}': expected target=column")
            k, v = (s.strip() for s in part.split("=", 1))
            out[k] = v
        spec = out
    bad = set(spec) - {"instruction", "input", "output"}
    if bad:
        raise LayerpruneError(f"unknown target field(s) {sorted(bad)}; use instruction, input, output")
    if "instruction" not in spec or "output" not in spec:
        raise LayerpruneError("a field mapping needs at least instruction=... and output=...")
    return dict(spec)


def to_example(row: dict[str, Any], mapping: dict[str, str]) -> Example:
    """Normalise one row; missing or null optional fields become empty strings."""

    def get(target: str) -> str:
        col = mapping.get(target)
        if col is None:
            return ""
        if col not in row and target != "input":
            raise LayerpruneError(f"row has no column '{col}' (columns: {sorted(row)})")
        v = row.get(col)
        return "" if v is None else str(v)

    return Example(get("instruction"), get("input"), get("output"))


# -------------------------------------------------------------------------------------------------- templates

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
DOLLY_INTRO = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
# As in databricks-dolly's consts: note the input key is "Input:" without "###", and "### End" closes a sample.
DOLLY_PROMPT = DOLLY_INTRO + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
DOLLY_PROMPT_INPUT = DOLLY_INTRO + "\n\n### Instruction:\n{instruction}\n\nInput:\n{input}\n\n### Response:\n"
DOLLY_END = "\n\n### End"


@dataclass(frozen=True)
class Rendered:
    """A templated sample: the text the model reads (``prompt``) and the text it learns to write."""

    prompt: str
    response: str
    # Chat templates carry their own special tokens as text; the tokenizer must not add BOS/EOS again.
    add_special_tokens: bool = True


def _alpaca(ex: Example, tok: Any) -> Rendered:
    tpl = ALPACA_PROMPT_INPUT if ex.input.strip() else ALPACA_PROMPT
    return Rendered(tpl.format(instruction=ex.instruction, input=ex.input), ex.output)


def _dolly(ex: Example, tok: Any) -> Rendered:
    tpl = DOLLY_PROMPT_INPUT if ex.input.strip() else DOLLY_PROMPT
    return Rendered(tpl.format(instruction=ex.instruction, input=ex.input), ex.output + DOLLY_END)


def _chat(ex: Example, tok: Any) -> Rendered:
    """The tokenizer's own chat template: one user turn (instruction, blank line, input), one assistant turn."""
    if getattr(tok, "chat_template", None) is None:
        raise LayerpruneError("template 'chat' needs a tokenizer with a chat template; this one has none")
    user = ex.instruction if not ex.input.strip() else f"{ex.instruction}\n\n{ex.input}"
    msgs = [{"role": "user", "content": user}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": ex.output}], tokenize=False)
    if not full.startswith(prompt):
        raise LayerpruneError("the chat template renders the conversation so that the prompt is not a prefix of "
                              "it; use --template alpaca")
    response = full[len(prompt):]
    eos = getattr(tok, "eos_token", None)
    # Templates end a turn with EOS plus a newline; drop the newline so the sample ends in EOS instead of
    # getting a second EOS appended.
    if eos and response.rstrip().endswith(eos):
        response = response.rstrip()
    return Rendered(prompt, response, add_special_tokens=False)


TEMPLATES: dict[str, Callable[[Example, Any], Rendered]] = {"alpaca": _alpaca, "dolly": _dolly, "chat": _chat}


def render(ex: Example, template: str, tokenizer: Any = None) -> Rendered:
    """Apply a template by name (``alpaca``, ``dolly``, ``chat``)."""
    try:
        fn = TEMPLATES[template]
    except KeyError:
        raise LayerpruneError(f"unknown template '{template}'; choose one of {', '.join(TEMPLATES)}") from None
    return fn(ex, tokenizer)


# --------------------------------------------------------------------------------------------------- encoding


def encode(tokenizer: Any, rendered: Rendered, *, cutoff_len: int | None = 256, train_on_inputs: bool = False,
           overflow: str = "truncate") -> dict[str, list[int]] | None:
    """Tokenize one sample; returns ``input_ids``/``labels`` or None when the sample is dropped.

    Exactly the prompt tokens (including a BOS the tokenizer adds) get label -100; the response tokens and the
    EOS are trained. EOS is appended when the text does not already end in it. Longer than ``cutoff_len``:
    ``overflow="truncate"`` keeps the first ``cutoff_len`` tokens (the EOS is then cut, as in the seed),
    ``"drop"`` drops the sample. A sample left with no trained token is dropped either way.
    """
    return apply_cutoff(encode_full(tokenizer, rendered, train_on_inputs), cutoff_len, overflow)


def encode_full(tokenizer: Any, rendered: Rendered, train_on_inputs: bool = False) -> dict[str, list[int]]:
    """Ids and labels of a whole sample (EOS appended when missing), before the cutoff."""
    ids, n_prompt = _tokenize_with_boundary(tokenizer, rendered)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels}


def apply_cutoff(sample: dict[str, list[int]], cutoff_len: int | None,
                 overflow: str = "truncate") -> dict[str, list[int]] | None:
    """Truncate or drop a sample longer than ``cutoff_len``; None when dropped or left with nothing to train."""
    ids, labels = sample["input_ids"], sample["labels"]
    if cutoff_len is not None and len(ids) > cutoff_len:
        if overflow == "drop":
            return None
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    # Position 0 is never a prediction target (labels shift by one), so it does not count.
    if not any(lab != IGNORE_INDEX for lab in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def _tokenize_with_boundary(tok: Any, r: Rendered) -> tuple[list[int], int]:
    """Token ids of ``prompt + response`` and the number of leading tokens that belong to the prompt."""
    full = r.prompt + r.response
    cut = len(r.prompt)
    if getattr(tok, "is_fast", False):
        enc = tok(full, add_special_tokens=r.add_special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # The response starts at the first token that covers text at or after the boundary. Tokens the
        # post-processor adds (BOS, EOS) have empty spans: a leading BOS stays with the prompt, an EOS at the
        # end with the response. A token straddling the boundary counts as prompt.
        n_prompt = len(ids)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and start >= cut:
                n_prompt = i
                break
        return ids, n_prompt
    # Slow tokenizers have no offsets: the prompt's own encoding must be a prefix of the full encoding.
    ids = list(tok(full, add_special_tokens=r.add_special_tokens)["input_ids"])
    p_ids = list(tok(r.prompt, add_special_tokens=r.add_special_tokens)["input_ids"])
    if p_ids and tok.eos_token_id is not None and p_ids[-1] == tok.eos_token_id and ids[-1:] == p_ids[-1:]:
        p_ids = p_ids[:-1]  # a tokenizer that appends EOS puts it after the prompt as well
    if ids[:len(p_ids)] != p_ids:
        raise LayerpruneError("the prompt's tokens are not a prefix of the full sample's tokens with this (slow) "
                              "tokenizer; use a fast tokenizer")
    return ids, len(p_ids)


SAMPLE_INDEX = "sample_index"  # a batch's dataset indices, one per sample


@dataclass
class PadCollator:
    """Right-pads a list of encoded samples; labels are padded with -100, never with a token id."""

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all("index" in f for f in features):  # the teacher cache is keyed by it
            out[SAMPLE_INDEX] = torch.tensor([f["index"] for f in features])
        return out



class PackCollator:
    """Padding-free micro-batches (transformers' ``DataCollatorWithFlattening``): the samples are concatenated
    into one row ``[1, N]`` with ``position_ids`` restarting at 0 for each, which transformers turns into a
    block-diagonal causal mask, so no compute is spent on padding and no token attends across samples. The first
    label of each sample is -100, so no position predicts across a boundary.

    The all-ones ``attention_mask`` added here only lets the Trainer count tokens; the model must be called
    without it (packing is recognised from ``position_ids`` only when no mask is given): see
    :func:`model_inputs`.
    """

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_tensors="pt")

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        out = self.flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if all("index" in f for f in features):
            out[SAMPLE_INDEX] = torch.tensor([f["index"] for f in features])
        return out


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a collated batch: labels and sample indices removed, and for a packed
    batch (it has ``position_ids``) the counting-only attention mask removed too."""
    drop = {"labels", SAMPLE_INDEX} | ({"attention_mask"} if "position_ids" in batch else set())
    return {k: v for k, v in batch.items() if k not in drop}


def pad_id_for(tokenizer: Any) -> int:
    """The id used for padding *inputs* (masked out by the attention mask; never used in labels)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


class EncodedDataset(torch.utils.data.Dataset):
    """A list of encoded samples for the Trainer."""

    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        # The index lets a packed batch name its samples (the frozen-prefix cache is keyed by it).
        return {**self.rows[i], "index": i}


# ---------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Preset:
    """A named dataset: its Hub id and the local file names looked for under a data folder."""

    hub_id: str
    local: tuple[str, ...]
    format: str


PRESETS: dict[str, Preset] = {
    # Offline data folders hold about 2,000 Alpaca rows (alpaca_merged.jsonl); a full copy is preferred.
    "alpaca": Preset("yahma/alpaca-cleaned",
                     ("instruct/alpaca_cleaned.jsonl", "instruct/alpaca_cleaned.json", "instruct/alpaca_data_cleaned.json",
                      "instruct/alpaca-cleaned.jsonl", "instruct/alpaca_merged.jsonl"), "alpaca"),
    # General text (data/text.py): the local C4 sample, packed into windows, every token trained.
    "c4": Preset("allenai/c4", ("calibration/c4_demo.jsonl",), "text"),
    "dolly": Preset("databricks/databricks-dolly-15k",
                    ("instruct/databricks-dolly-15k.jsonl", "instruct/dolly-15k.jsonl", "instruct/dolly.jsonl",
                     "instruct/dolly.json"), "dolly"),
}
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a local JSON array, JSON Lines or Parquet file, or of every such file in a folder (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in _LOCAL_SUFFIXES)
        if not files:
            raise LayerpruneError(f"no .json/.jsonl/.parquet files in {p}")
        return [r for f in files for r in read_rows(f)]
    if not p.is_file():
        raise LayerpruneError(f"data file not found: {p}")
    if p.suffix == ".txt":  # plain text: a document per non-empty line
        return [{"text": line} for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl" or not text.lstrip().startswith("["):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):  # the file's own line number in the message
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LayerpruneError(f"invalid JSON on line {n} of {p}: {e.msg}") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayerpruneError(f"invalid JSON in {p}: {e.msg} (line {e.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LayerpruneError(f"{p} must hold a list of JSON objects")
    return rows


def _hub_rows(repo_id: str) -> list[dict[str, Any]]:
    if not hub_reachable():
        raise LayerpruneError(f"dataset '{repo_id}' is on the Hub, which is offline here; give a local file or "
                              "--data-dir")
    try:
        import datasets
    except ImportError:
        raise LayerpruneError("loading a Hub dataset needs the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(repo_id, split="train")
    except Exception as e:  # the datasets library raises many unrelated types for a missing or private id
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerpruneError(f"cannot load dataset '{repo_id}': {msg}") from None
    return ds.to_list()


def resolve_source(data: str, data_dir: str | os.PathLike | None = None) -> tuple[str, str | None, str]:
    """Where ``data`` comes from: ``("file", format, path)`` or ``("hub", format, repo_id)``.

    ``data`` is a preset name (``alpaca``, ``dolly``), a local file or folder, or a Hub dataset id.
    """
    if data in PRESETS:
        pre = PRESETS[data]
        folder = resolve_data_dir(data_dir)
        if folder is not None:
            for rel in pre.local:
                if (folder / rel).is_file():
                    return "file", pre.format, str(folder / rel)
            if not hub_reachable():
                raise LayerpruneError(f"no local copy of '{data}' in {folder} (looked for {', '.join(pre.local)}) "
                                      "and the Hub is offline")
        return "hub", pre.format, pre.hub_id
    p = Path(data).expanduser()
    if p.exists():
        from .text import check_not_eval_text

        check_not_eval_text(p, resolve_data_dir(data_dir))
        return "file", None, str(p)
    if data.count("/") == 1 and not data.startswith((".", "/", "~")):
        return "hub", None, data
    raise LayerpruneError(f"data not found: '{data}' is neither a preset ({', '.join(PRESETS)}), a local file, "
                          "nor a Hub id")


# --------------------------------------------------------------------------------------------------- building


@dataclass
class InstructData:
    """Encoded train and validation sets plus a description of how they were made."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]


def heldout_prompts(data: str = "alpaca", n: int = 16, *, data_dir: str | os.PathLike | None = None,
                    seed: int = 42) -> list[str]:
    """The user messages (instruction + input) of the first ``n`` validation rows, split exactly as healing
    splits them (same seed and default size), so they are never trained on."""
    kind, fmt, where = resolve_source(data, data_dir)
    rows = read_rows(where) if kind == "file" else _hub_rows(where)
    if not rows:
        raise LayerpruneError(f"no rows in {where}: no held-out prompts to generate from")
    from .text import TEXT_FORMAT, is_text_rows, text_prompts

    if fmt == TEXT_FORMAT or (fmt is None and is_text_rows(rows)):
        out = text_prompts(rows, n, seed)
        if len(out) < n:
            raise LayerpruneError(f"{where} has {len(out)} held-out documents to prompt with, {n} asked")
        return out
    fmt = fmt or detect_format(rows[0].keys())
    examples = [to_example(r, FORMATS[fmt]) for r in rows]
    kept = [e for e in examples if e.instruction.strip() and e.output.strip()]
    _, val_idx, _ = split_rows(len(kept), None, FORMAT_VAL_SIZE[fmt], seed)
    out = []
    for i in val_idx[:n]:
        e = kept[i]
        out.append(e.instruction.strip() + (f"\n\n{e.input.strip()}" if e.input.strip() else ""))
    if len(out) < n:
        raise LayerpruneError(f"{where} has {len(out)} held-out prompts, {n} asked (ask for fewer)")
    return out


def split_rows(n: int, val_size: int | float | None, default: int, seed: int) -> tuple[list[int], list[int], str]:
    """Seeded shuffle of ``range(n)`` into (train, val) indices; returns a note when the default was capped.

    ``val_size`` is a row count, a fraction in (0, 1), or None for ``default``. A default that would leave less
    than half of a small dataset for training is capped to 10% of the rows; an explicit size that does not fit
    is an error.
    """
    note = ""
    if val_size is None:
        v = default
        if v > n // 2:
            v = max(1, n // 10)
            note = f"validation size capped from {default} to {v} rows: the dataset has only {n} rows"
    elif isinstance(val_size, float) and 0 < val_size < 1:
        v = max(1, round(n * val_size))
    else:
        v = int(val_size)
    if v < 0 or v >= n:
        raise LayerpruneError(f"validation size {v} does not fit a dataset of {n} rows")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx[v:], idx[:v], note


def build_instruct_data(tokenizer: Any, data: str = "alpaca", *, data_dir: str | os.PathLike | None = None,
                        rows: list[dict[str, Any]] | None = None, template: str | None = None,
                        fields: str | dict[str, str] | None = None, cutoff_len: int = 256,
                        train_on_inputs: bool = False, overflow: str = "truncate",
                        val_size: int | float | None = None, max_train_samples: int | None = None,
                        seed: int = 42) -> InstructData:
    """Load, template, tokenize, mask and split an instruction dataset.

    Give ``data`` (preset, file, folder or Hub id) or ready ``rows``. Empty instructions or outputs are dropped
    and counted; so are samples the cutoff leaves without a trained token.
    """
    if overflow not in ("truncate", "drop"):
        raise LayerpruneError(f"overflow must be 'truncate' or 'drop', not '{overflow}'")
    if cutoff_len < 2:
        raise LayerpruneError("cutoff_len must be at least 2")
    if rows is not None:
        kind, fmt, where = "rows", None, "<in-memory rows>"
    else:
        kind, fmt, where = resolve_source(data, data_dir)
        rows = read_rows(where) if kind == "file" else _hub_rows(where)
    if not rows:
        raise LayerpruneError(f"no rows in {where}")
    from .text import TEXT_FORMAT, build_text_data, is_text_rows

    if fields is None and (fmt == TEXT_FORMAT or (fmt is None and is_text_rows(rows))):
        return InstructData(*build_text_data(tokenizer, rows, where, kind, cutoff_len=cutoff_len,
                                             val_size=val_size, max_train_samples=max_train_samples, seed=seed))
    mapping = parse_fields(fields)
    if mapping is not None:
        fmt = "custom"
    else:
        fmt = fmt or detect_format(rows[0].keys())
        mapping = FORMATS[fmt]
    template = template or FORMAT_TEMPLATE[fmt]
    if template not in TEMPLATES:
        raise LayerpruneError(f"unknown template '{template}'; choose one of {', '.join(TEMPLATES)}")
    examples = [to_example(r, mapping) for r in rows]
    kept = [e for e in examples if e.instruction.strip() and e.output.strip()]
    train_idx, val_idx, note = split_rows(len(kept), val_size, FORMAT_VAL_SIZE[fmt], seed)
    if max_train_samples is not None:
        train_idx = train_idx[:max_train_samples]

    stats = {"too_long_dropped": 0, "truncated": 0}

    def enc(indices: list[int]) -> list[dict[str, list[int]]]:
        out = []
        for i in indices:
            full = encode_full(tokenizer, render(kept[i], template, tokenizer), train_on_inputs)
            too_long = len(full["input_ids"]) > cutoff_len
            e = apply_cutoff(full, cutoff_len, overflow)
            if e is not None:
                out.append(e)
                stats["truncated"] += too_long
            else:
                # Dropped: too long under overflow=drop, or the prompt alone filled the cutoff.
                stats["too_long_dropped"] += 1
        return out

    train, val = enc(train_idx), enc(val_idx)
    if not train:
        raise LayerpruneError("no training samples left after templating and the cutoff")
    h = hashlib.sha256()
    for part in (train, val):
        h.update(json.dumps([[r["input_ids"], r["labels"]] for r in part], separators=(",", ":")).encode())
    info = {
        "source": where, "source_kind": kind, "format": fmt, "fields": mapping, "template": template,
        "rows": len(rows), "empty_dropped": len(examples) - len(kept), "train_rows": len(train),
        "val_rows": len(val), "cutoff_len": cutoff_len, "overflow": overflow, "train_on_inputs": train_on_inputs,
        "split_seed": seed, "train_tokens": sum(len(r["input_ids"]) for r in train),
        "trained_tokens": sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in train),
        "fingerprint": h.hexdigest()[:16], **stats,
    }
    if note:
        info["note"] = note
    return InstructData(train, val, info)


__all__ = ["FORMATS", "IGNORE_INDEX", "PRESETS", "SAMPLE_INDEX", "TEMPLATES", "EncodedDataset", "Example",
           "InstructData", "PackCollator", "PadCollator", "Preset", "Rendered", "apply_cutoff", "build_instruct_data",
           "detect_format", "encode", "encode_full", "model_inputs", "pad_id_for", "parse_fields", "read_rows",
           "render", "resolve_source", "split_rows", "to_example"]
