"""General-text healing data: documents split whole into train and validation, packed into full windows with
every token trained; evaluation text refused; a heal runs on it."""

from __future__ import annotations

import pytest

from layerprune.data.instruct import build_instruct_data, heldout_prompts
from layerprune.errors import LayerpruneError

from conftest import FAST, save_tiny, tiny_tokenizer


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(" ".join(f"w{(i * 13 + j) % 100}" for j in range(30 + i % 7)) for i in range(40)))
    return p


def test_text_source_is_packed_and_split_by_document(text_file):
    tok = tiny_tokenizer()
    d = build_instruct_data(tok, str(text_file), cutoff_len=16, val_size=4)
    assert d.info["format"] == "text" and d.info["val_rows"] == 4 and d.info["val_documents"] >= 1
    assert d.info["train_documents"] + d.info["val_documents"] == 40
    assert all(len(r["input_ids"]) == 16 and r["labels"] == r["input_ids"] for r in d.train + d.val)
    windows_all = build_instruct_data(tok, str(text_file), cutoff_len=16, val_size=4).train
    assert windows_all == d.train  # deterministic
    # The prompts come from validation documents: none of their tokens open a training window.
    prompts = heldout_prompts(str(text_file), 1, data_dir=None)
    first = tok(prompts[0])["input_ids"][1:6]
    assert not any(r["input_ids"][1:6] == first for r in d.train)


def test_evaluation_text_is_refused(tmp_path):
    data = tmp_path / "data"
    f = data / "ppl" / "wikitext2" / "test.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text('{"text": "a b c"}\n')
    with pytest.raises(LayerpruneError, match="evaluation text"):
        build_instruct_data(tiny_tokenizer(), str(f), data_dir=str(data))
    named = tmp_path / "test.jsonl"
    named.write_text('{"text": "a b c"}\n')
    with pytest.raises(LayerpruneError, match="evaluation split"):
        build_instruct_data(tiny_tokenizer(), str(named))


def test_heal_on_general_text(tmp_path, text_file):
    from layerprune.healing import heal

    src = save_tiny(tmp_path / "m")
    r = heal(str(src), tmp_path / "h", data=str(text_file), **{**FAST, "cutoff_len": 16})
    assert r["steps"] == FAST["max_steps"] and r["data"]["format"] == "text"


def test_self_generated_data_is_sampled_once_and_reused(tmp_path, smollm2_path, data_dir):
    """``--data self:N``: N teacher-sampled texts from C4 openings, written once, read as general text."""
    import json

    from layerprune.healing import heal
    from layerprune.prune import prune_checkpoint

    from conftest import save_tiny_smol

    src = save_tiny_smol(tmp_path / "src", smollm2_path)
    prune_checkpoint(str(src), tmp_path / "pruned", tail=2)
    opts = dict(FAST, method="distill", data="self:6", cutoff_len=24, val_size=1, data_dir=str(data_dir))
    a = heal(tmp_path / "pruned", tmp_path / "a", **opts)
    gen = a["data"]["self_generated"]
    assert gen["hit"] is False and gen["n"] == 6 and a["data"]["format"] == "text"
    rows = [json.loads(x) for x in open(gen["file"])]
    assert len(rows) == 6 and all(r["text"] for r in rows)
    b = heal(tmp_path / "pruned", tmp_path / "b", **opts)
    assert b["data"]["self_generated"]["hit"] is True and b["data_fingerprint"] == a["data_fingerprint"]
    assert b["teacher_cache"]["hit"] is True  # same teacher, same data: the teacher is not run again


@pytest.mark.parametrize("bad", ["self:0", "self:x", "self:", "self:-3"])
def test_malformed_self_count_refused(bad):
    from layerprune.healing import HealConfig

    with pytest.raises(LayerpruneError, match="self:N"):
        HealConfig(data=bad).validate()
