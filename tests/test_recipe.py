"""Recipes: schema validation, an end-to-end tiny run, resume semantics, manifest/model card/exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerpruneError
from layerprune.recipe import load_recipe, run_recipe, validate

from conftest import save_tiny_smol

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data,msg", [
    ({"heal": {"lrr": 1}}, "unknown key 'heal.lrr'"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"heal": {"lr": "fast"}}, "'heal.lr' must be int or float"),
    ({"prune": {"iterative": "yes"}}, "'prune.iterative' must be bool"),
    ({"evaluate": {"tasks": [1, 2]}}, "'evaluate.tasks' must be a list[str]"),
    ({"prune": {"ratio": 1.5}}, "prune.ratio"),
    ({"evaluate": {"models": ["teacher"]}}, "evaluate.models"),
    ({"heal": 3}, "'heal' must be a mapping"),
])
def test_schema_errors_name_the_key(data, msg):
    with pytest.raises(LayerpruneError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        validate(data)


def test_defaults_and_shipped_recipes_validate():
    rec = validate({})
    assert rec["prune"]["metric"] == "reverse" and rec["heal"]["method"] == "partial"
    assert rec["heal"]["lr"] == 1e-5 and rec["heal"]["batch_size"] == 64 and rec["heal"]["micro_batch_size"] == 4
    names = {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert {"best-practice", "lora-baseline", "taylor", "ppl", "bi", "magnitude-l1", "magnitude-l2", "random",
            "angular", "iterative-reverse", "dolly"} <= names
    for p in (REPO / "recipes").glob("*.yaml"):
        r = load_recipe(p, ["model=/some/other/model"])
        assert r["model"] == "/some/other/model"
    bp = load_recipe(REPO / "recipes" / "best-practice.yaml")
    assert (bp["prune"]["metric"], bp["prune"]["ratio"], bp["heal"]["method"], bp["heal"]["layers"]) == \
        ("reverse", 0.25, "partial", "last3")


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory, smollm2_path):
    """A tiny random llama that uses the real SmolLM2 tokenizer (so real text data is meaningful)."""
    return save_tiny_smol(tmp_path_factory.mktemp("tiny") / "tiny-smol", smollm2_path)


def _recipe(model: Path, **over) -> dict:
    r = {"name": "tiny", "model": str(model),
         "prune": {"metric": "bi", "num_layers": 2, "nsamples": 2, "seqlen": 32},
         "heal": {"method": "partial", "layers": "last1", "max_steps": 2, "batch_size": 2, "micro_batch_size": 2,
                  "eval_steps": 2, "val_size": 4, "max_train_samples": 8, "warmup_steps": 1, "cutoff_len": 48},
         "evaluate": {"tasks": ["piqa"], "limit": 2, "ppl": ["wikitext2"], "ppl_max_tokens": 256, "batch_size": 4},
         "measure": {"seqlen": 8, "new_tokens": 3, "repeats": 1, "batch": [1]}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def test_end_to_end_resume_and_outputs(tiny_smol, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    out = tmp_path / "run"
    logs: list[str] = []
    m = run_recipe(_recipe(tiny_smol), out, log=logs.append)
    removed, kept = m["removed_layers"], m["kept_layers"]
    assert len(removed) == 2 and sorted(removed + kept) == list(range(6))
    scores = json.loads((out / "score" / "scores.json").read_text())
    assert sorted(scores["metrics"]["bi"]["selected"]) == removed
    # Final model: vanilla checkpoint with its manifest and model card.
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 4
    fm = json.loads((out / "model" / "layerprune.json").read_text())
    assert fm["removed_layers"] == removed and fm["kept_layers"] == kept
    card = (out / "model" / "README.md").read_text()
    assert str(removed) in card or ", ".join(map(str, removed)) in card
    assert (out / "model" / "heal.json").is_file()
    # Exports equal the manifest's cut.
    mk = yaml.safe_load((out / "exports" / "mergekit.yaml").read_text())
    rebuilt = [i for s in mk["slices"] for i in range(*s["sources"][0]["layer_range"])]
    assert rebuilt == kept
    assert (out / "exports" / "llama_cpp_prune_layers.txt").read_text().strip() == ",".join(map(str, removed))
    # Report, results and stage bookkeeping.
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    run_manifest = json.loads((out / "layerprune.json").read_text())
    assert set(run_manifest["results"]) == {"dense", "pruned", "healed"}
    assert 0 <= run_manifest["results"]["healed"]["avg_acc"] <= 1
    assert run_manifest["results"]["dense"]["ppl"]["wikitext2"]["card"]["seq_len"] == 128

    # Resume with nothing changed: every stage is skipped.
    logs.clear()
    run_recipe(_recipe(tiny_smol), out, resume=True, log=logs.append)
    assert logs and all(line.startswith("[skip]") for line in logs), logs
    # A changed healing input re-runs healing and what depends on it, nothing upstream.
    logs.clear()
    run_recipe(_recipe(tiny_smol, heal={"lr": 1e-4}), out, resume=True, log=logs.append)
    ran = {line.split()[-1] for line in logs if line.startswith("[run ]")}
    assert ran == {"model", "eval-healed", "measure"}, logs

    # An existing run directory is refused without --resume/--overwrite.
    with pytest.raises(LayerpruneError, match="not empty"):
        run_recipe(_recipe(tiny_smol), out)


def test_compensation_stage_between_prune_and_heal(tiny_smol, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    out = tmp_path / "run"
    r = _recipe(tiny_smol, prune={"metric": "reverse"}, compensate={"method": "lstsq", "nsamples": 4, "seqlen": 32},
                measure={"enabled": True})
    m = run_recipe(r, out, log=lambda s: None)
    assert set(m["results"]) == {"dense", "pruned", "compensated", "healed"}
    block = m["compensation"]["blocks"][0]
    assert block["removed"] == [4, 5] and block["fold_point"] == "model.layers.3.mlp.down_proj"
    # Healing starts from the compensated checkpoint; the compensated model has the pruned model's size.
    heal = json.loads((out / "model" / "heal.json").read_text())
    assert Path(heal["source_path"]).name == "compensated"
    assert m["results"]["compensated"]["params"] == m["results"]["pruned"]["params"]
    report = (out / "report.md").read_text()
    assert "## Compensation" in report and "model.layers.3.mlp.down_proj" in report
    assert "| compensated |" in report or "compensated" in report.split("## Summary")[1].split("##")[0]
    assert "## Compensation" in (out / "model" / "README.md").read_text()
    assert json.loads((out / "compensated" / "layerprune.json").read_text())["compensation"]["method"] == "lstsq"


def test_workers_evaluate_in_background_with_equal_results(tiny_smol, tmp_path, data_dir, monkeypatch):
    """workers: 2 evaluates dense/pruned/compensated in a worker process beside healing: same numbers, also
    when the main process takes the cores the worker leaves free (cores: 2)."""
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = _recipe(tiny_smol, prune={"metric": "reverse"}, compensate={"method": "lstsq", "nsamples": 4, "seqlen": 32},
                measure={"enabled": False})
    one = run_recipe(r, tmp_path / "one", log=lambda s: None)
    logs: list[str] = []
    two = run_recipe({**r, "workers": 2, "cores": 2}, tmp_path / "two", log=logs.append)
    assert {line.split()[-1] for line in logs if line.startswith("[bg  ]")} == {"process)"} and \
        sum(line.startswith("[bg  ]") for line in logs) == 3, logs
    for which in ("dense", "pruned", "compensated", "healed"):
        a, b = one["results"][which], two["results"][which]
        assert a["ppl"]["wikitext2"]["ppl"] == pytest.approx(b["ppl"]["wikitext2"]["ppl"], rel=1e-5)
        assert a["avg_acc"] == b["avg_acc"]
    assert two["stages"]["eval-dense"]["seconds"] > 0
    assert not (tmp_path / "two" / ".background").exists()
    assert (tmp_path / "two" / "eval-dense" / "eval.json").is_file()
    # Resumed with nothing changed: nothing is started in the background.
    logs.clear()
    run_recipe({**r, "workers": 2, "cores": 2}, tmp_path / "two", resume=True, log=logs.append)
    assert all(line.startswith("[skip]") for line in logs), logs


def test_worker_error_surfaces_in_its_stage(tiny_smol, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = _recipe(tiny_smol, evaluate={"tasks": [], "ppl": ["wikitext2"], "ppl_seqlen": 100000},
                heal={"method": "none"}, measure={"enabled": False}, workers=2)
    with pytest.raises(LayerpruneError):
        run_recipe(r, tmp_path / "bad", log=lambda s: None)
    assert not (tmp_path / "bad" / "eval-dense").exists() and not (tmp_path / "bad" / ".background").exists()


def test_iterative_rounds(tiny_smol, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = _recipe(tiny_smol, prune={"iterative": True, "step": 1}, evaluate={"tasks": [], "models": ["dense", "healed"]},
                measure={"enabled": False})
    m = run_recipe(r, tmp_path / "it", log=lambda s: None)
    assert [len(x["removed_layers"]) for x in m["rounds"]] == [1, 1]
    assert sorted(sum((x["removed_layers"] for x in m["rounds"]), [])) == m["removed_layers"]
    assert (tmp_path / "it" / "rounds" / "round-02" / "healed" / "heal.json").is_file()
    fm = json.loads((tmp_path / "it" / "model" / "layerprune.json").read_text())
    assert fm["removed_layers"] == m["removed_layers"] and fm["original_num_layers"] == 6


@pytest.mark.slow
@pytest.mark.smollm2
def test_demo_recipe_on_smollm2(smollm2_path, tmp_path, data_dir, monkeypatch):
    """The shipped best-practice recipe on the real SmolLM2 with very small limits."""
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    over = ["model=default", "heal.max_steps=4", "heal.batch_size=2", "heal.micro_batch_size=2", "heal.cutoff_len=64",
            "heal.val_size=8", "heal.eval_steps=2", "heal.warmup_steps=1", "heal.max_train_samples=32",
            "evaluate.tasks=[piqa,arc_easy]", "evaluate.limit=4", "evaluate.ppl_max_tokens=1024",
            "measure.new_tokens=4", "measure.repeats=1", "measure.batch=[1]"]
    m = run_recipe(REPO / "recipes" / "best-practice.yaml", tmp_path / "demo", overrides=over, log=lambda s: None)
    # ratio 0.25 rounds down like the paper (6 of 26 for Gemma2): 7 of SmolLM2's 30 layers.
    assert m["removed_layers"] == list(range(23, 30)) and m["original_num_layers"] == 30
    assert set(m["results"]) == {"dense", "pruned", "compensated", "healed"}
    heal = json.loads((tmp_path / "demo" / "model" / "heal.json").read_text())
    assert heal["method"] == "partial"
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "model")
    # The healed model stays tied: never larger than the pruned one.
    assert re.config.num_hidden_layers == 23 and re.config.tie_word_embeddings
    assert m["results"]["healed"]["params"] == m["results"]["pruned"]["params"]
    assert "23, 24, 25" in (tmp_path / "demo" / "model" / "README.md").read_text()


def test_no_data_and_no_hub_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERPRUNE_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LayerpruneError, match="LAYERPRUNE_DATA"):
        run_recipe(REPO / "recipes" / "best-practice.yaml", tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_recipe_budget_target(tiny_smol, tmp_path, data_dir, monkeypatch):
    """prune.target picks the smallest removal meeting the bound; the manifest records it."""
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = _recipe(tiny_smol, prune={"metric": "magnitude", "num_layers": None, "target": "non_embedding_params=0.6"},
                heal={"method": "none"}, evaluate={"tasks": [], "ppl": [], "models": ["dense"]},
                measure={"enabled": False})
    r["prune"].pop("num_layers")
    m = run_recipe(r, tmp_path / "run", log=lambda s: None)
    t = m["target"]
    assert len(m["removed_layers"]) == t["k"] == 3 and t["value"] <= 0.6 * t["dense_value"]
    assert t["tried"][1]["value"] > 0.6 * t["dense_value"]  # two layers were not enough
    with pytest.raises(LayerpruneError, match="cannot be met"):
        run_recipe({**r, "prune": {**r["prune"], "target": "params=10"}}, tmp_path / "run2", log=lambda s: None)
    with pytest.raises(LayerpruneError, match="measured"):
        validate({"prune": {"target": "decode_speedup=1.2"}})


def test_recipe_stability_in_scores_and_report(tiny_smol, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = _recipe(tiny_smol, prune={"stability": 4, "stability_calib": [str(data_dir / "calibration/wiki_demo.jsonl")]},
                heal={"method": "none"}, evaluate={"tasks": [], "ppl": [], "models": ["dense"]},
                measure={"enabled": False})
    m = run_recipe(r, tmp_path / "run", log=lambda s: None)
    st = m["stability"]
    assert st["resamples"] == 4 and len(st["sources"]) == 2 and st["k"] == 2
    assert json.loads((tmp_path / "run" / "score" / "scores.json").read_text())["stability"]["k"] == 2
    assert "## Ranking stability" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "score" / "stability.png").is_file()


@pytest.mark.parametrize("key,value", [("evaluate.generative.agreement", -1), ("evaluate.generative.new_tokens", 0),
                                       ("evaluate.limit", -1), ("evaluate.generative.limit", 0),
                                       ("evaluate.batch_size", 0), ("measure.repeats", 0), ("prune.nsamples", 0),
                                       ("measure.batch", [1, 0])])
def test_numeric_minimums_are_checked_before_any_stage(key, value):
    from layerprune.errors import LayerpruneError
    from layerprune.recipe.schema import validate

    data: dict = {}
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    with pytest.raises(LayerpruneError, match=f"'{key}' must be >= "):
        validate(data)


def test_set_values_are_read_as_users_mean_them(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; --set reads it as the float a user means (strings stay strings)."""
    from layerprune.options import parse_scalar

    f = tmp_path / "r.yaml"
    f.write_text("name: r\n")
    r = load_recipe(f, ["heal.lr=1e-3", "heal.data=1e3x", "workers=2"])
    assert r["heal"]["lr"] == 1e-3 and isinstance(r["heal"]["lr"], float)
    assert r["heal"]["data"] == "1e3x" and r["workers"] == 2
    assert parse_scalar("-2E+1") == -20.0 and parse_scalar(".5e2") == 50.0 and parse_scalar("") == ""


