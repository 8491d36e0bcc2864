"""Healing beyond one process: ``torchrun`` and ``accelerate launch`` with 2 CPU processes (gloo) heal a tiny model
to the validation loss of one process at the same global batch, with one output written (by rank 0).
(``accelerate launch --cpu`` uses its single-process launcher; ``--multi_gpu`` is its multi-process launcher,
which on a machine without GPUs joins the processes with gloo.)"""
# The HEAL flags give each process micro-batches of 2; the single-process reference takes the global batch of 4
# at once.

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROWS, save_tiny

pytestmark = pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                                reason="torchrun not installed with torch")
# Global batch 4 = micro-batch 2 x 2 accumulation steps (1 process) = 2 x 1 x 2 processes.
HEAL = ["--method", "partial", "--layers", "last1", "--max-steps", "4", "--batch-size", "4", "--micro-batch-size",
        "2", "--eval-steps", "2", "--warmup-steps", "0", "--lr", "1e-2", "--val-size", "8", "--no-packing",
        "--logging-steps", "1", "--no-shuffle"]  # the same samples in every global batch, whatever the world size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return save_tiny(root / "m", "llama"), data


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _val(out: Path) -> float:
    return json.loads((out / "heal.json").read_text())["final_val_loss"]


def _single(setup, tmp_path) -> float:
    model, data = setup
    from layerprune.cli import main

    # The whole global batch as one micro-batch (2 accumulation steps pad differently: 3e-4 apart on this model).
    assert main(["heal", str(model), "--out", str(tmp_path / "one"), "--data", str(data), *HEAL,
                 "--micro-batch-size", "4"]) == 0
    return _val(tmp_path / "one")


def test_torchrun_two_processes_reach_the_single_process_loss(setup, tmp_path):
    model, data = setup
    bin_dir = Path(sys.executable).parent
    exe = str(bin_dir / "layerprune")
    cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", exe]
    out = tmp_path / "two"
    r = subprocess.run([*cmd, "heal", str(model), "--out", str(out), "--data", str(data), *HEAL],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    heal = json.loads((out / "heal.json").read_text())
    assert heal["world_size"] == 2 and heal["global_batch"] == 4 and heal["grad_accum"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name in ("two", "one") or p.name.startswith(".two")] == \
        ["two"]  # one output, no leftovers
    # Before the fix, the validation pass before training left the model without its DDP wrapper: each rank
    # trained on its own half of the batch (4.631 here instead of 4.782).
    assert _val(out) == pytest.approx(_single(setup, tmp_path), rel=2e-5)


def test_accelerate_launch_two_processes_reach_the_single_process_loss(setup, tmp_path):
    """The same through ``accelerate launch`` (its multi-process launcher; on a machine without GPUs the
    processes join with gloo on CPU)."""
    model, data = setup
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "two"
    cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(bin_dir / "layerprune")]
    r = subprocess.run([*cmd, "heal", str(model), "--out", str(out), "--data", str(data), *HEAL],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    heal = json.loads((out / "heal.json").read_text())
    assert heal["world_size"] == 2 and heal["global_batch"] == 4 and heal["grad_accum"] == 1
    assert _val(out) == pytest.approx(_single(setup, tmp_path), rel=2e-5)


def test_heal_processes_launches_torchrun_itself(setup, tmp_path):
    """``layerprune heal --processes 2`` runs the same two-process heal without a launcher in front of it."""
    model, data = setup
    from layerprune.cli import main

    out = tmp_path / "two"
    assert main(["heal", str(model), "--out", str(out), "--data", str(data), *HEAL, "--processes", "2"]) == 0
    heal = json.loads((out / "heal.json").read_text())
    assert heal["world_size"] == 2 and heal["global_batch"] == 4
    assert _val(out) == pytest.approx(_single(setup, tmp_path), rel=2e-5)


def test_a_recipe_heals_under_torchrun_to_the_same_stage(setup, tmp_path):
    """A recipe run (a sweep cell) with ``heal_processes=2``: the heal stage has the fingerprint and, within the
    two-process tolerance, the validation loss of the one-process run; a refusal inside the ranks is one line."""
    from layerprune.errors import LayerpruneError
    from layerprune.recipe import run_recipe

    model, data = setup
    r = {"name": "d", "model": str(model), "prune": {"metric": "reverse", "num_layers": 1},
         "heal": {"method": "partial", "layers": "last1", "data": str(data), "max_steps": 4, "batch_size": 4,
                  "micro_batch_size": 2, "eval_steps": 2, "warmup_steps": 0, "lr": 1e-2, "val_size": 8,
                  "packing": False, "shuffle": False},
         "evaluate": {"models": []}, "measure": {"enabled": False}}
    one = run_recipe(r, tmp_path / "one", log=lambda m: None)
    two = run_recipe(r, tmp_path / "two", log=lambda m: None, heal_processes=2)
    assert two["heal"]["world_size"] == 2 and one["heal"]["world_size"] == 1
    assert two["stages"]["model"]["fingerprint"] == one["stages"]["model"]["fingerprint"]
    assert two["heal"]["final_val_loss"] == pytest.approx(one["heal"]["final_val_loss"], rel=1e-3)
    with pytest.raises(LayerpruneError, match=r"torchrun \(2 processes\) failed: --fsdp is for full and partial"):
        run_recipe({**r, "heal": {**r["heal"], "method": "lora", "fsdp": "full_shard"}}, tmp_path / "bad",
                   log=lambda m: None, heal_processes=2)
