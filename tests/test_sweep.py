"""Sweeps: cells planned from a grid (validated before anything runs), run on every executor into the same
content-addressed folders, shared stages computed once, resumed after a kill, reported as one table."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.sweep import build_sweep, load_sweep, sweep

from conftest import REPO, save_tiny_smol


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    return save_tiny_smol(tmp_path_factory.mktemp("m") / "tiny", smollm2_path)


def _base(model: Path) -> dict:
    return {"name": "tiny", "model": str(model), "prune": {"metric": "reverse", "num_layers": 1},
            "compensate": {"method": "none"}, "heal": {"method": "none"},
            "evaluate": {"tasks": [], "ppl": ["wikitext2"], "ppl_max_tokens": 128, "batch_size": 4},
            "measure": {"enabled": False}}


def _sweep_file(folder: Path, model: Path, small: bool = False, **extra) -> Path:
    grid = {"prune.metric": ["reverse", "magnitude"], **({} if small else {"prune.num_layers": [1, 2]})}
    data = {"name": "t", "base": _base(model), "grid": grid,
            "compare": [{"axis": "prune.metric", "baseline": "reverse"}], **extra}
    f = folder / "sweep.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def test_plan_expands_the_grid_and_dedups(tiny, tmp_path):
    sw = load_sweep(_sweep_file(tmp_path, tiny, cells=[{"prune.metric": "reverse", "prune.num_layers": 1}]))
    assert len(sw.cells) == 4  # the extra cell is the grid's first one: one recipe, one cell
    assert {c.key for c in sw.cells} == {c.key for c in load_sweep(tmp_path / "sweep.yaml").cells}  # stable keys
    assert sw.axes == ["prune.metric", "prune.num_layers"]
    assert sw.cells[0].recipe["prune"]["metric"] == "reverse"


@pytest.mark.parametrize("data,needle", [
    ({"base": {}, "grid": {"prune.metric": "bi"}}, "non-empty list"),
    ({"base": {}, "nosuch": 1}, "unknown key"),
    ({"base": {}, "grid": {"prune.metric": ["nosuch"]}}, "sweep cell [prune.metric=nosuch]"),
    ({"base": {}, "grid": {"heal.method": ["nosuch"]}}, "heal.method=nosuch"),
    ({"base": {}, "executor": {"workers": 0}}, "executor.workers"),
    ({"base": {}, "executor": {"nosuch": 1}}, "unknown executor key"),
    ({"base": {}, "compare": [{"axis": "prune.metric"}]}, "compare"),
    ({"base": "/nonexistent.yaml"}, "base recipe not found"),
    ({"base": {}, "pilot": {"lrs": []}}, "pilot.lrs"),
    ({"base": {}, "pilot": {"lrs": [1e-3], "scope": "run"}}, "pilot.scope"),
    ({"base": {}, "pilot": {"lrs": [1e-3], "steps": 0}}, "pilot.steps"),
    ({"base": {}, "pilot": {"lrs": [1e-3, 1e-4], "max_candidates": 1}}, "max_candidates"),
    ({"base": {}, "pilot": {"lrs": [1e-3], "nosuch": 1}}, "unknown pilot key"),
    ({"base": {}, "grid": {"prune.metric": ["bi"]}, "compare": [{"axis": "prune.metric", "baseline": "bi",
                                                                  "stage": "nosuch"}]}, "compare 'stage'"),
    ({"base": {}, "cells": {"Table 1": {"prune.metric": "bi"}}}, "group names"),
])
def test_bad_sweep_files_refused_before_any_cell(data, needle, tiny, tmp_path):
    if isinstance(data.get("base"), dict):
        data["base"] = _base(tiny)
    with pytest.raises(LayerpruneError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build_sweep(data, tmp_path, [])


def test_cli_refusal_is_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"base": _base(tiny), "grid": {"prune.metric": ["nosuch"]}}))
    capsys.readouterr()
    assert main(["sweep", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0]
    assert not (tmp_path / "o").exists()


def _table(out: Path) -> dict:
    return {json.dumps(r["axes"], sort_keys=True): (r["status"], r.get("ppl")) for r in
            json.loads((out / "sweep.json").read_text())["cells"]}


def test_local_sweep_shares_work_reports_and_resumes(tiny, tmp_path, data_dir):
    f = _sweep_file(tmp_path, tiny)
    out = tmp_path / "out"
    s = sweep(f, out, workers=2, overrides=[f"data_dir={data_dir}"], log=lambda m: None)
    assert all(r["status"] == "done" and r["ppl"] for r in s["cells"])
    # Every cell evaluates the same dense model: computed once, read by the other three.
    # (two workers start two cells at once: the second waits on the stage's lock and links the published copy)
    assert s["shared_work"]["eval-dense"] == {"computed": 1, "shared": 3}
    # A shared stage's files are hard links to the one stored copy, not a copy per cell.
    stored = next((out / "shared").glob("eval-dense-*")) / "eval.json"
    linked = [d / "run" / "eval-dense" / "eval.json" for d in (out / "cells").iterdir()]
    assert sum(f.stat().st_ino == stored.stat().st_ino for f in linked) >= 3
    md = (out / "sweep.md").read_text()
    assert "| prune.metric | prune.num_layers |" in md and "## Findings" in md
    assert len(s["findings"]) == 1 and "prune.metric=magnitude" in s["findings"][0]
    # Same ppl for the same cut: num_layers=1 of reverse and magnitude may differ, but a re-run is identical.
    before = _table(out)
    s2 = sweep(f, out, resume=True, overrides=[f"data_dir={data_dir}"], log=lambda m: None)
    assert _table(out) == before and s2["wall_s"] < 5  # every cell finished: nothing ran
    with pytest.raises(LayerpruneError, match="not empty"):
        sweep(f, out, overrides=[f"data_dir={data_dir}"], log=lambda m: None)


def test_cells_listing_other_models_share_each_models_evaluation(tiny, tmp_path, data_dir):
    # The evaluation of a model does not depend on which other models a cell evaluates (Tables 1-3 list
    # different ones): the dense and pruned evaluations are computed once for the two cells.
    f = _sweep_file(tmp_path, tiny, small=True)
    data = yaml.safe_load(f.read_text())
    data.update(grid={"evaluate.models": [["dense", "pruned"], ["pruned", "dense", "healed"]]}, compare=[])
    f.write_text(yaml.safe_dump(data))
    s = sweep(f, tmp_path / "out", executor="serial", overrides=[f"data_dir={data_dir}"], log=lambda m: None)
    assert [r["status"] for r in s["cells"]] == ["done", "done"]
    assert s["shared_work"]["eval-dense"] == s["shared_work"]["eval-pruned"] == {"computed": 1, "shared": 1}
    a, b = (json.loads((tmp_path / "out" / "cells" / c["key"] / "cell.json").read_text())["results"]
            for c in s["cells"])
    assert a["pruned"] == b["pruned"] and a["dense"] == b["dense"]


def test_a_stage_claimed_by_another_run_is_waited_for_not_recomputed(tmp_path):
    from filelock import FileLock

    from layerprune.recipe.state import RunState

    calls, logs = [], []

    def stage(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "f.txt").write_text("x")
        return {"v": 1}

    a = RunState(tmp_path / "a", False, logs.append, shared=tmp_path / "shared")
    a.run("score", {"i": 1}, stage)
    b = RunState(tmp_path / "b", False, logs.append, shared=tmp_path / "shared")
    store = next((tmp_path / "shared").glob("score-*"))
    lock = FileLock(str(store.parent / f".{store.name}.lock"))
    lock.acquire()  # another run holds the stage: b waits until it is released, then links the published copy
    import threading

    t = threading.Thread(target=lambda: b.run("score", {"i": 1}, stage))
    t.start()
    t.join(1.0)
    assert t.is_alive() and any(m.startswith("[wait] score") for m in logs)
    lock.release()
    t.join(10)
    assert not t.is_alive() and calls == [1] and b.stages["score"]["shared"]
    assert (tmp_path / "b" / "score" / "f.txt").read_text() == "x"


def test_a_cell_evaluates_its_own_models_while_another_evaluates_a_shared_one(tiny, tmp_path, data_dir):
    """A cell whose dense evaluation another run is computing evaluates its pruned model first, then links the
    dense one (instead of idling on the lock)."""
    import threading

    from filelock import FileLock

    from layerprune.recipe.runner import run_recipe

    shared, logs = tmp_path / "shared", []
    recipe = {**_base(tiny), "data_dir": str(data_dir)}
    recipe["evaluate"] = {**recipe["evaluate"], "models": ["dense", "pruned"]}
    run_recipe(recipe, tmp_path / "a", log=lambda m: None, shared=shared)
    store = next(shared.glob("eval-dense-*"))
    lock = FileLock(str(store.parent / f".{store.name}.lock"))
    lock.acquire()  # as if another cell were evaluating the dense model now
    other = {**recipe, "prune": {**recipe["prune"], "metric": "magnitude"}}
    t = threading.Thread(target=lambda: run_recipe(other, tmp_path / "b", log=logs.append, shared=shared))
    t.start()
    for _ in range(600):
        if any(m.startswith("[wait] eval-dense") for m in logs):
            break
        t.join(0.1)
    lock.release()
    t.join(60)
    assert not t.is_alive()
    order = [m.split(" (")[0] for m in logs if "eval-" in m]
    # (on the old code: [wait] eval-dense, then eval-pruned after it)
    assert order == ["[run ] eval-pruned", "[wait] eval-dense", "[shared] eval-dense"]  # linked, not recomputed


def _executors() -> list:
    """Every registered executor but the in-process one; those on an outside engine (their own ``check``) run
    in the slow suite, and are skipped, saying why, where the engine is not installed."""
    from layerprune.sweep.executors import EXECUTORS

    out = []
    for name, cls in EXECUTORS.items():
        if name == "serial":  # runs cells in this process: the reference the others are compared with
            continue
        try:
            cls.check()
            missing = None
        except LayerpruneError as e:
            missing = str(e)
        outside = "check" in vars(cls)  # it checks for an engine of its own
        marks = [pytest.mark.slow] * outside + [pytest.mark.skip(reason=missing)] * bool(missing)
        out.append(pytest.param(name, id=name, marks=marks))
    return out


RESUME_ON = _executors()


@pytest.mark.parametrize("resume_on", RESUME_ON)
def test_killed_sweep_resumes_to_the_same_records(tiny, tmp_path, data_dir, resume_on):
    """SIGKILL while the second cell runs; --resume (on each executor) finishes it with the same records as an
    uninterrupted run."""
    f = _sweep_file(tmp_path, tiny, executor={"slurm": {"cluster": "local", "time_min": 10}})
    ref = tmp_path / "ref"
    sweep(f, ref, overrides=[f"data_dir={data_dir}"], log=lambda m: None)
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "import layerprune.sweep.core as core\n"
        "real = core.run_cell\n"
        "n = {'c': 0}\n"
        "def cell(**kw):\n"
        "    n['c'] += 1\n"
        "    if n['c'] == 2:\n"
        "        import layerprune.recipe.state as st\n"
        "        r = st.RunState.run\n"
        "        def die(self, name, *a, **k):\n"
        "            out = r(self, name, *a, **k)\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        st.RunState.run = die\n"
        "    return real(**kw)\n"
        "core.run_cell = cell\n"
        "from layerprune.sweep import sweep\n"
        f"sweep({str(f)!r}, {str(out)!r}, workers=1, overrides=['data_dir={data_dir}'], log=print)\n"
    )
    # workers=1 still runs cells in a spawned worker: patch inside it through an in-process executor instead.
    r = subprocess.run([sys.executable, "-c", code.replace("workers=1", "executor='serial'")], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    done = [d for d in (out / "cells").iterdir() if (d / "cell.json").is_file()]
    assert len(done) == 1
    assert main(["sweep", str(f), "--out", str(out), "--resume", "--data-dir", str(data_dir),
                 "--executor", resume_on]) == 0
    assert _table(out) == _table(ref)


@pytest.mark.parametrize("executor", RESUME_ON)
def test_sigterm_stops_a_sweep_and_its_workers(tiny, tmp_path, data_dir, executor):
    """SIGTERM to `layerprune sweep` mid-cell: it exits 143 at once, the processes running its cells are gone
    (local: the pool's own shutdown would wait for them; slurm: the array's jobs are cancelled; ray: the local
    instance is shut down), no cell is marked finished, and --resume runs the sweep to the end."""
    import time

    import psutil

    f = _sweep_file(tmp_path, tiny, small=True, executor={"slurm": {"cluster": "local", "time_min": 10}})
    data = yaml.safe_load(f.read_text())
    heal = {"method": "partial", "layers": "last1", "max_steps": 4000, "batch_size": 2, "micro_batch_size": 2,
            "eval_steps": 4000, "val_size": 4, "max_train_samples": 8, "warmup_steps": 1, "cutoff_len": 48}
    data["base"]["heal"] = heal  # minutes of healing: long enough to be stopped mid-cell
    f.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "layerprune", "sweep", str(f), "--out", str(out), "--workers", "2",
           "--data-dir", str(data_dir), "--executor", executor]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while len([p for p in out.glob("cells/*/run/.model.checkpoints")]) < 2 and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143 and "terminated" in (proc.stderr.read() if proc.stderr else "")
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers left running: {alive}"
    assert not list(out.glob("cells/*/cell.json"))
    data["base"]["heal"] = {**heal, "max_steps": 2, "eval_steps": 2}  # resume (a new recipe: fresh cells) finishes
    f.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(f), "--out", str(out), "--resume", "--data-dir", str(data_dir)]) == 0


@pytest.fixture(scope="module")
def serial_ref(tiny, tmp_path_factory, data_dir):
    """The two-cell sweep run in this process: what every executor must reproduce."""
    folder = tmp_path_factory.mktemp("serial")
    sweep(_sweep_file(folder, tiny, small=True), folder / "out", executor="serial",
          overrides=[f"data_dir={data_dir}"], log=lambda m: None)
    return _table(folder / "out")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (pip install '.[ray]')")
def test_ray_executor_writes_the_same_cells(tiny, tmp_path, data_dir, serial_ref):
    """Against a local Ray instance with 2 CPUs (one task per cell)."""
    f = _sweep_file(tmp_path, tiny, small=True)
    s = sweep(f, tmp_path / "ray", executor="ray", workers=2, overrides=[f"data_dir={data_dir}"], log=lambda m: None)
    assert all(r["status"] == "done" for r in s["cells"])
    assert _table(tmp_path / "ray") == serial_ref


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit not installed (pip install '.[slurm]')")
def test_slurm_executor_through_submitit_local(tiny, tmp_path, data_dir, serial_ref):
    """A submitit job array through submitit's local executor (the same code path as Slurm but the cluster)."""
    f = _sweep_file(tmp_path, tiny, small=True, executor={"slurm": {"cluster": "local", "time_min": 10}})
    s = sweep(f, tmp_path / "slurm", executor="slurm", workers=2, overrides=[f"data_dir={data_dir}"],
              log=lambda m: None)
    assert all(r["status"] == "done" for r in s["cells"])
    assert (tmp_path / "slurm" / "submitit").is_dir()
    assert _table(tmp_path / "slurm") == serial_ref


