"""Generative evaluation: gsm8k offline through lm-eval's own task (generate_until, answer extraction, exact
match), greedy generation agreement with the dense model, and both in a recipe's report."""

from __future__ import annotations

import json

import pytest

from layerprune.cli import main

from conftest import save_tiny_smol


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory, smollm2_path):
    """A tiny random llama with the real SmolLM2 tokenizer and room for gsm8k's 256 generated tokens."""
    return save_tiny_smol(tmp_path_factory.mktemp("gen") / "m", smollm2_path, max_position_embeddings=1024)


def test_gsm8k_offline(tiny_long, data_dir):
    from layerprune.evaluation import evaluate
    from layerprune.models import load

    model, tok = load(str(tiny_long))
    s = evaluate(model, tok, ["gsm8k"], limit=2, data_dir=data_dir, batch_size=2)
    row = s["tasks"]["gsm8k"]
    assert row["kind"] == "generative" and row["n"] == 2
    assert 0.0 <= row["exact_match"] <= 1.0 and 0.0 <= row["exact_match_flexible"] <= 1.0
    assert s["mean_acc"] is None  # not mixed into the multiple-choice Avg Acc
    assert s["lm_eval"]["results"]["gsm8k"]  # lm-eval's own task ran


def test_generation_agreement(tiny_long, data_dir):
    from layerprune.data.instruct import heldout_prompts
    from layerprune.evaluation.agreement import generation_agreement
    from layerprune.models import load
    from layerprune.prune import prune_layers

    model, tok = load(str(tiny_long))
    prompts = heldout_prompts("alpaca", 3, data_dir=data_dir)
    assert len(prompts) == 3 and all(p.strip() for p in prompts)
    same = generation_agreement(model, model, tok, prompts, new_tokens=8, progress=False)
    assert same["exact_match"] == 1.0 and same["rouge_l"] == pytest.approx(1.0)
    assert same["mean_common_prefix_tokens"] == 8
    other, _ = load(str(tiny_long))
    prune_layers(other, [1, 2, 3])
    diff = generation_agreement(other, model, tok, prompts, new_tokens=8, progress=False)
    assert diff["mean_common_prefix_tokens"] < 8 and len(diff["samples"]) == 3
    # A memo of the teacher's continuations: filled once, then read (a wrecked teacher is never run again).
    memo: dict = {}
    first = generation_agreement(other, model, tok, prompts, new_tokens=8, progress=False, memo=memo)
    assert len(memo) == 3 and first == diff
    wrecked, _ = load(str(tiny_long))
    prune_layers(wrecked, [0, 1, 2, 3, 4])
    again = generation_agreement(other, wrecked, tok, prompts, new_tokens=8, progress=False, memo=memo)
    assert again == diff


def test_compare_generate_cli(tiny_long, data_dir, tmp_path, capsys):
    assert main(["prune", str(tiny_long), "--remove", "2", "--out", str(tmp_path / "p")]) == 0
    out = tmp_path / "c"
    assert main(["compare", str(tmp_path / "p"), "--teacher", str(tiny_long), "--data-dir", str(data_dir),
                 "--max-tokens", "256", "--generate", "2", "--gen-tokens", "6", "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["generation"]["prompts"] == 2 and "ROUGE-L" in (out / "compare.md").read_text()


def test_recipe_generative_section(tiny_long, data_dir, tmp_path, monkeypatch):
    from layerprune.recipe import run_recipe

    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = {"model": str(tiny_long), "prune": {"metric": "reverse", "num_layers": 2}, "heal": {"method": "none"},
         "evaluate": {"models": ["dense", "pruned"], "tasks": [], "ppl": [],
                      "generative": {"tasks": ["gsm8k"], "limit": 1, "agreement": 2, "new_tokens": 6}},
         "measure": {"enabled": False}}
    m = run_recipe(r, tmp_path / "run", log=lambda s: None)
    assert "gsm8k" in m["results"]["pruned"]["generative"] and "generation" in m["results"]["pruned"]
    assert "generation" not in m["results"]["dense"]  # agreement is against the dense model
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Generative evaluation" in report and "Generation agreement" in report
