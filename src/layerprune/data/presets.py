"""Where named datasets live: a local folder laid out like ``shared/data`` or the Hugging Face Hub.

Layout of a local data folder (see its README): ``calibration/*.jsonl``, ``instruct/*``, ``ppl/<name>/*``,
``eval/<task>/<split>.jsonl``. Stages look files up relative to :func:`resolve_data_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LayerpruneError

DATA_ENV = "LAYERPRUNE_DATA"


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """``explicit`` (a ``--data-dir``), else ``$LAYERPRUNE_DATA``, else None (meaning: use the Hub)."""
    value = explicit if explicit not in (None, "") else os.environ.get(DATA_ENV)
    if value in (None, ""):
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        src = "--data-dir" if explicit not in (None, "") else f"${DATA_ENV}"
        raise LayerpruneError(f"data folder not found: {path} (from {src})")
    return path


def hub_reachable() -> bool:
    """False when offline mode is set; we never probe the network in offline mode."""
    return os.environ.get("HF_HUB_OFFLINE") != "1" and os.environ.get("HF_DATASETS_OFFLINE") != "1"
