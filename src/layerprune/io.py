"""Atomic outputs: every stage writes into a temporary folder beside its target and renames at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LayerpruneError


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"output path exists and is not a folder: {out}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LayerpruneError(f"output folder exists and is not empty: {out} (use --overwrite)")
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any exception the temporary folder is removed and ``out_dir`` is left as it was.
    """
    out = check_out_dir(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an existing ``out`` (moved aside first, removed
    after), so ``out`` is never half-written."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename), UTF-8, indented."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (temp file + rename), UTF-8, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayerpruneError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise LayerpruneError(f"invalid JSON in {path}: {e.msg} (line {e.lineno})") from None


def _default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_results(out_dir: str | os.PathLike, name: str, data: Any, markdown: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``name.json`` (and ``name.md``) into ``out_dir`` (created if needed), each file atomically.

    The folder may hold other stages' outputs (a run directory), so only these two files are replaced, and
    only with ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"output path exists and is not a folder: {out}")
    target = out / f"{name}.json"
    if target.exists() and not overwrite:
        raise LayerpruneError(f"{target} exists (use --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    write_json(target, data)
    if markdown is not None:
        write_text(out / f"{name}.md", markdown)
    return target