def test_report_states_accuracy_groups_agreement_and_the_noise_rule(tiny, tmp_path):
    """The report reads finished cells only: Avg Acc ± stderr over the single tasks (MMLU, a group, beside it),
    KL/top-1, the protocol card, and the noise rule's verdicts on log-PPL and Avg Acc."""
    from layerprune.sweep.report import verdict, write_report

    sw = build_sweep({"base": _base(tiny), "grid": {"prune.metric": ["reverse", "bi", "angular"]},
                      "compare": [{"axis": "prune.metric", "baseline": "reverse"}]}, tmp_path, [])
    card = {"dataset": "wikitext2", "split": "test", "preset": "seed", "seq_len": 128, "windows": 256}

    def result(ppl, se, accs):
        tasks = {f"t{i}": {"kind": "task", "acc": a, "acc_stderr": 0.05} for i, a in enumerate(accs)}
        tasks["mmlu"] = {"kind": "group", "acc": 0.3, "acc_stderr": 0.04}
        return {"healed": {"ppl": {"wikitext2": {"ppl": ppl, "ppl_stderr": se, "card": card}}, "zero_shot": tasks,
                           "compare": {"wikitext2": {"kl_teacher_pruned": 1.5, "top1_agreement": 0.4}}}}

    values = {"reverse": result(400.0, 16.0, [0.5, 0.3]), "bi": result(120.0, 4.0, [0.52, 0.31]),
              "angular": result(390.0, 16.0, [0.8, 0.7])}
    for c in sw.cells:
        d = tmp_path / "out" / "cells" / c.key
        d.mkdir(parents=True)
        (d / "cell.json").write_text(json.dumps({"ok": True, "seconds": 10.0,
                                                 "results": values[c.axes["prune.metric"]]}))
    s = write_report(sw, tmp_path / "out", {}, None, "local")
    row = next(r for r in s["cells"] if r["axes"]["prune.metric"] == "reverse")
    assert row["avg_acc"] == pytest.approx(0.4) and row["avg_tasks"] == 2  # MMLU is not in the average
    assert row["avg_acc_stderr"] == pytest.approx((2 * 0.05 ** 2) ** 0.5 / 2)
    assert row["groups"]["mmlu"] == (0.3, 0.04) and row["kl"] == 1.5
    bi, ang = s["findings"][0], s["findings"][1]
    assert "prune.metric=bi" in bi and "PPL 120 vs 400" in bi and "**better**" in bi.split(";")[0]
    assert "**within noise**" in bi.split(";")[1]  # +1.5 points against 2σ of 10
    assert "**within noise**" in ang.split(";")[0] and "**better**" in ang.split(";")[1]  # 390 vs 400; +35 points
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "| prune.metric | model | PPL | Avg Acc % (2 tasks) | mmlu % | KL | top-1 % |" in md
    assert "| reverse | healed | 400 ± 16 | 40.0 ± 3.5 | 30.0 ± 4.0 | 1.5 | 40.0 |" in md
    assert "the same for every cell" in md and "preset seed, seq_len 128" in md and "Noise rule" in md
    assert (verdict(0.11, 0.05), verdict(-0.11, 0.05), verdict(0.09, 0.05)) == ("better", "worse", "within noise")