def test_task_limits_and_compare_in_a_recipe(tiny_smol, tmp_path, data_dir, monkeypatch):
    """The study's evaluation as recipe keys: a per-task limit over `limit`, and agreement with the dense model
    on held-out text (KL, top-1) for every non-dense model, in the manifest and the summary table."""
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = _recipe(tiny_smol, heal={"method": "none"}, measure={"enabled": False},
                evaluate={"tasks": ["piqa", "arc_easy"], "task_limits": {"arc_easy": 3}, "compare": ["wikitext2"],
                          "compare_max_tokens": 256, "models": ["dense", "pruned"]})
    m = run_recipe(r, tmp_path / "run", log=lambda s: None)
    pr = m["results"]["pruned"]
    assert pr["zero_shot"]["piqa"]["n"] == 2 and pr["zero_shot"]["arc_easy"]["n"] == 3
    c = pr["compare"]["wikitext2"]
    assert c["kl_teacher_pruned"] > 0 and 0 <= c["top1_agreement"] <= 1 and "compare" not in m["results"]["dense"]
    assert "KL(dense‖model) wikitext2" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(LayerpruneError, match="not in evaluate.tasks"):
        validate({"evaluate": {"tasks": ["piqa"], "task_limits": {"mmlu": 5}}})
    with pytest.raises(LayerpruneError, match="integer >= 1"):
        validate({"evaluate": {"tasks": ["piqa"], "task_limits": {"piqa": 0.5}}})


