"""Token perplexity with a protocol card.

Published perplexities differ mostly by protocol (window length, BOS handling, joining of rows, split), not
by model: Llama-2-7B on WikiText-2 test reads 12.19 (128-token windows, BOS at the start only), 13.29 (BOS
in every window), 5.47 (2048-token windows) or ~8.7 (lm-eval word perplexity). Every number produced here
therefore carries a *card* saying exactly how it was measured.

Protocol (all presets): the rows of the split are joined with ``join`` and tokenized once; the token stream is
cut into windows of ``seq_len`` model inputs starting every ``stride`` tokens; an incomplete last window is
dropped (as the seed and GPTQ do). Each window scores the tokens no earlier window scored; the NLL of every
scored token is summed and ``ppl = exp(total NLL / scored tokens)``.

BOS policies: ``start`` -- one BOS before the whole text (the seed / LLM-Pruner protocol); ``always`` -- every
window starts with BOS followed by ``seq_len - 1`` text tokens; ``never``; ``auto`` -- ``always`` for models
that are known to need it (Gemma family: 649.7 vs 21.1 on Gemma-2B), else ``start``. Tokenizers without a
BOS token get none (the card says so).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LayerpruneError

BOS_POLICIES = ("auto", "start", "always", "never")


@dataclass(frozen=True)
class Protocol:
    """How a perplexity is measured. ``stride=None`` means non-overlapping (``stride = window text length``)."""

    name: str
    seq_len: int
    stride: int | None = None
    bos: str = "start"
    # Row separator per dataset ("*" = default); GPTQ joins PTB sentences with a space, the seed with "\n\n".
    join: tuple[tuple[str, str], ...] = (("*", "\n\n"),)
    # Split per dataset ("*" = default); the seed's code evaluates PTB on validation (calling it "test").
    split: tuple[tuple[str, str], ...] = (("*", "test"),)

    def join_for(self, dataset: str) -> str:
        d = dict(self.join)
        return d.get(dataset, d.get("*", "\n\n"))

    def split_for(self, dataset: str) -> str:
        d = dict(self.split)
        return d.get(dataset, d.get("*", "test"))


PRESETS: dict[str, Protocol] = {
    # The seed (and LLM-Pruner, Shortened LLaMA): 128-token non-overlapping windows, BOS once at the start.
    "seed": Protocol("seed", 128, None, "start", (("*", "\n\n"),), (("*", "test"), ("ptb", "validation"))),
    # GPTQ / SparseGPT / SliceGPT / SLEB: 2048-token non-overlapping windows; PTB sentences joined by spaces.
    "gptq": Protocol("gptq", 2048, None, "start", (("*", "\n\n"), ("ptb", " ")), (("*", "test"),)),
}


@dataclass(frozen=True)
class DatasetSource:
    """A named perplexity corpus: local file pattern (relative to the data folder) and the Hub equivalent."""

    name: str
    local: str               # e.g. "ppl/wikitext2/{split}.jsonl"
    field: str
    hub_path: str
    hub_name: str | None


DATASETS: dict[str, DatasetSource] = {
    "wikitext2": DatasetSource("wikitext2", "ppl/wikitext2/{split}.jsonl", "text", "wikitext", "wikitext-2-raw-v1"),
    # The script-free (parquet) copy: datasets >= 4 no longer runs the old ptb_text_only loading script.
    "ptb": DatasetSource("ptb", "ppl/ptb/{split}.jsonl", "sentence", "ptb-text-only/ptb_text_only", "penn_treebank"),
}


def resolve_protocol(preset: str | Protocol = "seed", *, seq_len: int | None = None, stride: int | None = None,
                     bos: str | None = None) -> Protocol:
    """A preset with optional overrides (an override renames it '<preset>+custom' so cards never lie)."""
    if isinstance(preset, Protocol):
        proto = preset
    else:
        if preset not in PRESETS:
            raise LayerpruneError(f"unknown perplexity preset '{preset}'; choose one of {', '.join(PRESETS)}")
        proto = PRESETS[preset]
    changes: dict[str, Any] = {}
    if seq_len is not None and seq_len != proto.seq_len:
        changes["seq_len"] = int(seq_len)
    if stride is not None and stride != proto.stride:
        changes["stride"] = int(stride)
    if bos is not None and bos != proto.bos:
        if bos not in BOS_POLICIES:
            raise LayerpruneError(f"--bos must be one of {', '.join(BOS_POLICIES)}")
        changes["bos"] = bos
    if changes:
        proto = replace(proto, name=f"{proto.name}+custom", **changes)
    if proto.seq_len < 2:
        raise LayerpruneError("--seqlen must be at least 2")
    return proto


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_text(dataset: str, split: str, data_dir: str | os.PathLike | None, join: str) -> tuple[str, dict[str, Any]]:
    """The joined text of ``dataset``/``split`` and where it came from.

    ``dataset`` is a known name (wikitext2, ptb) read from ``data_dir`` (or the Hub when ``data_dir`` is None),
    or a path to a ``.jsonl`` file (field ``text``, or the single string field) or a ``.txt`` file (one row per
    line).
    """
    path = Path(dataset).expanduser()
    if dataset not in DATASETS and path.suffix in (".jsonl", ".txt", ".json") and path.is_file():
        rows = _read_rows(path, None)
        return join.join(rows), {"source": "file", "path": str(path.resolve()), "file_sha256": _sha256_file(path),
                                 "rows": len(rows), "split": None}
    if dataset not in DATASETS:
        raise LayerpruneError(f"unknown perplexity dataset '{dataset}'; use {', '.join(DATASETS)} or a "
                              ".jsonl/.txt file")
    src = DATASETS[dataset]
    if data_dir is not None:
        f = Path(data_dir) / src.local.format(split=split)
        if not f.is_file():
            raise LayerpruneError(f"{dataset} {split}: local file missing: {f}")
        rows = _read_rows(f, src.field)
        return join.join(rows), {"source": "local", "path": str(f.resolve()), "file_sha256": _sha256_file(f),
                                 "rows": len(rows)}
    from ..data.presets import hub_reachable

    if not hub_reachable():
        raise LayerpruneError(f"{dataset}: no --data-dir / $LAYERPRUNE_DATA and the Hub is off (HF_HUB_OFFLINE=1)")
    import datasets

    try:
        ds = datasets.load_dataset(src.hub_path, src.hub_name, split=split)
    except Exception as e:  # noqa: BLE001 - any Hub/dataset failure is a user-facing one-liner
        raise LayerpruneError(f"cannot load {src.hub_path}/{src.hub_name} [{split}] from the Hub: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    rows = list(ds[src.field])
    return join.join(rows), {"source": "hub", "hub_id": src.hub_path, "hub_config": src.hub_name,
                             "fingerprint": getattr(ds, "_fingerprint", None), "rows": len(rows)}


def _read_rows(path: Path, field: str | None) -> list[str]:
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8").split("\n")[:-1] if path.stat().st_size else []
    rows: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LayerpruneError(f"invalid JSON on line {n} of {path}: {e.msg}") from None
            if not isinstance(obj, dict):
                raise LayerpruneError(f"line {n} of {path} is not a JSON object")
            if field is None:
                strings = [k for k, v in obj.items() if isinstance(v, str)]
                field = "text" if "text" in obj else strings[0] if len(strings) == 1 else None
                if field is None:
                    raise LayerpruneError(f"{path}: no 'text' field in the first row (fields: "
                                          f"{', '.join(sorted(obj))})")
            if field not in obj:
                raise LayerpruneError(f"line {n} of {path} has no field '{field}'")
            rows.append(obj[field])
    return rows


def resolve_bos(policy: str, model: nn.Module, tokenizer: Any) -> tuple[str, int | None]:
    """The effective BOS policy and BOS id (``never`` when the tokenizer has no BOS token)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if policy == "auto":
        from ..arch import ADAPTERS

        mtype = str(getattr(getattr(model, "config", None), "model_type", ""))
        # Adapter data; an unregistered Gemma variant (recurrent_gemma, ...) behaves like the family.
        per_window = ADAPTERS[mtype].bos_per_window if mtype in ADAPTERS else mtype.startswith("gemma")
        policy = "always" if per_window else "start"
    if bos_id is None and policy != "never":
        return "never", None
    return policy, bos_id