def test_report_states_each_perplexity_protocol_and_compares_only_within_one(tiny, tmp_path):
    from layerprune.sweep.report import write_report

    sw = build_sweep({"base": _base(tiny), "grid": {"prune.metric": ["reverse", "bi", "angular"]},
                      "compare": [{"axis": "prune.metric", "baseline": "reverse"}]}, tmp_path, [])
    cards = {"reverse": 128, "bi": 128, "angular": 256}  # angular's perplexity over longer windows
    for c in sw.cells:
        m = c.axes["prune.metric"]
        card = {"dataset": "wikitext2", "split": "test", "seq_len": cards[m], "tokenizer": f"/cells/{m}"}
        d = tmp_path / "out" / "cells" / c.key
        d.mkdir(parents=True)
        (d / "cell.json").write_text(json.dumps({"ok": True, "results": {"pruned": {"ppl": {"wikitext2": {
            "ppl": 100.0 if m == "reverse" else 50.0, "ppl_stderr": 1.0, "card": card}}}}}))
    s = write_report(sw, tmp_path / "out", {}, None, "local")
    bi, ang = s["findings"]
    assert "**better**" in bi and "not comparable" not in bi  # same protocol (the tokenizer path aside)
    assert "**not comparable**" in ang and "better" not in ang
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "protocols differ** (2 protocols)" in md
    assert "- dataset wikitext2, split test, seq_len 128: prune.metric=reverse; prune.metric=bi" in md
    assert "- dataset wikitext2, split test, seq_len 256: prune.metric=angular" in md


