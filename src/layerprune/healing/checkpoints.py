"""Training checkpoints that survive a kill anywhere: which are complete, which to resume from.

The Trainer writes ``checkpoint-N`` in place, file by file, so a kill during a save leaves a folder that looks
like a checkpoint but is not one (empty, or a 0-byte ``optimizer.pt``). ``--resume`` takes the newest
checkpoint that passes :func:`incomplete_reason` and removes the newer, broken ones.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

PREFIX = "checkpoint-"
# Written by the Trainer at every save (save_only_model=False): the state a bit-identical resume needs.
_TORCH_FILES = ("optimizer.pt", "scheduler.pt")
_STATE = "trainer_state.json"


def checkpoints(folder: str | Path) -> list[Path]:
    """``checkpoint-N`` folders under ``folder``, oldest step first."""
    out = [p for p in Path(folder).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(out, key=lambda p: int(p.name[len(PREFIX):]))


def _safetensors_ok(f: Path) -> bool:
    """Header parses and the file is as long as its last tensor's end offset."""
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return f.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def incomplete_reason(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when every file it needs is whole."""
    try:
        state = json.loads((ckpt / _STATE).read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {_STATE}"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "no weights"
    bad = [f.name for f in weights if not _safetensors_ok(f)]
    if bad:
        return f"truncated {bad[0]}"
    for name in _TORCH_FILES:
        f = ckpt / name
        # torch.save writes a zip archive whose directory is at the end: a cut-off file is no zip.
        if not f.is_file() or not zipfile.is_zipfile(f):
            return f"missing or truncated {name}"
    if not list(ckpt.glob("rng_state*.pth")):
        return "no rng_state"
    return None


def last_complete(folder: str | Path, log: object = print) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones (a kill during their save) are removed."""
    for ckpt in reversed(checkpoints(folder)):
        why = incomplete_reason(ckpt)
        if why is None:
            return ckpt
        if callable(log):
            log(f"heal: removing incomplete {ckpt.name} ({why}; the run was stopped while saving it)")
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def finished_step(ckpt: Path) -> tuple[int, int]:
    """(global_step, max_steps) recorded in a checkpoint."""
    state = json.loads((ckpt / _STATE).read_text())
    return int(state["global_step"]), int(state.get("max_steps") or 0)
