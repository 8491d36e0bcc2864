"""Text generation: greedy equals model.generate, sampling is seeded, chat template and eos from the tokenizer."""

from __future__ import annotations

import pytest
import torch

from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.generate import build_prompt, generate, generate_text, stop_token_ids

from conftest import make_tiny, tiny_tokenizer

PROMPT = "w1 w2 w3 a b"


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama"), tiny_tokenizer()


def test_greedy_deterministic_and_equal_to_generate(tiny):
    model, tok = tiny
    a = generate_text(model, tok, PROMPT, max_new_tokens=12)
    assert a == generate_text(model, tok, PROMPT, max_new_tokens=12)
    enc = tok(PROMPT, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=stop_token_ids(tok, model),
                         pad_token_id=tok.pad_token_id)
    assert a == tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert a  # the tiny random model emits some words
    assert stop_token_ids(tok, model) == [tok.eos_token_id, tok.pad_token_id]  # from the tokenizer, not constants


def test_sampling_is_seeded_and_leaves_global_rng(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=1.0)
    s1 = generate_text(model, tok, PROMPT, seed=1, **kw)
    assert torch.equal(state, torch.random.get_rng_state())
    assert s1 == generate_text(model, tok, PROMPT, seed=1, **kw)
    others = {generate_text(model, tok, PROMPT, seed=s, **kw) for s in range(2, 6)}
    assert others - {s1}  # a different seed gives a different sample
    with pytest.raises(LayerpruneError):
        generate_text(model, tok, PROMPT, do_sample=True, temperature=0)
    with pytest.raises(LayerpruneError):
        generate_text(model, tok, PROMPT, max_new_tokens=0)


def test_no_template_tokenizer(tiny):
    _, tok = tiny
    assert build_prompt(tok, PROMPT) == (PROMPT, False)
    with pytest.raises(LayerpruneError, match="chat template"):
        build_prompt(tok, PROMPT, chat=True)


@pytest.mark.smollm2
def test_smollm2_chat_template_and_eos(smollm2_path):
    from layerprune.models import load

    model, tok = load(smollm2_path, dtype="float32")
    g = generate(model, tok, "What is the capital of France?", max_new_tokens=48)
    assert g.chat and g.prompt_text.startswith("<|im_start|>") and g.prompt_text.endswith("<|im_start|>assistant\n")
    assert g.stopped and g.new_tokens < 48  # stopped on <|im_end|>, the tokenizer's eos
    assert "Paris" in g.text and "<|im_end|>" not in g.text
    raw = generate(model, tok, "The capital of France is", max_new_tokens=5, chat=False)
    assert not raw.chat and raw.prompt_text == "The capital of France is"


def test_cli_generate_and_compare(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tiny("llama", seed=0).save_pretrained(a)
    make_tiny("llama", seed=1).save_pretrained(b)
    for d in (a, b):
        tiny_tokenizer().save_pretrained(d)
    assert main(["generate", str(a), "--prompt", PROMPT, "--max-new-tokens", "6"]) == 0
    single = capsys.readouterr().out.strip()
    assert single
    assert main(["generate", str(a), "--prompt", PROMPT, "--max-new-tokens", "6", "--compare", str(b)]) == 0
    out = capsys.readouterr().out
    assert f"=== {a} " in out and f"=== {b} " in out and single in out
    assert main(["generate", str(a), "--prompt", PROMPT, "--max-new-tokens", "6", "--compare", str(b),
                 "--side-by-side"]) == 0
    side = capsys.readouterr().out
    assert " | " in side and single in side
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerprune: error:") and "\n" not in err
