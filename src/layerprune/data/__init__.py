"""Data sources: local copies (``LAYERPRUNE_DATA`` / ``--data-dir``) or the Hub; see :mod:`.presets`."""

from .presets import DATA_ENV, hub_reachable, resolve_data_dir

__all__ = ["DATA_ENV", "hub_reachable", "resolve_data_dir"]