def test_pilot_grows_the_grid_to_a_tested_optimum():
    from layerprune.sweep.pilot import Group, PilotSpec

    spec = PilotSpec([1e-3, 3e-3], max_candidates=4)
    g = Group("k", "k", {})
    g.losses = {1e-3: 4.0}
    assert g.next_rate(spec) is None  # a candidate of the grid is still to run
    g.losses[3e-3] = 3.5
    assert g.next_rate(spec) == 9e-3  # the best is the largest rate: try the next one up
    g.losses[9e-3] = 3.9
    assert g.next_rate(spec) is None and g.best() == 3e-3  # an interior optimum stands
    g.losses = {1e-3: 3.0, 3e-3: 3.5}
    assert g.next_rate(spec) == pytest.approx(3.33e-4)  # the smallest is best: one step down
    g.losses = {1e-3: None, 3e-3: None}
    assert g.best() is None and g.next_rate(spec) is None  # every candidate failed: no choice


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory, smollm2_path):
    """A tiny random llama with the real SmolLM2 tokenizer (real healing text is meaningful to it)."""
    return save_tiny_smol(tmp_path_factory.mktemp("ts") / "tiny-smol", smollm2_path)


def _healing_sweep(folder: Path, model: Path, scope: str) -> Path:
    base = {**_base(model), "heal": {"method": "partial", "layers": "last1", "max_steps": 2, "batch_size": 2,
                                      "micro_batch_size": 2, "eval_steps": 2, "val_size": 4,
                                      "max_train_samples": 8, "warmup_steps": 1, "cutoff_len": 48}}
    data = {"name": "p", "base": base, "grid": {"prune.metric": ["reverse", "magnitude"]},
            "cells": {"fixed rate": [{"prune.metric": "reverse", "heal.lr": 5.0e-3}]},
            "pilot": {"lrs": [1.0e-4, 1.0e-2], "steps": 2, "warmup_steps": 1, "max_candidates": 3, "scope": scope}}
    f = folder / f"pilot-{scope}.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


