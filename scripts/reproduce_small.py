"""Lu et al. (2024) at small scale: studies/seed-tables.yaml (SmolLM2-135M, Tables 1-3) and studies/gemma3.yaml as
sweeps, and their committed records (docs/data/reproduce-small/<family>/<name>.json). ``run``: both sweeps,
resumable (runs/study-*), then ``check``: each finished cell against its record (a match is kept as the tests'
evidence, in rerun/<family>/); ``report``: the records through the sweep report (no model runs)."""
import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from layerprune.run_manifest import STAGES
from layerprune.sweep import load_sweep, sweep
from layerprune.sweep.core import CELL_FILE, PLAN_FILE, resolve_pilot
from layerprune.sweep.report import changes

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "data" / "reproduce-small"
STUDIES = {"smollm2": "seed-tables.yaml", "gemma3": "gemma3.yaml"}


def record(family: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """The committed record of the configuration a recipe runs: g-, t1- (LoRA), t2- (partial) or t3- (lstsq), then
    the metric, the compensation and the healing (t1-magnitude-l2-lora, t3-reverse-lstsq-distill, ...)."""
    p, h, lstsq = recipe["prune"], recipe["heal"], recipe["compensate"]["method"] == "lstsq"
    metric = p["metric"] + (f"-l{p['metric_params']['p']}" if p["metric"] == "magnitude" else "")
    table = "g" if family == "gemma3" else "t3" if lstsq else "t1" if h["method"] == "lora" else "t2"
    name = f"{table}-{metric}{'-lstsq' if lstsq else ''}-{h['layers'] if h['method'] == 'partial' else h['method']}"
    return {"name": name, "family": family, **json.loads((RECORDS / family / f"{name}.json").read_text())}


def as_results(rec: dict[str, Any]) -> dict[str, Any]:
    """A record's numbers as a sweep cell's results (accuracy and agreement: the final model's; dense: its own)."""
    zs = {t: {**v, "kind": "task"} for t, v in rec["zero_shot"]["tasks"].items()}
    zs.update({t: {**v, "kind": "group"} for t, v in (rec.get("mmlu") or {}).get("tasks", {}).items()})
    out = {stage: {"ppl": {"wikitext2": v}} for stage, v in rec["ppl"].items()}
    out["dense"] = {"ppl": {"wikitext2": json.loads((RECORDS / rec["family"] / "dense.json").read_text())["ppl"]}}
    agreement = {"wikitext2": (rec.get("compare") or {}).get("text", {})}
    out[max(rec["ppl"], key=STAGES.index)].update(zero_shot=zs, compare=agreement)
    return out


def differences(rec: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """How a cell's results differ from its record (the record's own models), with the noise rule's verdicts."""
    return changes(as_results(rec), results, rec["ppl"], "record")


def report(out: Path, publish: Path | None = RECORDS) -> int:
    """Each study's report from the committed records (no model runs): their numbers in the sweep's tables."""
    for family, study in STUDIES.items():
        sw, folder = load_sweep(REPO / "studies" / study), out / f"records-{family}"
        shutil.rmtree(folder, ignore_errors=True)
        resolve_pilot(sw, folder)  # the recorded pilot's rates
        for c in sw.cells:
            rec = record(family, c.recipe)
            (folder / "cells" / c.key).mkdir(parents=True)
            (folder / "cells" / c.key / CELL_FILE).write_text(json.dumps(
                {"ok": True, "axes": c.axes, "seconds": rec.get("wall_s"), "results": as_results(rec)}))
        (folder / PLAN_FILE).write_text("{}")
        sweep(REPO / "studies" / study, folder, report_only=True)
        for f in ("sweep.md", "sweep.png") if publish else ():
            shutil.copy(folder / f, publish / family / f)
    return 0


def check(out: Path, keep: Path | None = None) -> int:
    """Each finished cell against its record: same, noise (only changes within the noise rule) or DRIFT (exit 1);
    ``keep``: the cells that are not DRIFT, as keep/<family>/<record>.json (the tests' evidence)."""
    drift = 0
    for family in STUDIES:
        for cell in sorted((out / f"study-{family}" / "cells").glob(f"*/{CELL_FILE}")):
            rec = record(family, yaml.safe_load((cell.parent / "run" / "recipe.yaml").read_text()))
            diff = differences(rec, json.loads(cell.read_text())["results"])
            status = "DRIFT" if any("within noise" not in d for d in diff) else "noise" if diff else "same "
            drift += status == "DRIFT"
            print(f"{status} {family}/{rec['name']}" + "".join(f"; {d}" for d in diff))
            if keep and status != "DRIFT":
                (keep / family).mkdir(parents=True, exist_ok=True)
                shutil.copy(cell, keep / family / f"{rec['name']}.json")
    return 1 if drift else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "check", "report"])
    ap.add_argument("--out", type=Path, default=REPO / "runs", help="the sweeps' folder (OUT/study-<family>)")
    ap.add_argument("--executor", default="local", help="local, ray, slurm (the sweeps' executor)")
    args = ap.parse_args()
    for family, study in STUDIES.items() if args.what == "run" else ():
        sweep(REPO / "studies" / study, args.out / f"study-{family}", executor=args.executor, resume=True)
    return report(args.out) if args.what == "report" else check(args.out, RECORDS / "rerun")


if __name__ == "__main__":
    raise SystemExit(main())
