"""Calibration sampler: determinism, local files and folders, presets offline, eval-split refusal."""

from __future__ import annotations

import json
import random

import pytest
import torch

from layerprune.data.calibration import Calibration, CalibSpec, build_calibration, load_texts
from layerprune.errors import LayerpruneError

from conftest import tiny_tokenizer


def _doc(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(100)}" for _ in range(n))


@pytest.fixture
def corpus(tmp_path):
    """A JSONL file of 30 documents of 5..60 words (only some are long enough for seqlen 32)."""
    rng = random.Random(1)
    path = tmp_path / "docs.jsonl"
    with path.open("w") as f:
        for _ in range(30):
            f.write(json.dumps({"text": _doc(rng, rng.randrange(5, 60)), "id": 1}) + "\n")
    return path


def test_same_seed_same_windows_different_seed_differs(corpus):
    tok = tiny_tokenizer()
    a = build_calibration(tok, CalibSpec(str(corpus), nsamples=4, seqlen=32, seed=7))
    b = build_calibration(tok, CalibSpec(str(corpus), nsamples=4, seqlen=32, seed=7))
    c = build_calibration(tok, CalibSpec(str(corpus), nsamples=4, seqlen=32, seed=8))
    assert a.input_ids.shape == (4, 32)
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint
    assert bool(a.attention_mask.all())


def test_documents_mode_windows_come_from_distinct_long_documents(corpus):
    tok = tiny_tokenizer()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    encoded = [tok(t)["input_ids"] for t in texts]
    cal = build_calibration(tok, CalibSpec(str(corpus), nsamples=5, seqlen=32, seed=3, mode="documents"))
    sources = []
    for row in cal.input_ids.tolist():
        hits = [i for i, ids in enumerate(encoded)
                if len(ids) >= 32 and any(ids[j:j + 32] == row for j in range(len(ids) - 31))]
        assert hits, "every window is a slice of one document with >= seqlen tokens"
        sources.append(hits[0])
    assert len(set(sources)) == 5  # drawn without replacement


def test_too_few_long_documents_is_one_clear_error_and_stream_mode_works(corpus):
    tok = tiny_tokenizer()
    with pytest.raises(LayerpruneError, match="documents have >= 200 tokens"):
        build_calibration(tok, CalibSpec(str(corpus), nsamples=3, seqlen=200, mode="documents"))
    cal = build_calibration(tok, CalibSpec(str(corpus), nsamples=3, seqlen=200, mode="stream"))
    assert cal.input_ids.shape == (3, 200)


@pytest.mark.parametrize("suffix", ["txt", "json", "parquet"])
def test_local_file_types_and_folder(tmp_path, suffix):
    rng = random.Random(0)
    docs = [_doc(rng, 50) for _ in range(6)]
    path = tmp_path / f"data.{suffix}"
    if suffix == "txt":
        path.write_text("\n".join(docs) + "\n")
    elif suffix == "json":
        path.write_text(json.dumps([{"body": d} for d in docs]))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": docs}), path)
    field = None if suffix == "txt" else "body"
    texts, info = load_texts(CalibSpec(str(path), field=field))
    assert texts == docs
    cal = build_calibration(tiny_tokenizer(), CalibSpec(str(tmp_path), nsamples=2, seqlen=20, field=field))
    assert cal.input_ids.shape == (2, 20) and cal.info["files"] == [str(path)]


def test_missing_field_names_the_fields(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"a": 1, "b": 2}) + "\n")
    with pytest.raises(LayerpruneError, match="fields: a, b"):
        load_texts(CalibSpec(str(p)))


def test_eval_split_is_refused_unless_allowed(data_dir, tmp_path):
    with pytest.raises(LayerpruneError, match="evaluation split"):
        load_texts(CalibSpec("wikitext2", split="test", data_dir=str(data_dir)))
    with pytest.raises(LayerpruneError, match="evaluation split"):
        load_texts(CalibSpec("ptb", split="test", data_dir=str(data_dir)))
    with pytest.raises(LayerpruneError, match="evaluation split"):
        load_texts(CalibSpec(str(data_dir / "ppl/wikitext2/test.jsonl")))
    texts, info = load_texts(CalibSpec("wikitext2", split="test", data_dir=str(data_dir), allow_eval_overlap=True))
    assert len(texts) == 4358 and info["files"][0].endswith("ppl/wikitext2/test.jsonl")


def test_presets_offline(data_dir, monkeypatch):
    monkeypatch.delenv("LAYERPRUNE_DATA", raising=False)
    texts, info = load_texts(CalibSpec("c4", data_dir=str(data_dir)))
    assert len(texts) == 300 and info["files"][0].endswith("calibration/c4_demo.jsonl")
    # The train split of WikiText-2 / PTB and BookCorpus are not in the folder: one line saying so.
    for name in ("wikitext2", "ptb", "bookcorpus"):
        with pytest.raises(LayerpruneError) as e:
            load_texts(CalibSpec(name, data_dir=str(data_dir)))
        assert "split 'train' is not in the data folder" in str(e.value) and "\n" not in str(e.value)
    # PTB validation is there and uses the 'sentence' field.
    texts, info = load_texts(CalibSpec("ptb", split="validation", data_dir=str(data_dir)))
    assert len(texts) == 3370 and info["field"] == "sentence"
    # $LAYERPRUNE_DATA is used when no folder is given.
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    assert len(load_texts(CalibSpec("c4"))[0]) == 300


def test_preset_without_data_folder_needs_the_hub(monkeypatch):
    monkeypatch.delenv("LAYERPRUNE_DATA", raising=False)
    with pytest.raises(LayerpruneError, match="needs the Hugging Face Hub"):
        load_texts(CalibSpec("c4"))
    with pytest.raises(LayerpruneError, match="needs the Hugging Face Hub"):
        load_texts(CalibSpec("someone/some-dataset"))


def test_default_c4_sample_with_a_real_tokenizer(data_dir):
    tok = tiny_tokenizer()  # C4 words are mostly <unk> here, but lengths and windows are real
    cal = build_calibration(tok, CalibSpec(data_dir=str(data_dir), nsamples=10, seqlen=128))
    assert cal.input_ids.shape == (10, 128) and cal.info["mode"] == "documents"
    assert cal.num_target_tokens() == 10 * 127


def test_from_texts_pads_and_masks():
    tok = tiny_tokenizer()
    cal = Calibration.from_texts(tok, ["w1 w2 w3 w4 w5 w6", "w7 w8"], seqlen=6)
    assert cal.attention_mask.tolist()[1] == [1, 1, 0, 0, 0, 0]  # the tiny tokenizer adds no BOS
    assert cal.input_ids[1, 2:].tolist() == [tok.pad_token_id] * 4
    assert cal.num_target_tokens() == 5 + 1
    with pytest.raises(LayerpruneError):
        Calibration(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