@pytest.mark.parametrize("scope", ["cell", "method"])
def test_learning_rate_pilot_chooses_per_cell_or_method_and_resumes(tiny_smol, tmp_path, data_dir, scope):
    """Each piloted cell heals at its group's lowest-validation-loss rate; the grid grows past an edge optimum;
    a cell whose rate the file fixes is not piloted; a re-launch runs no candidate again."""
    f = _healing_sweep(tmp_path, tiny_smol, scope)
    out = tmp_path / "out"
    logs: list[str] = []
    s = sweep(f, out, executor="serial", overrides=[f"data_dir={data_dir}"], log=logs.append)
    pilot = json.loads((out / "pilot.json").read_text())
    assert len(pilot["groups"]) == (2 if scope == "cell" else 1)
    for g in pilot["groups"].values():
        losses = {float(k): v for k, v in g["losses"].items()}
        assert len(losses) == 3  # two rates, and a third beyond whichever edge won
        ok = {k: v for k, v in losses.items() if v is not None}  # (a rate of 1 diverges: a failed candidate)
        assert g["chosen"] == min(ok, key=ok.get) and g["val_loss_before"] is not None
    chosen = {c["axes"]["prune.metric"]: c["pilot_lr"] for c in s["cells"] if "heal.lr" not in c["axes"]}
    assert set(chosen.values()) <= {g["chosen"] for g in pilot["groups"].values()} and None not in chosen.values()
    for c in s["cells"]:
        ran = yaml.safe_load((out / "cells" / c["key"] / "run" / "recipe.yaml").read_text())["heal"]["lr"]
        assert c["status"] == "done" and ran == (5.0e-3 if "heal.lr" in c["axes"] else c["pilot_lr"])
    assert not any((d / "run").exists() for d in (out / "pilot").iterdir())  # only the records are kept
    md = (out / "sweep.md").read_text()
    assert "## Learning-rate pilot" in md and "lr (pilot)" in md and "## fixed rate" in md
    assert (out / "sweep-curves.png").is_file()
    logs.clear()
    s2 = sweep(f, out, executor="serial", resume=True, overrides=[f"data_dir={data_dir}"], log=logs.append)
    assert not any(m.startswith("pilot:") for m in logs) and "0 to run" in " ".join(logs)
    assert [c["pilot_lr"] for c in s2["cells"]] == [c["pilot_lr"] for c in s["cells"]]
    s3 = sweep(f, out, report_only=True, overrides=[f"data_dir={data_dir}"], log=logs.append)
    assert [c["status"] for c in s3["cells"]] == ["done"] * 3


