"""scripts/reproduce_small.py: the sweep runs end to end (tiny models, smoke budget), resumes, and its
documents follow the noise rule."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_smol

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_small.py"


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("reproduce_small", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_small"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_noise_rule(rs):
    assert rs.verdict((0.40, 0.02), (0.35, 0.02)) == "within noise"  # 5 points < 2 * 2.83
    assert rs.verdict((0.45, 0.02), (0.35, 0.02)) == "better"
    assert rs.verdict((0.30, 0.01), (0.40, 0.01)) == "worse"
    assert rs.verdict((3.0, 0.01), (4.0, 0.01), higher_better=False) == "better"  # lower NLL is better
    assert rs.verdict((None, None), (0.3, 0.01)) == "n/a"


def test_job_selection_and_settings(rs):
    # --only a healed configuration brings its own method's pilot candidates (and the dense evaluation) along.
    j = rs.jobs(["smollm2", "gemma3"], ["g-bi-lora"])
    assert j == ["dense:gemma3"] + [f"pilot:{k}" for k in rs.pilot_keys() if k.startswith("lora@")] + [
        "config:g-bi-lora"]
    assert rs.jobs(["smollm2"], ["t3-reverse-lstsq-none"]) == ["dense:smollm2", "config:t3-reverse-lstsq-none"]
    # Every configuration is scheduled exactly once, and every recipe validates.
    from layerprune.recipe.schema import validate

    names = [n for f in rs.FAMILIES.values() for n in f.configs]
    assert sorted(rs.PRIORITY) == sorted(names)
    for fam in rs.FAMILIES.values():
        for n, c in fam.configs.items():
            rec = validate(rs.recipe(fam, n, c, 1e-3))
            assert rec["heal"]["batch_size"] == 16 or c.heal == "none"
            assert rec["prune"]["num_layers"] == fam.remove
    assert len(rs.FAMILIES["smollm2"].configs) == 8 + 4 + 6 and len(rs.FAMILIES["gemma3"].configs) == 4


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path, smollm2_path, data_dir):
    smol = save_tiny_smol(tmp_path / "smol", smollm2_path, "llama", num_hidden_layers=12)
    gem = save_tiny_smol(tmp_path / "gem", smollm2_path, "gemma3_text", num_hidden_layers=8,
                         layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2)
    out = tmp_path / "out"
    env = {**os.environ, "LAYERPRUNE_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--model", f"smollm2={smol}",
           "--model", f"gemma3={gem}", "--workers", "2",
           "--only", "t3-reverse-lstsq-none", "t2-reverse-last3", "g-reverse-lstsq-last3"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = out / "results"  # the smoke run's records (a real sweep's are committed under docs/data)
    done = json.loads((rec / "smollm2" / "t2-reverse-last3.json").read_text())
    pilots = [json.loads((rec / "pilot" / f"partial@{lr:g}.json").read_text()) for lr in (3e-4, 1e-3)]
    assert done["lr"] == min(pilots, key=lambda p: p["final_val_loss"])["lr"]  # the pilot's choice, recorded
    assert done["removed_layers"] == [4, 5, 6, 7, 8, 9, 10, 11]  # reverse: the last 8 of 12
    assert done["zero_shot"]["tasks"]["piqa"]["acc"] is not None and done["compare"]["text"]["kl_teacher_pruned"] > 0
    assert done["ppl"]["healed"]["ppl_stderr"] > 0 and done["wall_s"] > 0
    g = json.loads((rec / "gemma3" / "g-reverse-lstsq-last3.json").read_text())
    assert g["compensation"] is not None and g["removed_layers"] == [4, 5, 6, 7]
    doc = (out / "results-smollm2.md").read_text()
    assert "**Partial results.** 2 of 18 configurations" in doc and "t1-bi-lora" in doc
    assert "| reverse + last3 | 4,5,6,7,8,9,10,11 |" in doc and "not run yet" in doc
    assert "Partial last3 ≥ LoRA" in doc and "(t1-reverse-lora missing)" in doc
    assert "**Partial results.** 1 of 4" in (out / "results-gemma3.md").read_text()
    assert (out / "img" / "results-avg-vs-ppl.png").stat().st_size > 0
    assert (out / "img" / "results-val-loss.png").stat().st_size > 0
    # Resume: everything is done, nothing runs again.
    before = done["wall_s"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "started" not in r.stdout
    assert json.loads((rec / "smollm2" / "t2-reverse-last3.json").read_text())["wall_s"] == before
    # The records alone make the documents: without the run folder, --table-only writes the same tables.
    first = (out / "results-smollm2.md").read_text()
    for d in ("smollm2", "gemma3", "pilot"):
        shutil.rmtree(out / d)
    r = subprocess.run(cmd + ["--table-only"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (out / "results-smollm2.md").read_text() == first


def _done(acc: float, se: float, ppl: float, ppl_se: float, removed: list[int]) -> dict:
    tasks = {t: {"acc": acc, "acc_stderr": se * 6 ** 0.5} for t in
             ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "openbookqa"]}
    return {"removed_layers": removed, "ppl": {"healed": {"ppl": ppl, "ppl_stderr": ppl_se}},
            "zero_shot": {"tasks": tasks}, "mmlu": {"tasks": {"mmlu": {"acc": 0.25, "acc_stderr": 0.04}}},
            "compare": {"text": {"kl_teacher_pruned": 1.5, "top1_agreement": 0.4}},
            "heal": {"steps": 64, "trainable_params": 3e6, "log_history": [{"step": 0, "eval_loss": 9.0},
                                                                            {"step": 64, "eval_loss": 3.0}]},
            "wall_s": 600}


def _write_results(rs, out, rows: dict, monkeypatch) -> None:
    monkeypatch.setattr(rs, "RESULTS", out / "results")
    for name, r in rows.items():
        rs.record_path(f"config:{name}").parent.mkdir(parents=True, exist_ok=True)
        rs.record_path(f"config:{name}").write_text(json.dumps(r))


def test_findings_apply_the_noise_rule(rs, tmp_path, monkeypatch):
    monkeypatch.setitem(rs.SETTINGS, "smoke", True)  # documents go to OUT, not docs/
    out = tmp_path
    fam = rs.FAMILIES["smollm2"]
    # Avg stderr 0.02 each: reverse − bi = +10 points > 2 × 2.83 (better); last3 − LoRA = −2 (within noise).
    rows = {"t1-reverse-lora": _done(0.40, 0.02, 300.0, 10.0, [22, 23]),
            "t1-bi-lora": _done(0.30, 0.02, 200.0, 10.0, [12, 13]),
            "t2-reverse-last3": _done(0.38, 0.02, 250.0, 10.0, [22, 23])}
    _write_results(rs, out, rows, monkeypatch)
    doc = rs.write_doc(fam, out).read_text()
    assert "**Partial results.** 3 of 18 configurations" in doc
    assert ("Reverse-order competitive with or better than the importance metrics after LoRA healing: by accuracy "
            "holds; by perplexity does not hold**") in doc
    assert "better than bi" in doc and "significantly worse than bi" in doc  # higher Avg, but worse perplexity
    assert "last3 − LoRA: Avg -2.0 points (2σ = 5.7: **within noise**)" in doc
    assert "By accuracy the claim **holds** here." in doc
    assert "| bi + LoRA | 12,13 | 3.00M | 64 | 200.0 ± 10.0 |" in doc
    assert "answer 1, reverse vs angular (LoRA → lstsq + last3): not decided yet (t1-angular-lora, " in doc
    rs.write_plots(out)
    assert (out / "img" / "results-val-loss.png").stat().st_size > 0


def test_findings_say_when_no_accuracy_difference_is_significant(rs, tmp_path, monkeypatch):
    monkeypatch.setitem(rs.SETTINGS, "smoke", True)
    # reverse − bi = +1 point < 2 × 2.83: neither "significantly worse" nor "significantly better" applies.
    _write_results(rs, tmp_path, {"t1-reverse-lora": _done(0.36, 0.02, 300.0, 10.0, [22, 23]),
                                  "t1-bi-lora": _done(0.35, 0.02, 200.0, 10.0, [12, 13])}, monkeypatch)
    doc = rs.write_doc(rs.FAMILIES["smollm2"], tmp_path).read_text()
    assert "reverse ranks 1 of 2; no metric's accuracy differs from it beyond noise. By healed perplexity" in doc
    assert "significantly better than no other metric" not in doc


def test_findings_say_whether_compensation_changes_an_answer(rs, tmp_path, monkeypatch):
    monkeypatch.setitem(rs.SETTINGS, "smoke", True)
    out = tmp_path
    # last3 vs LoRA, Avg stderr 0.02 each (2σ = 5.7 points): −2 points (within noise) without compensation,
    # +10 (better) with it; perplexity 300 vs 200 (log-ratio 0.41 ≫ 2σ: worse) → 100 vs 200 (better).
    rows = {"t1-reverse-lora": _done(0.30, 0.02, 200.0, 10.0, [22, 23]),
            "t2-reverse-last3": _done(0.28, 0.02, 300.0, 10.0, [22, 23]),
            "t3-reverse-lstsq-last3": _done(0.40, 0.02, 100.0, 5.0, [22, 23])}
    _write_results(rs, out, rows, monkeypatch)
    doc = rs.write_doc(rs.FAMILIES["smollm2"], out).read_text()
    assert ("answer 2, last3 vs LoRA (last3 → lstsq + last3; LoRA uncompensated): by accuracy within noise → "
            "better (**changes**); by perplexity worse → better (**changes**).") in doc


def test_a_pair_with_the_same_layers_is_called_run_to_run_variation(rs, tmp_path, monkeypatch):
    monkeypatch.setitem(rs.SETTINGS, "smoke", True)
    # Angular picking reverse's layers builds the same model: the comparison must not read as a metric effect.
    rows = {"g-reverse-lstsq-last3": _done(0.33, 0.02, 3400.0, 170.0, [14, 15, 16, 17]),
            "g-angular-lstsq-last3": _done(0.33, 0.02, 3200.0, 150.0, [14, 15, 16, 17]),
            "g-reverse-last3": _done(0.32, 0.02, 3000.0, 140.0, [14, 15, 16, 17]),
            "g-bi-lora": _done(0.31, 0.02, 4200.0, 120.0, [2, 8, 9, 14])}
    _write_results(rs, tmp_path, rows, monkeypatch)
    doc = rs.write_doc(rs.FAMILIES["gemma3"], tmp_path).read_text()
    finding1 = next(line for line in doc.splitlines() if line.startswith("1. "))
    assert finding1.count("run-to-run variation") == 1  # reverse vs angular only, not reverse vs bi
    assert "Both remove the same layers (14,15,16,17)" in finding1
