"""Atomic outputs: every stage writes into a temporary folder beside its target and renames at the end."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LayerpruneError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EACCES, errno.EROFS, errno.EPERM}


def _existing_parent(path: Path) -> Path:
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite``, and a place that cannot be written.

    ``inputs``: folders the command reads (the model); an output that is one of them, inside one, or holds one
    is refused, ``--overwrite`` or not — replacing it would destroy what is being read."""
    out = Path(out_dir)
    for src in inputs:
        if Path(src).exists() and _overlaps(out, Path(src)):
            raise LayerpruneError(f"output {out} is the input {src}, inside it or around it: choose another --out")
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"output path exists and is not a folder: {out}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LayerpruneError(f"output folder exists and is not empty: {out} (use --overwrite)")
    base = _existing_parent(out.parent if not out.exists() else out)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise LayerpruneError(f"cannot write to {base} (read-only file system or no permission)")
    return out


def _overlaps(a: Path, b: Path) -> bool:
    ra, rb = a.resolve(), b.resolve()
    return ra == rb or rb in ra.parents or ra in rb.parents


def tmp_prefix(out: Path) -> str:
    """Name prefix of the temporary folders written beside ``out``."""
    # The host and process id in the name let a later run prove a leftover is its own target's and dead.
    return f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def clean_stale_tmp(out: Path) -> list[Path]:
    """Remove temporary folders and files that a killed run left beside ``out`` (only ``.OUT.tmp-HOST-PID-*`` of
    this host whose process is gone, and ``.OUT.old-PID`` likewise)."""
    removed = []
    host = socket.gethostname()
    for cand in out.parent.glob(f".{glob.escape(out.name)}.*"):
        rest = cand.name[len(out.name) + 2:]
        if rest.startswith(f"tmp-{host}-"):
            pid = rest[len(f"tmp-{host}-"):].split("-", 1)[0]
        elif rest.startswith("old-"):
            pid = rest[4:]
        else:
            continue
        if pid.isdigit() and not _alive(int(pid)):
            if cand.is_dir():
                shutil.rmtree(cand, ignore_errors=True)
            else:
                cand.unlink(missing_ok=True)
            removed.append(cand)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_free_space(where: str | os.PathLike, need_bytes: int) -> None:
    """Refuse before writing when the file system cannot hold ``need_bytes`` (plus 1% slack)."""
    base = _existing_parent(Path(where))
    free = shutil.disk_usage(base).free
    if need_bytes * 1.01 > free:
        raise LayerpruneError(f"not enough disk space in {base}: the output needs about {_human(need_bytes)}, "
                              f"{_human(free)} free; nothing was written")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, need_bytes: int | None = None
               ) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any exception (Ctrl-C and SIGTERM included) the temporary folder is removed and ``out_dir`` is left as
    it was; a SIGKILL leaves it behind, and the next write to the same target removes it. ``need_bytes``: the
    expected size, checked against the free space first. A full disk becomes a one-line error.
    """
    out = check_out_dir(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    if need_bytes is not None:
        check_free_space(out.parent, need_bytes)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(out), dir=out.parent))
    except OSError as e:
        raise LayerpruneError(f"cannot write to {out.parent}: {e.strerror}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets the user's usual mode
    try:
        yield tmp
    except OSError as e:
        written = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _NO_SPACE:
            need = f"about {_human(need_bytes)}" if need_bytes else f"more than the {_human(written)} written"
            raise LayerpruneError(f"disk full while writing {out}: it needs {need}, "
                                  f"{_human(shutil.disk_usage(out.parent).free)} free; nothing was written") \
                from None
        if e.errno in _READ_ONLY and str(getattr(e, "filename", "") or "").startswith(str(out.parent)):
            # (a permission error on an input file elsewhere is not about the output place)
            raise LayerpruneError(f"cannot write to {out.parent}: {e.strerror}; nothing was written") from None
        raise
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


def file_stats(folder: Path) -> dict[str, os.stat_result]:
    """Every file under ``folder`` except hidden ones (locks, temporaries), by relative path, in sorted order."""
    return {str(f.relative_to(folder)): f.stat() for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.name.startswith(".")}


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link a file (free, same bytes and mtime), falling back to a copy across file systems. For stage
    outputs, which are never written in place once finished (a file that must change is unlinked and
    rewritten), so every run that links one reads the same bytes. Usable as ``shutil.copytree``'s
    ``copy_function``."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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


def check_results_target(out_dir: str | os.PathLike, name: str, overwrite: bool = False,
                         inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Where ``write_results`` will write ``name.json``; refuses an existing one (without ``overwrite``), an
    unwritable place, and a folder that is one of ``inputs`` (or inside or around one) -- call it before the work
    that produces the results."""
    out = Path(out_dir)
    for src in inputs:
        if Path(src).exists() and _overlaps(out, Path(src)):
            raise LayerpruneError(f"output {out} is the input {src}, inside it or around it: choose another --out")
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"output path exists and is not a folder: {out}")
    target = out / f"{name}.json"
    if target.exists() and not overwrite:
        raise LayerpruneError(f"{target} exists (use --overwrite)")
    base = _existing_parent(out)
    if not os.access(base, os.W_OK | os.X_OK):
        raise LayerpruneError(f"cannot write to {base} (read-only file system or no permission)")
    return target


def write_results(out_dir: str | os.PathLike, name: str, data: Any, markdown: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write ``name.json`` (and ``name.md``) into ``out_dir`` (created if needed), each file atomically.

    The folder may hold other stages' outputs (a run directory), so only these two files are replaced, and
    only with ``overwrite``.
    """
    target = check_results_target(out_dir, name, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    if markdown is not None:
        write_text(target.parent / f"{name}.md", markdown)
    write_json(target, data)  # last: its presence marks the results complete (a re-run checks for it)
    return target


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """A YAML file's content; a missing file or invalid YAML is a one-line error naming ``what`` it is."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LayerpruneError(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LayerpruneError(f"{what} {p}: invalid YAML ({str(e).splitlines()[0]})") from None