def test_pilot_file_keeps_other_launches_groups(tmp_path):
    """Two launches with different cells into one folder: each adds its groups to pilot.json."""
    from layerprune.sweep.pilot import Group, PilotSpec, read_choices, write_pilot

    spec = PilotSpec([1e-3])
    a, b = Group("a", "a", {}, losses={1e-3: 2.0}), Group("b", "b", {}, losses={1e-3: 3.0})
    write_pilot(tmp_path, {"a": a}, spec, {"a": 1e-3}, set())
    write_pilot(tmp_path, {"b": b}, spec, {"b": 1e-3}, set())
    assert read_choices(tmp_path) == {"a": 1e-3, "b": 1e-3}


def test_report_has_a_table_per_group_and_states_constant_axes_once(tiny, tmp_path):
    from layerprune.sweep.report import write_report

    sw = build_sweep({"base": _base(tiny), "cells": {
        "First": [{"prune.metric": "bi", "prune.num_layers": 2}, {"prune.metric": "angular", "prune.num_layers": 2}],
        "Second": [{"prune.metric": "reverse"}]}, "compare": [{"axis": "prune.num_layers", "baseline": 1}]},
        tmp_path, [])
    for c in sw.cells:
        d = tmp_path / "out" / "cells" / c.key
        d.mkdir(parents=True)
        (d / "cell.json").write_text(json.dumps({"ok": True, "seconds": 1.0, "results": {
            "pruned": {"ppl": {"wikitext2": {"ppl": 100.0, "ppl_stderr": 1.0}}}}}))
    md = (write_report(sw, tmp_path / "out", {}, None, "local"), (tmp_path / "out" / "sweep.md").read_text())[1]
    first, second = md.split("## First")[1].split("## Second")
    assert "Every cell here: prune.num_layers=2." in first and "| prune.metric | model |" in first
    assert "Every cell here" not in second and "| reverse | pruned | 100 ± 1 |" in second
    # The compared axis is read from the recipes: the reverse cell inherits the base's 1 and is the baseline.
    assert "prune.num_layers=2 against prune.num_layers=1" in md and "**within noise**" in md


