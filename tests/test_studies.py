"""The study as data: studies/seed-tables.yaml and studies/gemma3.yaml are the configurations behind the committed
records (docs/data/reproduce-small); the sweep report written from those records carries their numbers; a cell
re-run by a sweep reproduces its record (Table 4's reverse + lstsq cell is Table 3's), and a drift is caught."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from layerprune.sweep.core import resolve_pilot
from layerprune.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "data" / "reproduce-small"
STUDIES = {"smollm2": "seed-tables.yaml", "gemma3": "gemma3.yaml"}


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("reproduce_small", REPO / "scripts" / "reproduce_small.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cells(family: str, tmp_path: Path):
    sw = load_sweep(REPO / "studies" / STUDIES[family])
    resolve_pilot(sw, tmp_path)  # no pilot ran there: the recorded rates
    return sw.cells


def test_the_thin_wrapper_is_thin():
    assert len((REPO / "scripts" / "reproduce_small.py").read_text().splitlines()) < 100


@pytest.mark.parametrize("family", list(STUDIES))
def test_study_cells_are_the_recorded_configurations(rs, family, tmp_path):
    cells = _cells(family, tmp_path)
    names = [rs.record(family, c.recipe)["name"] for c in cells]
    recorded = {p.stem for p in (RECORDS / family).glob("*.json")} - {"dense"}
    assert sorted(names) == sorted(recorded)  # one cell per record, every record a cell
    for c in cells:
        rec, r = rs.record(family, c.recipe), c.recipe
        cfg, heal = rec["config"], r["heal"]
        assert r["prune"]["metric"] == cfg["metric"].split("-")[0] and r["prune"]["num_layers"] == len(rec["removed_layers"])
        assert (r["compensate"]["method"] == "lstsq") == cfg["compensate"]
        assert ("pruned" in r["evaluate"]["models"]) == cfg.get("eval_pruned", False)
        if heal["method"] != "none":
            assert heal["lr"] == rec["lr"] and heal["max_steps"] == rec["heal"]["steps"] == 64
            assert heal["method"] == rec["heal"]["method"] and rec["heal"].get("tie_mode") in (None, heal["tie_mode"])
            assert heal["method"] != "distill" or heal["teacher_cache"] == "off"  # the records used the live teacher
        ev = r["evaluate"]
        assert ev["tasks"][-1] == "mmlu" and set(ev["tasks"][:-1]) == set(rec["zero_shot"]["tasks"])
        assert ev["limit"] == 100 and ev["task_limits"] == {"mmlu": 114} and ev["compare"] == ["wikitext2"]


def test_the_report_from_the_records_has_their_numbers(rs, tmp_path):
    rs.report(tmp_path, publish=None)
    for family in STUDIES:
        s = json.loads((tmp_path / f"records-{family}" / "sweep.json").read_text())
        rows = {r["key"]: r for r in s["cells"]}
        for c in _cells(family, tmp_path / "none"):
            rec, row = rs.record(family, c.recipe), rows[c.key]
            final = max(rec["ppl"], key=["pruned", "compensated", "healed"].index)
            accs = [t["acc"] for t in rec["zero_shot"]["tasks"].values()]
            assert row["status"] == "done" and row["stage"] == final
            assert row["ppl"] == rec["ppl"][final]["ppl"] and row["avg_acc"] == pytest.approx(sum(accs) / len(accs))
        assert s["findings"] and all("**" in f for f in s["findings"])
    md = (tmp_path / "records-smollm2" / "sweep.md").read_text()
    table2 = md.split("## Table 2")[1].split("## Table 3")[0]
    assert "## Table 1" in md and "Every cell here: prune.metric=reverse." in table2
    assert "| last3 | 0.003 | healed | 2006 ± 1e+02 |" in table2 and "Dense model: PPL 56.2" in md


# Cells re-run by sweeps: two through Table 4's, the rest through the studies (RECORDS/rerun/<family>/<record>.json,
# each a finished cell's cell.json).
RERUN = [("table4/ade0b435833e.json", "smollm2", "t3-reverse-lstsq-none"),
         ("table4/6703ad5a34f0.json", "smollm2", "t3-reverse-lstsq-last3"),
         *[(str(f.relative_to(REPO / "docs" / "data")), f.parent.name, f.stem)
           for f in sorted((RECORDS / "rerun").glob("*/*.json"))]]


# Today's forward passes differ from the records' in float rounding (up to ~3e-6 relative on un-healed models,
# e.g. t1-random-lora's PPL 358.66189 -> 358.66069; the records predate the dependency lock, the cause is not
# isolated), invisible in the printed digits except where a cell amplifies it: the reverse cut starts LoRA at
# validation loss 17.9 (un-healed PPL 1.4e9) at lr 9e-3, and its 64 steps end at 4.4720 instead of 4.4650.
# Where healing starts from a broken model (validation loss 10.6-17.9) at lr 9e-3, the rounding differences
# (step 1's loss equal to 1e-5) grow through training: t1-magnitude-l2's 64 steps end at 6.743 instead of 6.788
# (its PPL within noise), t1-magnitude-l1's diverge from step 10 (8.417 vs 8.519) and end at 6.455 instead of
# 7.071: healed PPL 4983.7 against 3649.8, beyond the evaluation's noise (DRIFT, explained in docs/sweeps.md; its
# un-healed model is within noise). t1-angular-lora (validation loss 5.4 at start, un-healed PPL 1072.8 as
# recorded) ends at healed PPL 185.7 against 173.7 ± 6.1, its accuracies within 0.03: within noise.
# Gemma-3's two reverse-order records come from the first study run (session 6, recovered from its documents, no
# training curves kept): today's runs give healed PPL 2706.4 against 2975.5 ± 140.9 (g-reverse-last3) and 3209.6
# against 3427.9 ± 170.0 (g-reverse-lstsq-last3), both within noise. The reverse cut of Gemma-3 is angular's
# (layers 14-17), and g-reverse-lstsq-last3 now equals g-angular-lstsq-last3 in every number (the test below):
# the records' 3427.9 / 3209.6 for one configuration came from two runs of the study (their software states not
# recorded), not from run-to-run variation.
NOISE = {"t1-reverse-lora", "t1-magnitude-l2-lora", "t1-angular-lora", "g-reverse-last3", "g-reverse-lstsq-last3"}
DRIFT = {"t1-magnitude-l1-lora"}


@pytest.mark.parametrize("path,family,name", RERUN, ids=[f"{f}/{n}" for _, f, n in RERUN])
def test_rerun_cells_reproduce_their_records(rs, tmp_path, path, family, name):
    """Each re-run cell reproduces the study script's record to every printed digit (perplexity of every model
    the record has, the seven accuracies), except the cells in NOISE, whose changes are within the noise rule."""
    cell = json.loads((REPO / "docs" / "data" / path).read_text())
    recipe = next(c.recipe for c in _cells(family, tmp_path) if rs.record(family, c.recipe)["name"] == name)
    diff = rs.differences(rs.record(family, recipe), cell["results"])
    if name in DRIFT:  # the un-healed model reproduces; healing does not
        assert all("within noise" in d for d in diff if d.startswith("pruned")) and \
            any("within noise" not in d for d in diff if d.startswith("healed")), diff
        return
    assert all("within noise" in d for d in diff) and bool(diff) == (name in NOISE), diff


def test_two_cells_that_run_one_configuration_give_the_same_numbers():
    """On Gemma-3 the reverse and angular cuts remove the same layers (14-17): with the same lstsq fit and healing,
    the two cells are one configuration run twice by separate processes, and every number they report agrees
    (only the protocol card's tokenizer path, the cell's own folder, differs)."""
    rerun = RECORDS / "rerun" / "gemma3"
    a, b = (json.loads((rerun / f"g-{m}-lstsq-last3.json").read_text()) for m in ("reverse", "angular"))
    assert a["removed_layers"] == b["removed_layers"] == [14, 15, 16, 17]
    assert a["axes"]["prune.metric"] != b["axes"]["prune.metric"]
    for cell in (a, b):
        assert cell["results"]["healed"]["ppl"]["wikitext2"]["card"].pop("tokenizer").endswith("/run/model")
    assert a["results"] == b["results"]


def test_a_rerun_cell_is_checked_against_its_record(rs, tmp_path):
    """Table 4's reverse + lstsq cell, run by a sweep, is Table 3's record to every printed digit; a changed
    number is reported as drift."""
    cell = json.loads((REPO / "docs" / "data" / "table4" / "ade0b435833e.json").read_text())
    recipe = next(c.recipe for c in _cells("smollm2", tmp_path) if rs.record("smollm2", c.recipe)["name"] ==
                  "t3-reverse-lstsq-none")
    rec = rs.record("smollm2", recipe)
    assert rs.differences(rec, cell["results"]) == []
    folder = tmp_path / "study-smollm2" / "cells" / "x"
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "cell.json").write_text(json.dumps(cell))
    keep = tmp_path / "kept"
    assert rs.check(tmp_path, keep) == 0 and (keep / "smollm2" / "t3-reverse-lstsq-none.json").is_file()
    # A change in the printed digits within the noise rule is "noise" (exit 0, kept); beyond it, DRIFT (exit 1).
    noisy = copy.deepcopy(cell)
    noisy["results"]["compensated"]["ppl"]["wikitext2"]["ppl"] += 0.2  # 1358.5 ± 69.9
    noisy["results"]["compensated"]["zero_shot"]["piqa"]["acc"] += 0.01  # ± 0.05
    diff = rs.differences(rec, noisy["results"])
    assert len(diff) == 2 and all("within noise" in d for d in diff)
    (folder / "cell.json").write_text(json.dumps(noisy))
    assert rs.check(tmp_path) == 0
    drifted = copy.deepcopy(cell)
    drifted["results"]["compensated"]["ppl"]["wikitext2"]["ppl"] *= 0.7
    drifted["results"]["compensated"]["zero_shot"]["piqa"]["acc"] -= 0.2
    assert [d.split(": ")[-1] for d in rs.differences(rec, drifted["results"])] == ["better)", "worse)"]
    (folder / "cell.json").write_text(json.dumps(drifted))
    assert rs.check(tmp_path) == 1
