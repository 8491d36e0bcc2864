"""Run-directory bookkeeping: stage fingerprints, skip-on-resume, timings.

A stage is skipped on ``--resume`` when its recorded fingerprint (a hash of its parameters and of the
fingerprints of everything it reads) equals the current one and its output folder exists. Changing a
parameter therefore re-runs that stage and, through the chained fingerprints, every stage downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import atomic_dir, read_json, write_json

STATE_FILE = "state.json"


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def folder_fingerprint(path: str | os.PathLike) -> str:
    """Fingerprint of a model/data folder or file by names, sizes and modification times (cheap, no read)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return fingerprint([p.name, st.st_size, int(st.st_mtime)])
    if not p.is_dir():
        return fingerprint(str(p))  # a Hub id
    items = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            st = f.stat()
            items.append([str(f.relative_to(p)), st.st_size, int(st.st_mtime)])
    return fingerprint(items)


class RunState:
    """The stages of one run directory and what each produced."""

    def __init__(self, run_dir: Path, resume: bool, log: Callable[[str], None] = print) -> None:
        self.dir = run_dir
        self.log = log
        path = run_dir / STATE_FILE
        self.stages: dict[str, dict[str, Any]] = read_json(path)["stages"] if resume and path.is_file() else {}

    def save(self) -> None:
        write_json(self.dir / STATE_FILE, {"stages": self.stages})

    def current(self, name: str, inputs: dict[str, Any], output: bool = True) -> bool:
        """Whether stage ``name`` is done with these inputs (``run`` would skip it)."""
        prev = self.stages.get(name)
        return bool(prev and prev.get("fingerprint") == fingerprint(inputs) and prev.get("done")
                    and ((self.dir / name).is_dir() or not output))

    def run(self, name: str, inputs: dict[str, Any], fn: Callable[[Path], dict[str, Any]],
            output: bool = True) -> dict[str, Any]:
        """Run stage ``name`` unless its fingerprint is unchanged; ``fn(tmp_dir)`` writes into a temp folder
        that replaces ``run_dir/name`` atomically and returns a JSON-able result."""
        fp = fingerprint(inputs)
        out = self.dir / name
        if self.current(name, inputs, output):
            self.log(f"[skip] {name} (unchanged, fingerprint {fp})")
            return self.stages[name]["result"]
        self.log(f"[run ] {name}")
        t0 = time.perf_counter()
        if output:
            with atomic_dir(out, overwrite=True) as tmp:
                result = fn(tmp)
        else:
            result = fn(self.dir)
        result = dict(result or {})
        self.stages[name] = {"fingerprint": fp, "done": True, "seconds": round(time.perf_counter() - t0, 2),
                             "inputs": inputs, "result": result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save()
        return result

