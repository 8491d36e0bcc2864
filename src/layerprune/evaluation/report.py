"""Writing results: ``<name>.json`` plus ``<name>.md`` into an output folder, and model loading for the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import LayerpruneError
from ..io import write_json


def write_report(out_dir: str | os.PathLike, name: str, data: Any, markdown: str | None = None,
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
        tmp = out / f".{name}.md.tmp"
        tmp.write_text(markdown, encoding="utf-8")
        os.replace(tmp, out / f"{name}.md")
    return target


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(model: str, dtype: str = "auto", device: str | None = None, peft: str | None = None
                  ) -> tuple[Any, Any]:
    """Model (optionally with a PEFT adapter applied, unmerged) and tokenizer, in eval mode on ``device``."""
    from ..models import load

    m, tok = load(model, dtype, device or default_device())
    if peft:
        if not Path(peft).is_dir():
            raise LayerpruneError(f"PEFT adapter folder not found: {peft}")
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, peft).eval()
    return m, tok


def model_info(model: Any, source: str, peft: str | None = None) -> dict[str, Any]:
    """What was evaluated: source, adapter, type, layers, dtype, parameter count."""
    from ..models import count_parameters

    cfg = getattr(model, "config", None)
    try:
        from ..arch import parts

        layers = parts(model.get_base_model() if hasattr(model, "get_base_model") else model).num_layers
    except Exception:  # noqa: BLE001 - informational only
        layers = getattr(cfg, "num_hidden_layers", None)  # type: ignore[assignment]
    p = next(model.parameters())
    return {"source": str(source), "peft": peft, "model_type": getattr(cfg, "model_type", None),
            "num_layers": layers, "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device),
            "params": count_parameters(model)}
