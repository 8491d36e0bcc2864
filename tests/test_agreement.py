"""Teacher agreement: a model against itself has KL 0 and agreement 1; a pruned one does not."""

from __future__ import annotations

import json

import pytest

from layerprune.errors import LayerpruneError
from layerprune.evaluation.agreement import choice_changes, compare
from layerprune.evaluation.perplexity import perplexity
from layerprune.prune import prune_layers

from conftest import make_tiny, tiny_tokenizer


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "held_out.txt"
    p.write_text("".join(" ".join(f"w{(i * 13 + j * 7) % 100}" for j in range(12)) + "\n" for i in range(30)))
    return str(p)


def test_self_agreement(corpus):
    model, tok = make_tiny("llama"), tiny_tokenizer()
    r = compare(model, model, tok, corpus, seq_len=16, progress=False)["text"]
    assert r["kl_teacher_pruned"] == 0.0
    assert r["top1_agreement"] == 1.0
    assert r["teacher_nll"] == r["pruned_nll"] and r["tokens"] > 100


def test_pruned_disagrees_and_nll_matches_perplexity(corpus):
    teacher, tok = make_tiny("qwen2"), tiny_tokenizer()
    pruned = make_tiny("qwen2")
    prune_layers(pruned, [1, 2, 3])
    r = compare(pruned, teacher, tok, corpus, seq_len=16, progress=False)["text"]
    assert r["kl_teacher_pruned"] > 1e-4 and 0.0 <= r["top1_agreement"] < 1.0
    ppl = perplexity(teacher, tok, corpus, "seed", seq_len=16, progress=False)
    assert r["teacher_nll"] == pytest.approx(ppl["nll"], rel=1e-6)
    assert r["tokens"] == ppl["card"]["tokens_scored"]


def test_vocab_mismatch_is_error(corpus):
    with pytest.raises(LayerpruneError, match="vocabular"):
        compare(make_tiny("llama"), make_tiny("llama", vocab_size=120), tiny_tokenizer(), corpus, seq_len=16)


def test_multiple_choice_changes(data_dir):
    teacher, tok = make_tiny("llama"), tiny_tokenizer()
    same = choice_changes(teacher, teacher, tok, ["arc_easy", "mmlu"], limit=4, data_dir=data_dir)
    assert same["arc_easy"]["changed_fraction"] == 0.0 and same["arc_easy"]["documents"] == 4
    assert same["mmlu"]["changed_fraction"] == 0.0 and same["mmlu"]["documents"] == 4
    pruned = make_tiny("llama")
    prune_layers(pruned, [0, 1, 2, 3])
    diff = choice_changes(pruned, teacher, tok, ["arc_easy"], limit=4, data_dir=data_dir)
    assert 0.0 <= diff["arc_easy"]["changed_fraction"] <= 1.0


def test_cli_compare(tmp_path, corpus, data_dir):
    from layerprune.cli import main

    teacher_dir, pruned_dir = tmp_path / "t", tmp_path / "p"
    m = make_tiny("llama")
    m.save_pretrained(teacher_dir)
    prune_layers(m, [5])
    m.save_pretrained(pruned_dir)
    for d in (teacher_dir, pruned_dir):
        tiny_tokenizer().save_pretrained(d)
    rc = main(["compare", str(pruned_dir), "--teacher", str(teacher_dir), "--data", corpus, "--seqlen", "16",
               "--tasks", "piqa", "--task-limit", "2", "--data-dir", str(data_dir), "--out", str(tmp_path / "o")])
    assert rc == 0
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert data["text"]["kl_teacher_pruned"] > 0 and data["multiple_choice"]["piqa"]["documents"] == 2
    assert data["pruned"]["num_layers"] == 5 and data["teacher"]["num_layers"] == 6
