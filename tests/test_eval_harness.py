"""lm-eval in process on tiny models, offline: hand-made sample and a few rows of each of the eight tasks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from layerprune.errors import LayerpruneError
from layerprune.evaluation.harness import _spread, evaluate, markdown_table, predictions
from layerprune.evaluation.tasks import SUITE

from conftest import make_tiny, tiny_tokenizer

# Hand-made rows in the schemas of the Hugging Face datasets the built-in tasks read.
HAND = {
    "eval/piqa/validation.jsonl": [
        {"goal": "w1 w2 w3", "sol1": "a b c", "sol2": "d e f", "label": 0},
        {"goal": "w4 w5", "sol1": "w6 w7", "sol2": "w8", "label": 1},
        {"goal": "w9", "sol1": "a", "sol2": "b", "label": 1},
    ],
    "eval/arc_easy/test.jsonl": [
        {"id": "x0", "question": "w1 w2 ?", "choices": {"text": ["a", "b c", "d", "e"], "label": list("ABCD")},
         "answerKey": "B"},
        {"id": "x1", "question": "w3 w4", "choices": {"text": ["w5", "w6", "w7"], "label": ["1", "2", "3"]},
         "answerKey": "3"},
    ],
    "eval/arc_challenge/test.jsonl": [
        {"id": "y0", "question": "w9 w8", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
    ],
    "eval/openbookqa/test.jsonl": [
        {"id": "o0", "question_stem": "w1 w1", "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")},
         "answerKey": "D"},
        {"id": "o1", "question_stem": "w2", "choices": {"text": ["e", "f", "g", "h"], "label": list("ABCD")},
         "answerKey": "A"},
    ],
    "eval/winogrande/validation.jsonl": [
        {"sentence": "w1 w2 _ w3 w4 .", "option1": "a", "option2": "b", "answer": "2"},
        {"sentence": "w5 _ w6", "option1": "c d", "option2": "e", "answer": "1"},
    ],
    "eval/hellaswag/validation.jsonl": [
        {"ind": 0, "activity_label": "w1", "ctx_a": "w2 w3", "ctx_b": "w4", "ctx": "w2 w3 w4",
         "endings": ["a", "b", "c", "d"], "source_id": "", "split": "val", "split_type": "", "label": "2"},
        {"ind": 1, "activity_label": "w5", "ctx_a": "w6 [title] w7", "ctx_b": "", "ctx": "w6",
         "endings": ["e f", "g", "h", "i"], "source_id": "", "split": "val", "split_type": "", "label": "0"},
    ],
}
HAND_TASKS = ["piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "hellaswag"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny("llama"), tiny_tokenizer()


def _check_summary(s: dict, names: list[str]) -> None:
    assert list(s["tasks"]) == names
    accs = []
    for name, row in s["tasks"].items():
        for m in ("acc", "acc_norm"):
            if m in row:
                assert 0.0 <= row[m] <= 1.0, (name, m, row[m])
        accs.append(row["acc"])
    assert s["mean_acc"] == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    assert s["mean_acc_over"] == names
    json.dumps(s)  # serialisable as eval.json


def test_hand_made_sample_offline(tmp_path, tiny_llama, no_network):
    for rel, rows in HAND.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model, tok = tiny_llama
    s = evaluate(model, tok, HAND_TASKS, data_dir=tmp_path, batch_size=4, log_samples=True)
    _check_summary(s, HAND_TASKS)
    for name in HAND_TASKS:
        assert s["tasks"][name]["n"] == len(HAND[SPEC_FILE[name]])
    # acc where lm-eval defines only acc (winogrande), acc_norm where it has it.
    assert "acc_norm" not in s["tasks"]["winogrande"] and "acc_norm" in s["tasks"]["piqa"]
    assert s["config"]["data"] == "local" and s["config"]["data_files"]["piqa"]["sha256"]
    # Per-document picks agree with lm-eval's own per-document acc (winogrande's target is a string: the
    # shared continuation, its choices are the contexts).
    picks = predictions(s)
    for name in HAND_TASKS:
        docs = s["samples"][name]
        assert sum(d["acc"] for d in docs) / len(docs) == pytest.approx(s["tasks"][name]["acc"])
        if name != "winogrande":
            assert all((picks[name][d["doc_id"]]["acc"] == int(d["target"])) == bool(d["acc"]) for d in docs)
            assert all((picks[name][d["doc_id"]]["acc_norm"] == int(d["target"])) == bool(d["acc_norm"])
                       for d in docs)
    md = markdown_table(s)
    assert "Avg Acc" in md and "| piqa |" in md


SPEC_FILE = {
    "piqa": "eval/piqa/validation.jsonl", "arc_easy": "eval/arc_easy/test.jsonl",
    "arc_challenge": "eval/arc_challenge/test.jsonl", "openbookqa": "eval/openbookqa/test.jsonl",
    "winogrande": "eval/winogrande/validation.jsonl", "hellaswag": "eval/hellaswag/validation.jsonl",
}


def test_eight_tasks_few_rows_offline(tiny_llama, data_dir, no_network):
    model, tok = tiny_llama
    s = evaluate(model, tok, None, data_dir=data_dir, limit=3, batch_size=8)
    names = list(SUITE)
    _check_summary(s, names)
    for name in names:
        assert s["tasks"][name]["n"] == 3
    assert s["tasks"]["mmlu"]["kind"] == "group" and s["tasks"]["cmmlu"]["kind"] == "group"
    assert s["tasks"]["mmlu"]["subtasks"] == 3  # 3 documents spread over 3 of the 57 subjects
    assert "acc_norm" in s["tasks"]["cmmlu"]      # the CMMLU group aggregates acc_norm too
    assert s["config"]["limit_semantics"].startswith("per requested task")


def test_per_task_limits_override_the_limit(tiny_llama, data_dir, no_network):
    """The study's budget: 2 documents per task, but MMLU 5 (spread over its subjects)."""
    model, tok = tiny_llama
    s = evaluate(model, tok, ["piqa", "mmlu"], data_dir=data_dir, limit=2, limits={"mmlu": 5}, batch_size=8)
    assert s["tasks"]["piqa"]["n"] == 2 and s["tasks"]["mmlu"]["n"] == 5 and s["tasks"]["mmlu"]["subtasks"] == 5
    assert s["config"]["limits"] == {"mmlu": 5}
    only = evaluate(model, tok, ["piqa"], data_dir=data_dir, limits={"piqa": 3}, batch_size=8)  # no `limit`
    assert only["tasks"]["piqa"]["n"] == 3
    with pytest.raises(LayerpruneError, match="not evaluated: mmlu"):
        evaluate(model, tok, ["piqa"], data_dir=data_dir, limits={"mmlu": 5})
    with pytest.raises(LayerpruneError, match="integers >= 1"):
        evaluate(model, tok, ["piqa"], data_dir=data_dir, limits={"piqa": 0})


