"""Perplexity: equals a direct hand computation, complete protocol cards, BOS policies, calibration guard."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.evaluation.perplexity import (
    PRESETS,
    check_not_calibration,
    perplexity,
    resolve_bos,
    resolve_protocol,
    windows,
)

from conftest import make_tiny, tiny_tokenizer

CARD_KEYS = {"dataset", "split", "source", "file_sha256", "text_sha256", "join", "preset", "seq_len", "stride",
             "bos_policy", "bos_resolved", "bos_token_id", "dtype", "tokenizer", "tokens_scored", "windows",
             "stream_tokens", "remainder_dropped", "partial"}


@pytest.fixture
def text_file(tmp_path):
    rows = [" ".join(f"w{(7 * i + 3 * j) % 100}" for j in range(13)) for i in range(9)]
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return p, rows


def _hand_ppl(model, ids: list[int], seq_len: int, bos: int | None) -> float:
    """Non-overlapping windows of the stream; BOS (if given) before each window; mean NLL over predictions."""
    nll, n = 0.0, 0
    text_len = seq_len - (bos is not None)
    for k in range(len(ids) // text_len):
        chunk = ids[k * text_len:(k + 1) * text_len]
        inp = torch.tensor([([bos] if bos is not None else []) + chunk])
        with torch.no_grad():
            logits = model(inp).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1].float(), inp[0, 1:], reduction="sum")
        nll += float(loss)
        n += inp.shape[1] - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_seed_protocol_equals_hand_computation(arch, text_file):
    model, tok = make_tiny(arch), tiny_tokenizer()
    path, rows = text_file
    r = perplexity(model, tok, str(path), "seed", seq_len=16, bos="start", progress=False)
    # Hand: "\n\n".join, tokenize once, one BOS in front, cut into 16-token chunks, drop the remainder.
    ids = [tok.bos_token_id] + tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    assert r["ppl"] == pytest.approx(_hand_ppl(model, ids, 16, None), rel=1e-5)
    c = r["card"]
    assert CARD_KEYS <= set(c)
    assert c["windows"] == len(ids) // 16 and c["tokens_scored"] == c["windows"] * 15
    assert c["remainder_dropped"] == len(ids) % 16 and c["stream_tokens"] == len(ids)
    assert c["preset"] == "seed+custom" and c["source"] == "file" and c["dtype"] == "float32"


def test_ppl_stderr_is_the_window_level_standard_error(text_file):
    model, tok = make_tiny("llama"), tiny_tokenizer()
    path, rows = text_file
    r = perplexity(model, tok, str(path), "seed", seq_len=16, bos="start", progress=False)
    # Every window scores the same number of tokens here, so the ratio estimator's stderr is the plain
    # standard error of the per-window mean NLLs.
    ids = [tok.bos_token_id] + tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    per = []
    for k in range(len(ids) // 16):
        inp = torch.tensor([ids[k * 16:(k + 1) * 16]])
        with torch.no_grad():
            logits = model(inp).logits[0]
        per.append(float(torch.nn.functional.cross_entropy(logits[:-1], inp[0, 1:])))
    t = torch.tensor(per, dtype=torch.float64)
    assert r["nll"] == pytest.approx(float(t.mean()), rel=1e-5)
    assert r["nll_stderr"] == pytest.approx(float(t.std(unbiased=True) / math.sqrt(len(per))), rel=1e-4)
    assert r["ppl_stderr"] == pytest.approx(r["ppl"] * r["nll_stderr"], rel=1e-9) and r["nll_stderr"] > 0


def test_bos_policies_differ_as_expected(text_file):
    model, tok = make_tiny("llama"), tiny_tokenizer()
    path, rows = text_file
    text_ids = tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    res = {b: perplexity(model, tok, str(path), "seed", seq_len=16, bos=b, progress=False) for b in
           ("start", "always", "never")}
    # always: BOS + 15 text tokens per window, all 15 scored; never: 16 text tokens, 15 scored.
    assert res["always"]["card"]["windows"] == len(text_ids) // 15
    assert res["never"]["card"]["windows"] == len(text_ids) // 16
    assert res["start"]["card"]["windows"] == (len(text_ids) + 1) // 16
    assert res["always"]["ppl"] == pytest.approx(_hand_ppl(model, text_ids, 16, tok.bos_token_id), rel=1e-5)
    assert res["never"]["ppl"] == pytest.approx(_hand_ppl(model, text_ids, 16, None), rel=1e-5)
    assert len({round(r["ppl"], 6) for r in res.values()}) == 3
    assert {r["card"]["bos_resolved"] for r in res.values()} == {"start", "always", "never"}


def test_auto_bos_per_window_for_gemma_only():
    tok = tiny_tokenizer()
    assert resolve_bos("auto", make_tiny("gemma2"), tok) == ("always", tok.bos_token_id)
    assert resolve_bos("auto", make_tiny("llama"), tok) == ("start", tok.bos_token_id)
    tok_nobos = tiny_tokenizer()
    tok_nobos.bos_token = None
    assert resolve_bos("start", make_tiny("llama"), tok_nobos) == ("never", None)


def test_strided_windows_score_each_token_once():
    spans = windows(100, 16, 4, False)
    scored = [t for _s, e, f in spans for t in range(f, e)]
    assert scored == list(range(1, spans[-1][1]))  # every token after the first exactly once
    assert all(e - s == 16 for s, e, _ in spans)
    with pytest.raises(LayerpruneError, match="stride"):
        windows(100, 16, 17, False)


def test_local_wikitext_and_ptb_cards(data_dir):
    model, tok = make_tiny("llama"), tiny_tokenizer()
    w = perplexity(model, tok, "wikitext2", "seed", data_dir=data_dir, max_tokens=600, progress=False)
    c = w["card"]
    assert c["split"] == "test" and c["path"].endswith("ppl/wikitext2/test.jsonl") and c["partial"]
    assert c["seq_len"] == 128 and c["stride"] == 128 and c["join"] == "\n\n" and c["rows"] == 4358
    assert c["text_chars"] == 1_294_336  # the README's figure for "\n\n".join(test["text"])
    p = perplexity(model, tok, "ptb", "gptq", data_dir=data_dir, seq_len=64, max_tokens=300, progress=False)
    assert p["card"]["join"] == " " and p["card"]["split"] == "test" and p["card"]["preset"] == "gptq+custom"
    assert perplexity(model, tok, "ptb", "seed", data_dir=data_dir, max_tokens=300,
                      progress=False)["card"]["split"] == "validation"  # the seed's code path
    with pytest.raises(LayerpruneError, match="local file missing"):
        perplexity(model, tok, "ptb", "seed", split="train", data_dir=data_dir, progress=False)


def test_presets():
    assert PRESETS["seed"].seq_len == 128 and PRESETS["gptq"].seq_len == 2048
    assert resolve_protocol("gptq").name == "gptq"
    assert resolve_protocol("seed", seq_len=128).name == "seed"  # no real override, no renaming
    with pytest.raises(LayerpruneError):
        resolve_protocol("nope")


def test_refuses_calibration_split(tmp_path):
    (tmp_path / "layerprune.json").write_text(json.dumps(
        {"method": "bi", "method_params": {"calibration": {"dataset": "wikitext2", "split": "test", "n": 32}}}))
    with pytest.raises(LayerpruneError, match="calibration"):
        check_not_calibration("wikitext2", "test", tmp_path)
    assert check_not_calibration("wikitext2", "test", tmp_path, force=True) is True
    assert check_not_calibration("ptb", "test", tmp_path) is False
    assert check_not_calibration("wikitext2", "validation", tmp_path) is False
    (tmp_path / "run.json").write_text(json.dumps({"calibration_data": "ptb:validation"}))
    with pytest.raises(LayerpruneError):
        check_not_calibration("ptb", "validation", tmp_path)


def test_cli_ppl(tmp_path, capsys):
    from layerprune.cli import main

    model_dir = tmp_path / "m"
    make_tiny("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(" ".join(f"w{i * j % 50}" for j in range(10)) + "\n" for i in range(20)))
    out = tmp_path / "out"
    assert main(["ppl", str(model_dir), "--data", str(corpus), "--seqlen", "16", "--out", str(out)]) == 0
    data = json.loads((out / "ppl.json").read_text())
    assert data["results"][0]["ppl"] > 1 and data["results"][0]["card"]["seq_len"] == 16
    # A calibration record without a split means the train split.
    (model_dir / "layerprune.json").write_text(json.dumps({"calibration": {"dataset": "wikitext2"}}))
    capsys.readouterr()
    assert main(["ppl", str(model_dir), "--data", "wikitext2", "--split", "train"]) == 2
    assert "used for calibration" in capsys.readouterr().err


def test_calibration_records_of_the_score_stage(tmp_path):
    """The score stage's scores.json (in a run subfolder) records {"source", "split"} or a local path."""
    (tmp_path / "score").mkdir()
    (tmp_path / "score" / "scores.json").write_text(json.dumps(
        {"metrics": {}, "calibration": {"source": "wikitext2", "split": "train", "mode_default": "documents"}}))
    with pytest.raises(LayerpruneError):
        check_not_calibration("wikitext2", "train", tmp_path)
    assert check_not_calibration("wikitext2", "test", tmp_path) is False
    (tmp_path / "score" / "scores.json").write_text(json.dumps(
        {"calibration": {"source": "/data/ppl/wikitext2/test.jsonl", "split": None}}))
    with pytest.raises(LayerpruneError):
        check_not_calibration("wikitext2", "test", tmp_path)
    (tmp_path / "score" / "scores.json").write_text(json.dumps({"calibration": {"source": "c4", "split": "train"}}))
    assert check_not_calibration("wikitext2", "train", tmp_path) is False