def test_given_cut_skips_scoring_and_is_refused_when_out_of_range(tiny_smol, tmp_path, data_dir, monkeypatch):
    """prune.remove names the cut (e.g. a search's winner): no score stage, that exact cut, compensated and
    recorded as 'given'; bad lists are refused before any stage."""
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    r = _recipe(tiny_smol, prune={"remove": [3, 1], "num_layers": None},
                compensate={"method": "lstsq", "nsamples": 4, "seqlen": 32}, heal={"method": "none"},
                evaluate={"tasks": [], "ppl": [], "models": ["compensated"]}, measure={"enabled": False})
    m = run_recipe(r, tmp_path / "run", log=lambda s: None)
    assert m["removed_layers"] == [1, 3] and m["kept_layers"] == [0, 2, 4, 5]
    assert not (tmp_path / "run" / "score").exists() and "score" not in m["stages"]
    assert [b["removed"] for b in m["compensation"]["blocks"]] == [[1], [3]]
    pruned = json.loads((tmp_path / "run" / "pruned" / "layerprune.json").read_text())
    assert pruned["method"] == "given"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").config.num_hidden_layers == 4
    with pytest.raises(LayerpruneError, match="out of range"):
        run_recipe({**r, "prune": {**r["prune"], "remove": [1, 6]}}, tmp_path / "bad", log=lambda s: None)
    assert not (tmp_path / "bad").exists()
    for bad, msg in [({"remove": [1, 1]}, "distinct"), ({"remove": [1], "num_layers": 2}, "differs"),
                     ({"remove": [1], "metric": "search", "target": "params=0.8"}, "names the cut itself")]:
        with pytest.raises(LayerpruneError, match=msg):
            validate({"prune": bad})
