"""The study as data: studies/seed-tables.yaml and studies/gemma3.yaml expand to exactly the configurations
behind the committed records (docs/data/reproduce-small), as scripts/reproduce_small.py built them."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from layerprune.recipe import validate
from layerprune.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "data" / "reproduce-small"


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_small", REPO / "scripts" / "reproduce_small.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _what_ran(r: dict) -> tuple:
    """The parts of a validated recipe that decide a configuration's numbers (the study's runs used the live
    teacher: the cache, added later, is turned off in the study file and not compared)."""
    heal = {k: v for k, v in r["heal"].items() if k != "teacher_cache"} if r["heal"]["method"] != "none" else "none"
    comp = r["compensate"] if r["compensate"]["method"] != "none" else "none"
    return json.dumps([r["model"], r["seed"], r["prune"], comp, heal], sort_keys=True)


@pytest.mark.parametrize("family,study", [("smollm2", "seed-tables.yaml"), ("gemma3", "gemma3.yaml")])
def test_study_cells_are_the_recorded_configurations(family, study):
    rs = _script()
    fam = rs.FAMILIES[family]
    sweep = load_sweep(REPO / "studies" / study)
    cells = {_what_ran(c.recipe): c for c in sweep.cells}
    assert len(cells) == len(sweep.cells) == len(fam.configs)
    e = rs.SETTINGS["evaluate"]
    for name, cfg in fam.configs.items():
        rec = json.loads((RECORDS / family / f"{name}.json").read_text())
        want = validate(rs.recipe(fam, name, cfg, rec["lr"]))
        cell = cells.get(_what_ran(want))
        assert cell is not None, f"{name}: no cell of {study} runs what the record ran"
        got = cell.recipe
        assert got["heal"]["method"] != "distill" or got["heal"]["teacher_cache"] == "off", name
        # The script evaluated outside its recipe: the same tasks, limits and agreement, now recipe keys.
        ev = got["evaluate"]
        assert ev["tasks"] == rs.MAIN_TASKS + ["mmlu"] and ev["limit"] == e["limit"]
        assert ev["task_limits"] == {"mmlu": e["mmlu_limit"]} and ev["compare_max_tokens"] == e["compare_max_tokens"]
        assert ev["compare"] == ["wikitext2"] and ev["ppl_max_tokens"] == e["ppl_max_tokens"]
        assert ev["batch_size"] == e["batch_size"] and ev["models"] == want["evaluate"]["models"]