def test_limit_per_subtask_is_lm_eval_semantics(tiny_llama, data_dir, no_network):
    model, tok = tiny_llama
    s = evaluate(model, tok, ["mmlu"], data_dir=data_dir, limit=1, limit_per_subtask=True, batch_size=8)
    assert s["tasks"]["mmlu"]["n"] == 57 and s["tasks"]["mmlu"]["subtasks"] == 57


@pytest.mark.parametrize("n,sizes,want", [
    (100, [100] * 57, [2] * 43 + [1] * 14),
    (10, [1, 100, 2], [1, 7, 2]),
    (5, [1, 1], [1, 1]),
    (3, [5, 5, 5, 5], [1, 1, 1, 0]),
])
def test_spread(n, sizes, want):
    got = _spread(n, sizes)
    assert sum(got) == min(n, sum(sizes)) and all(g <= s for g, s in zip(got, sizes, strict=True))
    assert sorted(got, reverse=True) == sorted(want, reverse=True)


def test_cli_eval_writes_json_and_table(tmp_path, data_dir, no_network, capsys):
    from layerprune.cli import main

    model_dir = tmp_path / "m"
    make_tiny("qwen2").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "run"
    rc = main(["eval", str(model_dir), "--tasks", "arc_easy,winogrande", "--limit", "2", "--data-dir", str(data_dir),
               "--out", str(out), "--batch-size", "4"])
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    assert set(data["tasks"]) == {"arc_easy", "winogrande"} and data["model"]["num_layers"] == 6
    assert (out / "eval.md").read_text().count("|") > 10
    assert main(["eval", str(model_dir), "--tasks", "arc_easy", "--limit", "2", "--data-dir", str(data_dir),
                 "--out", str(out)]) == 2  # eval.json exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_cli_missing_task_file(tmp_path, capsys):
    from layerprune.cli import main

    (tmp_path / "eval").mkdir()
    model_dir = tmp_path / "m"
    make_tiny("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rc = main(["eval", str(model_dir), "--tasks", "piqa", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and str(Path(tmp_path) / "eval/piqa/validation.jsonl") in err


def test_peft_adapter_in_process_matches_lm_eval_loading(tmp_path, data_dir, no_network):
    """--peft applies the adapter (scores change) and in-process wrapping equals lm-eval loading the paths."""
    from peft import LoraConfig, get_peft_model

    from layerprune.models import load_for_eval

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "lora"
    make_tiny("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    get_peft_model(make_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).save_pretrained(adapter_dir)

    def lls(s):
        return [r[0] for d in s["samples"]["arc_easy"] for r in d["filtered_resps"]]

    kw = dict(data_dir=data_dir, limit=2, batch_size=2, log_samples=True, bootstrap_iters=0)
    base_model, tok = load_for_eval(str(base_dir), "float32", "cpu")
    peft_model, _ = load_for_eval(str(base_dir), "float32", "cpu", peft=str(adapter_dir))
    base = evaluate(base_model, tok, ["arc_easy"], **kw)
    ours = evaluate(peft_model, tok, ["arc_easy"], **kw)
    theirs = evaluate(str(base_dir), None, ["arc_easy"], model_args={"peft": str(adapter_dir), "device": "cpu",
                                                                     "dtype": "float32"}, **kw)
    assert lls(ours) != pytest.approx(lls(base), abs=1e-4)
    assert lls(ours) == pytest.approx(lls(theirs), abs=1e-4)


def test_no_data_and_hub_off_is_one_line_error(tiny_llama):
    from layerprune.errors import LayerpruneError

    model, tok = tiny_llama
    with pytest.raises(LayerpruneError, match="Hub is off"):
        evaluate(model, tok, ["piqa"])
