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


def hub_reachable(probe: bool = False, timeout: float = 3.0) -> bool:
    """False when offline mode is set (the network is then never touched); with ``probe``, also try a TCP
    connection to the Hub endpoint (``$HF_ENDPOINT`` or huggingface.co)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    if not probe:
        return True
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_data_source(data_dir: Path | None) -> None:
    """Fail early, in one line, when neither local data nor the Hub is available."""
    if data_dir is None and not hub_reachable(probe=True):
        raise LayerpruneError(f"no data: the Hugging Face Hub is unreachable and no local data folder is set; "
                              f"point {DATA_ENV} (or --data-dir) at a folder laid out like shared/data")
