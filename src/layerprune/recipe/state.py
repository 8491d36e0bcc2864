"""Run-directory bookkeeping: stage fingerprints, skip-on-resume, timings.

A stage is skipped on ``--resume`` when its recorded fingerprint (a hash of its parameters and of the
fingerprints of everything it reads) equals the current one and its output folder exists. Changing a
parameter therefore re-runs that stage and, through the chained fingerprints, every stage downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..io import atomic_dir, file_stats, link_or_copy, read_json, write_json
from ..models import source_identity

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
    identity = source_identity(p)
    if identity is not None:  # a converted embedded model: the same on every machine that converts it
        return fingerprint(["converted", identity])
    return fingerprint([[name, st.st_size, int(st.st_mtime)] for name, st in file_stats(p).items()])


# Stages whose output depends on their fingerprinted inputs only (not on the run folder): runs that share a
# store (the cells of a sweep) compute each of them once per fingerprint.
SHAREABLE = ("score", "pruned", "compensated", "eval-dense", "eval-pruned", "eval-compensated", "eval-healed")
SHARED_RESULT = ".stage-result.json"  # a published stage's result, beside its files


class RunState:
    """The stages of one run directory and what each produced. ``shared``: a store of shareable stage outputs,
    keyed by stage and fingerprint, that other runs read instead of recomputing."""

    def __init__(self, run_dir: Path, resume: bool, log: Callable[[str], None] = print,
                 shared: Path | None = None) -> None:
        self.dir = run_dir
        self.log = log
        self.shared = shared
        path = run_dir / STATE_FILE
        self.stages: dict[str, dict[str, Any]] = read_json(path)["stages"] if resume and path.is_file() else {}

    def save(self) -> None:
        write_json(self.dir / STATE_FILE, {"stages": self.stages})

    def current(self, name: str, inputs: dict[str, Any], output: bool = True) -> bool:
        """Whether stage ``name`` is done with these inputs (``run`` would skip it)."""
        prev = self.stages.get(name)
        return bool(prev and prev.get("fingerprint") == fingerprint(inputs) and prev.get("done")
                    and ((self.dir / name).is_dir() or not output))

    def published(self, name: str, inputs: dict[str, Any]) -> bool:
        """Whether another run has published stage ``name`` with these inputs (``run`` would link it)."""
        store = self._store(name, fingerprint(inputs))
        return store is not None and (store / SHARED_RESULT).is_file()

    def claimed(self, name: str, inputs: dict[str, Any]) -> bool:
        """Whether another run holds stage ``name`` with these inputs right now (``run`` would wait for it)."""
        store = self._store(name, fingerprint(inputs))
        if store is None or not store.parent.is_dir():
            return False
        lock = _lock(store)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def _store(self, name: str, fp: str, output: bool = True) -> Path | None:
        return self.shared / f"{name}-{fp}" if self.shared is not None and output and name in SHAREABLE else None

    def run(self, name: str, inputs: dict[str, Any], fn: Callable[[Path], dict[str, Any]],
            output: bool = True) -> dict[str, Any]:
        """Run stage ``name`` unless its fingerprint is unchanged; ``fn(tmp_dir)`` writes into a temp folder
        that replaces ``run_dir/name`` atomically and returns a JSON-able result."""
        fp = fingerprint(inputs)
        out = self.dir / name
        if self.current(name, inputs, output):
            self.log(f"[skip] {name} (unchanged, fingerprint {fp})")
            return self.stages[name]["result"]
        store = self._store(name, fp, output)
        with self._claim(name, store):
            t0 = time.perf_counter()
            if store is not None and (store / SHARED_RESULT).is_file():
                self.log(f"[shared] {name} (computed by another run, fingerprint {fp})")
                with atomic_dir(out, overwrite=True) as tmp:
                    # Hard links: a sweep's cells hold one copy of a shared model, not one each (mtimes kept, so
                    # fingerprints match).
                    shutil.copytree(store, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
                    result = read_json(tmp / SHARED_RESULT)
                    (tmp / SHARED_RESULT).unlink()
                shared = True
            else:
                self.log(f"[run ] {name}")
                if output:
                    with atomic_dir(out, overwrite=True) as tmp:
                        result = fn(tmp)
                else:
                    result = fn(self.dir)
                result = dict(result or {})
                shared = False
                if store is not None:
                    _publish(out, store, result)
        self.stages[name] = {"fingerprint": fp, "done": True, "seconds": round(time.perf_counter() - t0, 2),
                             "inputs": inputs, "result": result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "shared": shared}
        self.save()
        return result

    @contextmanager
    def _claim(self, name: str, store: Path | None) -> Iterator[None]:
        """Hold the store's lock for one stage fingerprint while computing or linking it: a concurrent run
        (another cell, on any executor sharing the folder) waits and then reads the published stage instead of
        computing it again. An OS lock (filelock): released when its holder dies, so a killed cell blocks no one."""
        if store is None:
            yield
            return
        store.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(store)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.log(f"[wait] {name} (another run is computing it)")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()


def _lock(store: Path) -> FileLock:
    """The OS lock of one shared stage fingerprint (beside its store folder)."""
    return FileLock(str(store.parent / f".{store.name}.lock"))


def _publish(out: Path, store: Path, result: dict[str, Any]) -> None:
    """Copy a finished stage into the shared store (whole or not at all; a concurrent publisher may win)."""
    if store.exists():
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp, copy_function=link_or_copy)
    write_json(tmp / SHARED_RESULT, result)
    try:
        tmp.rename(store)
    except OSError:  # another run published the same stage first
        shutil.rmtree(tmp, ignore_errors=True)
