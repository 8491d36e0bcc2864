"""Calibration data for layer scoring: n random windows of ``seqlen`` tokens from a text source, seeded.

Sources (``CalibSpec.source``):

* a local file or folder: ``.jsonl``/``.json`` (rows of objects; ``field`` selects the text, default ``text``
  else the first string field), ``.txt`` (one document per non-empty line) or ``.parquet``; a folder uses
  every such file inside it, sorted by name;
* a named preset: ``c4``, ``wikitext2``, ``ptb``, ``bookcorpus``. With a data folder (``--data-dir`` or
  ``$LAYERPRUNE_DATA``, laid out like ``shared/data``) presets resolve to its files, else to the Hub;
* any other string is a Hugging Face dataset id (only when the Hub is reachable).

Sampling follows the seed's ``get_examples``: draw an unused random document until one tokenizes to at least
``seqlen`` tokens (tokenizer's special tokens included), then take a random window of it. Sources made of
short rows (WikiText, PTB) use the ``stream`` mode instead: all rows joined and tokenized once, random
windows from the stream (the GPTQ/Wanda loaders do the same). The calibration split defaults to ``train``; a
dataset's evaluation split is refused unless ``allow_eval_overlap`` (selecting layers on the split that is
later reported is a known trap).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LayerpruneError
from .presets import hub_reachable, resolve_data_dir

DEFAULT_SOURCE = "c4"
TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
# File stems that name an evaluation split: a local file called like this is refused as calibration data
# unless allow_eval_overlap (e.g. ppl/wikitext2/test.jsonl, test.tokens.txt).
EVAL_STEMS = ("test", "test.tokens")


@dataclass(frozen=True)
class Preset:
    """Where a named calibration dataset lives, on the Hub and in a local data folder."""

    hub_path: str
    hub_name: str | None
    field: str
    mode: str  # "documents" (seed-style) or "stream" (join rows, random windows)
    eval_splits: tuple[str, ...]  # splits the evaluation stages report on
    local: dict[str, str]  # split -> file relative to the data folder
    joiner: str = "\n\n"
    hub_data_files: dict[str, str] | None = None
    note: str = ""


PRESETS: dict[str, Preset] = {
    "c4": Preset("allenai/c4", None, "text", "documents", ("validation",),
                 {"train": "calibration/c4_demo.jsonl"},
                 hub_data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                                 "validation": "en/c4-validation.00000-of-00008.json.gz"},
                 note="offline: the 300-document C4 sample calibration/c4_demo.jsonl"),
    "wikitext2": Preset("wikitext", "wikitext-2-raw-v1", "text", "stream", ("test",),
                        {"test": "ppl/wikitext2/test.jsonl"},
                        note="no WikiText-2 train split offline"),
    "ptb": Preset("ptb-text-only/ptb_text_only", "penn_treebank", "sentence", "stream", ("test",),
                  {"validation": "ppl/ptb/validation.jsonl", "test": "ppl/ptb/test.jsonl"}, joiner=" ",
                  note="no PTB train split offline"),
    "bookcorpus": Preset("bookcorpus/bookcorpus", None, "text", "documents", (), {},
                         note="BookCorpus is not available offline"),
}


@dataclass(frozen=True)
class CalibSpec:
    """What calibration data to draw. ``source`` is a preset name, a local path or a Hub dataset id."""

    source: str = DEFAULT_SOURCE
    nsamples: int = 10
    seqlen: int = 128
    seed: int = 42
    split: str | None = None  # default: train
    field: str | None = None  # default: the preset's, else "text", else the first string field
    mode: str = "auto"  # auto | documents | stream
    data_dir: str | None = None
    allow_eval_overlap: bool = False
    hub_config: str | None = None  # dataset config name for a Hub id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Calibration:
    """Token windows for scoring: ``input_ids`` and ``attention_mask`` are [n, seqlen] LongTensors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise LayerpruneError("calibration input_ids and attention_mask must both be [n, seqlen]")
        if not bool((self.attention_mask.sum(1) > 0).all()):
            raise LayerpruneError("every calibration row needs at least one non-padding token")

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def fingerprint(self) -> str:
        """Hash of the token ids and mask: equal fingerprints mean identical calibration inputs."""
        h = hashlib.sha256()
        h.update(str(tuple(self.input_ids.shape)).encode())
        h.update(self.input_ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(self.attention_mask.to(torch.int8).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Split into (input_ids, attention_mask) batches; ``None`` or 0 means one batch of everything."""
        bs = self.nsamples if not batch_size or batch_size <= 0 else int(batch_size)
        return [(self.input_ids[i:i + bs], self.attention_mask[i:i + bs]) for i in range(0, self.nsamples, bs)]

    def num_target_tokens(self) -> int:
        """Tokens that are predicted by the causal-LM loss (a valid token whose predecessor is valid)."""
        m = self.attention_mask
        return int((m[:, 1:] * m[:, :-1]).sum())

    def describe(self) -> dict[str, Any]:
        return {**self.info, "nsamples": self.nsamples, "seqlen": self.seqlen, "fingerprint": self.fingerprint}

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: list[str], seqlen: int, *, pad: bool = True,
                   info: dict[str, Any] | None = None) -> Calibration:
        """One row per text, truncated to ``seqlen``; shorter rows right-padded and masked (for tests/API)."""
        rows = [tokenizer(t, add_special_tokens=True)["input_ids"][:seqlen] for t in texts]
        if not pad and any(len(r) < seqlen for r in rows):
            raise LayerpruneError(f"a text is shorter than {seqlen} tokens")
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
        ids = torch.full((len(rows), seqlen), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), seqlen), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return cls(ids, mask, dict(info or {"source": "texts"}))


# ----------------------------------------------------------------------------------------------- loading text


def _rows_from_records(records: list[Any], field_name: str | None, where: str) -> tuple[list[str], str]:
    records = [r for r in records if r is not None]
    if not records:
        return [], field_name or "text"
    if isinstance(records[0], str):
        return [r for r in records if isinstance(r, str)], "<string rows>"
    if not isinstance(records[0], dict):
        raise LayerpruneError(f"unsupported row type {type(records[0]).__name__} in {where}")
    # Without --calib-field: "text", else the only string field; with several, guessing would calibrate on
    # the wrong text (an id field) and fail later as a confusing token-count problem.
    strings = [k for k, v in records[0].items() if isinstance(v, str)]
    name = field_name or ("text" if "text" in records[0] else strings[0] if len(strings) == 1 else None)
    if name is None or name not in records[0]:
        have = ", ".join(sorted(records[0]))
        raise LayerpruneError(f"field '{field_name or 'text'}' not found in {where} (fields: {have}); "
                              f"use --calib-field")
    return [str(r.get(name) or "") for r in records], name


def read_text_file(path: Path, field_name: str | None = None) -> tuple[list[str], str]:
    """Rows of text from one local file; returns (texts, field used). One-line errors for bad input."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()], "<lines>"
        if suffix == ".jsonl":
            recs = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            recs.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise LayerpruneError(f"invalid JSON on line {n} of {path}: {e.msg}") from None
            return _rows_from_records(recs, field_name, str(path))
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or a single record
                data = next((v for v in data.values() if isinstance(v, list)), [data])
            return _rows_from_records(list(data), field_name, str(path))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return _rows_from_records(pq.read_table(path).to_pylist(), field_name, str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise LayerpruneError(f"cannot read calibration file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise LayerpruneError(f"invalid JSON in {path}: {e.msg}") from None
    raise LayerpruneError(f"unsupported calibration file type '{suffix}' ({path}); "
                          f"use {', '.join(TEXT_SUFFIXES)}")


def _read_local(path: Path, field_name: str | None) -> tuple[list[str], dict[str, Any]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise LayerpruneError(f"no {'/'.join(TEXT_SUFFIXES)} files in calibration folder {path}")
    else:
        files = [path]
    texts: list[str] = []
    used = None
    for f in files:
        t, used = read_text_file(f, field_name)
        texts.extend(t)
    return texts, {"files": [str(f) for f in files], "field": used}


def _is_eval_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().rsplit(".", 1)[0] in EVAL_STEMS


def _read_hub(path: str, name: str | None, split: str, field_name: str | None,
              data_files: dict[str, str] | None = None) -> tuple[list[str], dict[str, Any]]:
    if not hub_reachable():
        raise LayerpruneError(f"calibration dataset '{path}' needs the Hugging Face Hub, which is offline "
                              f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); point --data-dir or $LAYERPRUNE_DATA at "
                              f"a local data folder or pass a local file")
    try:
        import datasets

        kwargs: dict[str, Any] = {"split": split}
        if data_files:
            kwargs["data_files"] = {split: data_files[split]} if split in data_files else data_files
        ds = datasets.load_dataset(path, name, **kwargs)
    except Exception as e:  # the datasets library raises many types; the user needs one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerpruneError(f"cannot load calibration dataset {path} ({split}): {msg}") from None
    texts, used = _rows_from_records(list(ds), field_name, f"{path} ({split})")
    return texts, {"hub": path, "config": name, "field": used}


def load_texts(spec: CalibSpec) -> tuple[list[str], dict[str, Any]]:
    """Resolve ``spec`` to a list of text rows plus a description of where they came from."""
    split = spec.split or "train"
    src = str(spec.source)
    local = Path(src).expanduser()
    if src.lower() in PRESETS and not local.exists():
        return _load_preset(src.lower(), spec, split)
    if local.exists():
        if _is_eval_file(local) and not spec.allow_eval_overlap:
            raise LayerpruneError(f"{local} looks like an evaluation split (file named '{local.name}'); "
                                  f"calibrating on it would select layers on the data you report; "
                                  f"pass --allow-eval-overlap to use it anyway")
        texts, info = _read_local(local, spec.field)
        return texts, {"source": src, "split": None, "mode_default": "documents", **info}
    looks_like_id = src.count("/") <= 1 and not src.startswith((".", "/", "~"))
    if not looks_like_id:
        raise LayerpruneError(f"calibration source not found: {src}")
    texts, info = _read_hub(src, spec.hub_config, split, spec.field)
    return texts, {"source": src, "split": split, "mode_default": "documents", **info}


def _load_preset(name: str, spec: CalibSpec, split: str) -> tuple[list[str], dict[str, Any]]:
    pre = PRESETS[name]
    if split in pre.eval_splits and not spec.allow_eval_overlap:
        raise LayerpruneError(f"'{split}' is the evaluation split of {name}; calibrating on it would select "
                              f"layers on the data you report; use another split or pass --allow-eval-overlap")
    field_name = spec.field or pre.field
    data_dir = resolve_data_dir(spec.data_dir)
    base = {"source": name, "split": split, "mode_default": pre.mode, "joiner": pre.joiner}
    if data_dir is not None:
        rel = pre.local.get(split)
        if rel is None:
            have = ", ".join(sorted(pre.local)) or "none"
            raise LayerpruneError(f"calibration preset '{name}': split '{split}' is not in the data folder "
                                  f"{data_dir} ({pre.note}; local splits: {have}); use --calib c4 or a file")
        path = data_dir / rel
        if not path.is_file():
            raise LayerpruneError(f"calibration preset '{name}': {path} is missing from the data folder")
        texts, used = read_text_file(path, field_name)
        return texts, {**base, "files": [str(path)], "field": used}
    texts, info = _read_hub(pre.hub_path, pre.hub_name, split, field_name, pre.hub_data_files)
    return texts, {**base, **info}


# ------------------------------------------------------------------------------------------------ sampling


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def sample_documents(tokenizer: Any, texts: list[str], nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """The seed's sampler: an unused random document with >= seqlen tokens, then a random window of it."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)  # drawing without replacement == walking a seeded permutation
    out: list[list[int]] = []
    for idx in order:
        if len(out) == nsamples:
            break
        ids = _encode(tokenizer, texts[idx])
        if len(ids) < seqlen:
            continue
        j = rng.randint(0, len(ids) - seqlen)
        out.append(ids[j:j + seqlen])
    if len(out) < nsamples:
        raise LayerpruneError(f"only {len(out)} of {len(texts)} documents have >= {seqlen} tokens, "
                              f"{nsamples} needed; lower --seqlen/--nsamples or use --calib-mode stream")
    return out


def sample_stream(tokenizer: Any, texts: list[str], nsamples: int, seqlen: int, seed: int,
                  joiner: str = "\n\n") -> list[list[int]]:
    """Join all rows, tokenize once, take ``nsamples`` random windows (GPTQ/Wanda-style loaders)."""
    ids = _encode(tokenizer, joiner.join(t for t in texts if t))
    if len(ids) < seqlen + 1:
        raise LayerpruneError(f"calibration text has only {len(ids)} tokens, fewer than --seqlen {seqlen}")
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        j = rng.randint(0, len(ids) - seqlen)
        out.append(ids[j:j + seqlen])
    return out


def build_calibration(tokenizer: Any, spec: CalibSpec | None = None, **overrides: Any) -> Calibration:
    """Load the source of ``spec`` and draw its windows; deterministic for a fixed ``seed``."""
    spec = spec or CalibSpec()
    if overrides:
        spec = CalibSpec(**{**spec.to_dict(), **overrides})
    if spec.nsamples < 1 or spec.seqlen < 2:
        raise LayerpruneError("calibration needs --nsamples >= 1 and --seqlen >= 2")
    if spec.mode not in ("auto", "documents", "stream"):
        raise LayerpruneError(f"unknown calibration mode '{spec.mode}'; use auto, documents or stream")
    texts, info = load_texts(spec)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LayerpruneError(f"calibration source {spec.source} has no text")
    mode = info.pop("mode_default") if spec.mode == "auto" else spec.mode
    info.pop("mode_default", None)
    joiner = info.pop("joiner", "\n\n")
    if mode == "documents":
        rows = sample_documents(tokenizer, texts, spec.nsamples, spec.seqlen, spec.seed)
    else:
        rows = sample_stream(tokenizer, texts, spec.nsamples, spec.seqlen, spec.seed, joiner)
    ids = torch.tensor(rows, dtype=torch.long)
    info.update(mode=mode, seed=spec.seed, documents=len(texts),
                tokenizer=getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    return Calibration(ids, torch.ones_like(ids), info)



__all__ = ["DEFAULT_SOURCE", "PRESETS", "CalibSpec", "Calibration", "Preset", "build_calibration",
           "load_texts", "read_text_file", "sample_documents", "sample_stream"]