def test_only_runs_the_selected_cells_and_their_pilots_and_reports_every_cell(tiny_smol, tmp_path, data_dir):
    """``--only``: the selected cells run (with only their own pilot groups); the others are listed as not run;
    a later launch of the whole sweep keeps the selected cells (same folders) and runs the rest."""
    f = _healing_sweep(tmp_path, tiny_smol, "cell")
    out, logs = tmp_path / "out", []
    s = sweep(f, out, executor="serial", only=["prune.metric=magnitude"], overrides=[f"data_dir={data_dir}"],
              log=logs.append)
    status = {json.dumps(c["axes"], sort_keys=True): c["status"] for c in s["cells"]}
    assert sorted(status.values()) == ["done", "not run", "not run"]
    assert status['{"prune.metric": "magnitude"}'] == "done"
    assert len(json.loads((out / "pilot.json").read_text())["groups"]) == 1  # the reverse cell's group: not piloted
    assert "1 to run (1 selected by --only)" in " ".join(logs)
    assert "| not run |" in (out / "sweep.md").read_text()
    done = next(c["key"] for c in s["cells"] if c["status"] == "done")
    logs.clear()
    s2 = sweep(f, out, executor="serial", resume=True, overrides=[f"data_dir={data_dir}"], log=logs.append)
    assert [c["status"] for c in s2["cells"]] == ["done"] * 3
    assert "1 finished, 2 to run" in " ".join(logs) and done in {c["key"] for c in s2["cells"]}
    assert len(json.loads((out / "pilot.json").read_text())["groups"]) == 2


@pytest.mark.parametrize("only,needle", [
    (["prune.metric"], "must look like KEY=VALUE"),
    (["prune.nosuch=1"], "no cell's recipe has the key 'prune.nosuch'"),
    (["prune.metric=bi"], "no cell of the sweep matches"),
    (["prune.metric=reverse", "prune.num_layers=3"], "no cell of the sweep matches"),
])
def test_only_refuses_a_selection_of_nothing_before_any_work(only, needle, tiny, tmp_path):
    with pytest.raises(LayerpruneError, match=needle):
        sweep(_sweep_file(tmp_path, tiny), tmp_path / "out", only=only, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_only_selects_by_recipe_values(tiny, tmp_path):
    from layerprune.sweep.spec import select

    cells = load_sweep(_sweep_file(tmp_path, tiny)).cells
    assert len(select(cells, [])) == 4
    assert {(c.recipe["prune"]["metric"], c.recipe["prune"]["num_layers"])
            for c in select(cells, ["prune.num_layers=2"])} == {("reverse", 2), ("magnitude", 2)}
    # A key given twice: either value; different keys: both.
    assert len(select(cells, ["prune.metric=reverse", "prune.metric=magnitude", "prune.num_layers=1"])) == 2
    assert len(select(cells, ["heal.method=none"])) == 4  # a value the cells inherit from the base counts


def test_cli_only_with_report_is_refused(tiny, tmp_path, capsys):
    f = _sweep_file(tmp_path, tiny)
    capsys.readouterr()
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--report", "--only", "prune.metric=reverse"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only" in err[0]
    assert main(["sweep", str(f), "--out", str(tmp_path / "o"), "--only", "prune.metric"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err and not (tmp_path / "o").exists()