def windows(n_tokens: int, seq_len: int, stride: int | None, bos_per_window: bool) -> list[tuple[int, int, int]]:
    """Windows over a token stream of length ``n_tokens``: ``(start, end, first_scored)`` in stream indices.

    A window feeds ``stream[start:end]`` (after a BOS when ``bos_per_window``) and scores the stream tokens
    ``first_scored .. end-1``; every token is scored at most once and incomplete windows are dropped.
    """
    text_len = seq_len - 1 if bos_per_window else seq_len
    stride = text_len if stride is None else stride
    if stride < 1 or stride > text_len:
        raise LayerpruneError(f"--stride must be between 1 and {text_len} (the text tokens per window)")
    out: list[tuple[int, int, int]] = []
    scored_until = 0
    start = 0
    while start + text_len <= n_tokens:
        end = start + text_len
        # Without a BOS the first token of the stream/window has no prediction.
        first = max(scored_until, start if bos_per_window else start + 1)
        out.append((start, end, first))
        scored_until = end
        start += stride
    return out


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, spans: list[tuple[int, int, int]], bos_id: int | None,
               batch_size: int = 1, progress: bool = True, desc: str = "perplexity",
               per_window: list[tuple[float, int]] | None = None) -> tuple[float, int]:
    """Summed NLL and number of scored tokens over ``spans`` of the 1-D token tensor ``ids``; ``per_window``
    (if given) receives each window's (summed NLL, tokens)."""
    device = next(model.parameters()).device
    total = 0.0
    count = 0
    bar = tqdm(total=len(spans), desc=desc, unit="win", disable=not progress)
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        rows = []
        for start, end, _first in batch:
            seg = ids[start:end]
            if bos_id is not None:
                seg = torch.cat([torch.tensor([bos_id], dtype=ids.dtype), seg])
            rows.append(seg)
        inp = torch.stack(rows).to(device)
        logits = model(input_ids=inp, use_cache=False).logits.float()
        off = 1 if bos_id is not None else 0
        for r, (start, end, first) in enumerate(batch):
            # Input position p predicts input token p+1; stream token t sits at input position t-start+off.
            lo = first - start + off          # input index of the first scored token
            hi = end - start + off            # one past the last
            logp = torch.log_softmax(logits[r, lo - 1:hi - 1], dim=-1)
            tgt = inp[r, lo:hi]
            w = float(-logp.gather(-1, tgt.unsqueeze(-1)).sum())
            total += w
            count += hi - lo
            if per_window is not None:
                per_window.append((w, hi - lo))
        bar.update(len(batch))
    bar.close()
    return total, count


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def perplexity(model: nn.Module, tokenizer: Any, dataset: str = "wikitext2",
               protocol: str | Protocol = "seed", *, split: str | None = None,
               data_dir: str | os.PathLike | None = None, seq_len: int | None = None, stride: int | None = None,
               bos: str | None = None, batch_size: int = 1, max_tokens: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` on ``dataset`` under ``protocol``; returns ``{"ppl", "nll", "card"}`` and the
    standard errors ``nll_stderr`` / ``ppl_stderr`` (windows as the sampling unit, since tokens within a window
    are correlated; the delta method for the perplexity).

    ``max_tokens`` truncates the token stream (quick looks; the card records it and marks the number as
    partial). ``seq_len``/``stride``/``bos`` override the preset.
    """
    proto = resolve_protocol(protocol, seq_len=seq_len, stride=stride, bos=bos)
    split = split or proto.split_for(dataset)
    join = proto.join_for(dataset)
    text, source = load_text(dataset, split, data_dir, join)
    policy, bos_id = resolve_bos(proto.bos, model, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    stream = ([bos_id] if policy == "start" else []) + list(enc)
    full_len = len(stream)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    ids = torch.tensor(stream, dtype=torch.long)
    spans = windows(len(ids), proto.seq_len, proto.stride, policy == "always")
    if not spans:
        raise LayerpruneError(f"{dataset} {split}: {len(ids)} tokens, fewer than one {proto.seq_len}-token window")
    per_window: list[tuple[float, int]] = []
    nll, count = window_nll(model, ids, spans, bos_id if policy == "always" else None, batch_size, progress,
                            desc=f"ppl {dataset}/{split}", per_window=per_window)
    nll_se = _ratio_stderr(per_window)
    dtype = next(model.parameters()).dtype
    card = {
        "dataset": dataset, "split": split, **source,  # a plain file has no split (source sets it to None)
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "text_chars": len(text), "join": join,
        "preset": proto.name, "seq_len": proto.seq_len,
        "stride": proto.stride if proto.stride is not None else (proto.seq_len - (policy == "always")),
        "overlapping": proto.stride is not None and proto.stride < proto.seq_len - (policy == "always"),
        "bos_policy": proto.bos, "bos_resolved": policy, "bos_token_id": bos_id,
        "bos_token": getattr(tokenizer, "bos_token", None),
        "dtype": str(dtype).replace("torch.", ""), "tokenizer": tokenizer_name(tokenizer),
        "tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
        "stream_tokens": full_len, "windows": len(spans), "tokens_scored": count,
        "remainder_dropped": len(ids) - spans[-1][1],
        "max_tokens": max_tokens, "partial": max_tokens is not None and max_tokens < full_len,
        "model_type": str(getattr(getattr(model, "config", None), "model_type", "")),
    }
    ppl = math.exp(nll / count)
    return {"ppl": ppl, "nll": nll / count, "nll_stderr": nll_se, "ppl_stderr": ppl * nll_se, "card": card}


def _ratio_stderr(per_window: list[tuple[float, int]]) -> float:
    """Standard error of the token-mean NLL sum(w)/sum(n) over windows (the ratio estimator's linearisation);
    0 for a single window."""
    n = len(per_window)
    if n < 2:
        return 0.0
    total = sum(w for w, _ in per_window)
    tokens = sum(c for _, c in per_window)
    mean = total / tokens
    resid = [(w - mean * c) for w, c in per_window]
    var = sum(r * r for r in resid) / (n - 1)
    return math.sqrt(var * n) / tokens


# ---------------------------------------------------------------------------------------------------------------
# Calibration split guard

_SPLIT_STEMS = {"train": "train", "validation": "validation", "valid": "validation", "test": "test"}


def _calibration_entries(obj: Any, under_calib: bool = False) -> Iterable[tuple[str, str | None]]:
    """(dataset, split) pairs found anywhere under keys that mention calibration."""
    if isinstance(obj, dict):
        if under_calib:
            ds = next((obj[k] for k in ("dataset", "source", "data", "name") if isinstance(obj.get(k), str)), None)
            if ds is not None:
                split = obj.get("split") if isinstance(obj.get("split"), str) else None
                yield _norm_ds(ds), split or _split_from_path(ds)
            if isinstance(obj.get("path"), str):  # a local file records where it came from
                yield _norm_ds(obj["path"]), _split_from_path(obj["path"])
        for k, v in obj.items():
            yield from _calibration_entries(v, under_calib or "calib" in str(k).lower())
    elif isinstance(obj, list):
        for v in obj:
            yield from _calibration_entries(v, under_calib)
    elif isinstance(obj, str) and under_calib:
        if ":" in obj and not obj.startswith(("/", ".")):
            ds, sp = obj.split(":", 1)
            yield _norm_ds(ds), sp
        else:
            yield _norm_ds(obj), _split_from_path(obj)


def _split_from_path(name: str) -> str | None:
    """'…/wikitext2/test.jsonl' -> 'test', 'valid.tokens.txt' -> 'validation'; None for a plain name."""
    if "/" not in name and "." not in name:
        return None
    return _SPLIT_STEMS.get(Path(name).name.split(".")[0].lower())


def _norm_ds(name: str) -> str:
    """Dataset family of a name or path: 'wikitext2', 'ptb', else the name itself."""
    low = name.lower().replace("-", "").replace("_", "")
    if "wikitext" in low:
        return "wikitext2"
    if "ptb" in low or "penntreebank" in low:
        return "ptb"
    return name


def calibration_splits(*folders: str | os.PathLike | None) -> set[tuple[str, str | None]]:
    """Calibration (dataset, split) pairs recorded in the JSON files of ``folders`` and their subfolders
    (``layerprune.json`` manifests, a run's ``score/scores.json`` ...)."""
    found: set[tuple[str, str | None]] = set()
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for f in sorted([*Path(folder).glob("*.json"), *Path(folder).glob("*/*.json")]):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            found.update(_calibration_entries(data))
    return found


def check_not_calibration(dataset: str, split: str, *folders: str | os.PathLike | None,
                          force: bool = False) -> bool:
    """Refuse perplexity on a split this run calibrated on (unless ``force``); returns whether it overlaps.

    A recorded calibration without a split counts as the dataset's train split (the usual calibration source).
    """
    ds = _norm_ds(dataset)
    overlap = any(d == ds and (s or "train") == split for d, s in calibration_splits(*folders))
    if overlap and not force:
        raise LayerpruneError(f"{dataset} [{split}] was used for calibration in this run; perplexity on it would "
                              "be optimistic (use another split, or --force to report it anyway)")
    return overlap
