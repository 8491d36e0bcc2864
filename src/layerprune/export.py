"""GGUF export through llama.cpp's own converter, and a deployability check with llama-cpp-python.

The converter is ``convert_hf_to_gguf.py`` of the llama.cpp that the **pinned** llama-cpp-python source
distribution vendors (with its ``conversion/`` package and ``gguf-py``): the GGUF it writes is what that
release of llama.cpp reads. It is fetched once from the package index (``pip download``, the sdist) into
``$LAYERPRUNE_CACHE/llama.cpp-<version>`` (``make setup`` does it ahead), or taken from ``$LAYERPRUNE_LLAMA_CPP``
(a llama.cpp checkout). A pruned checkpoint needs nothing special: its ``config.json`` already has the sliced
per-layer fields (``layer_types``, ...), and the converter reads them.

``check_gguf`` loads the GGUF with llama-cpp-python (``pip install 'layerprune[gguf]'``) and compares its greedy
continuation, token by token, with transformers' greedy continuation of the same prompt token ids.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .errors import LayerpruneError
from .io import check_out_dir
from .models import cache_dir, read_config, resolve_model

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: its vendored llama.cpp's converter (and, for --check, its runtime)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")


def converter_dir(fetch: bool = False) -> Path:
    """The folder holding ``convert_hf_to_gguf.py`` (+ ``conversion/``, ``gguf-py/``); fetched when missing."""
    env = os.environ.get("LAYERPRUNE_LLAMA_CPP")
    if env:
        p = Path(env).expanduser()
        if not (p / "convert_hf_to_gguf.py").is_file():
            raise LayerpruneError(f"$LAYERPRUNE_LLAMA_CPP={env} has no convert_hf_to_gguf.py")
        return p
    out = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    if not fetch:
        raise LayerpruneError(f"llama.cpp's converter is not in {out}; fetch it once with 'make setup' or "
                              "'layerprune export --fetch-converter' (or set $LAYERPRUNE_LLAMA_CPP)")
    return _fetch(out)


def _fetch(out: Path) -> Path:
    """Download the pinned llama-cpp-python sdist and keep its vendored converter (about 2 MB of 75)."""
    with tempfile.TemporaryDirectory(prefix="layerprune-llama-") as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                            "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            last = (r.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise LayerpruneError(f"cannot fetch llama-cpp-python=={LLAMA_CPP_PYTHON} (for its GGUF converter): "
                                  f"{last}")
        root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        stage = Path(tmp) / "stage"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(root) and
                       m.name[len(root):].split("/", 1)[0] in _PARTS and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(root):]
            tar.extractall(stage, members=members, filter="data")
        if not (stage / "convert_hf_to_gguf.py").is_file():
            raise LayerpruneError(f"the llama-cpp-python {LLAMA_CPP_PYTHON} sdist has no vendored converter")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(stage), str(out))
    return out


def _die_with_parent() -> None:
    """In the converter's process: die with layerprune (Linux ``PR_SET_PDEATHSIG``), so a SIGKILLed export
    leaves no converter writing behind it."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the temporary file is still cleaned by the next export


def gguf_command(model_dir: str | os.PathLike, out_file: str | os.PathLike, outtype: str = "f16") -> list[str]:
    """The converter command line (also written into a run's ``exports/README.md``)."""
    return [sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), str(model_dir), "--outfile",
            str(out_file), "--outtype", outtype]


def export_gguf(model: str | os.PathLike, out_file: str | os.PathLike, *, outtype: str = "f16",
                overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert a (pruned) HF checkpoint folder to GGUF with llama.cpp's converter; written atomically."""
    if outtype not in OUTTYPES:
        raise LayerpruneError(f"unknown --outtype '{outtype}'; choose one of {', '.join(OUTTYPES)}")
    path = Path(resolve_model(model)).resolve()  # the converter runs in its own folder
    if not path.is_dir():
        raise LayerpruneError(f"GGUF export needs a local model folder: {model}")
    cfg = read_config(path)
    out = Path(out_file).resolve()
    if out.exists() and not overwrite:
        raise LayerpruneError(f"{out} exists (use --overwrite)")
    if out.suffix != ".gguf":
        raise LayerpruneError(f"the output should be a .gguf file, got {out}")
    check_out_dir(out.parent, overwrite=True)  # a writable place (out is absolute)
    conv = converter_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    from .io import clean_stale_tmp, tmp_prefix

    clean_stale_tmp(out)  # what a killed export left
    tmp = out.with_name(tmp_prefix(out) + "gguf")
    cmd = gguf_command(path, tmp, outtype)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)])}
    from collections import deque

    from tqdm.auto import tqdm

    try:
        # The converter logs one line per tensor it writes: they drive the progress bar; the last lines are
        # kept for the error message.
        last: deque[str] = deque(maxlen=20)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=conv, preexec_fn=_die_with_parent) as proc, \
                tqdm(desc="convert to GGUF", unit="line", disable=not progress, leave=False) as bar:
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.strip():
                        last.append(line.strip())
                        bar.update(1)
                rc = proc.wait()
            except BaseException:  # Ctrl-C / SIGTERM: the converter must not go on writing
                proc.kill()
                raise
        if rc != 0 or not tmp.is_file():
            raise LayerpruneError(f"llama.cpp's converter failed for {cfg.get('model_type')}: "
                                  f"{last[-1] if last else f'exit {rc}'}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    shown = [Path(cmd[0]).name, *cmd[1:3], "--outfile", str(out), "--outtype", outtype]
    return {"gguf": str(out), "bytes": out.stat().st_size, "outtype": outtype, "model_type": cfg.get("model_type"),
            "converter": f"llama.cpp vendored by llama-cpp-python {LLAMA_CPP_PYTHON}", "command": " ".join(shown)}


def check_gguf(gguf: str | os.PathLike, model: str | os.PathLike, prompt: str = "The capital of France is",
               new_tokens: int = 16) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` by llama-cpp-python (the GGUF) and by transformers (the checkpoint),
    from the same prompt token ids; returns both token lists and how far they agree."""
    try:
        import llama_cpp
    except ImportError:
        raise LayerpruneError("--check needs llama-cpp-python: pip install 'layerprune[gguf]'") from None
    import numpy as np
    import torch

    from .models import load

    hf: Any
    hf, tok = load(model, dtype="float32")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    want = out[0, ids.shape[1]:].tolist()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(64, ids.shape[1] + new_tokens + 8), logits_all=True,
                          verbose=False, n_threads=1, seed=0)
    llm.reset()
    llm.eval(ids[0].tolist())
    got: list[int] = []
    for _ in range(new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        llm.eval([nxt])
    prefix = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return {"prompt": prompt, "transformers": want, "llama_cpp": got, "matching_prefix": prefix,
            "agreement": sum(a == b for a, b in zip(want, got)) / max(len(want), 1),
            "transformers_text": tok.decode(want), "llama_cpp_text": tok.decode(got)}


__all__ = ["LLAMA_CPP_PYTHON", "OUTTYPES", "check_gguf", "converter_dir", "export_gguf", "gguf_command"]
