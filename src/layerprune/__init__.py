"""layerprune: depth (layer) pruning of Hugging Face causal LMs.

The public API in a few names (imported lazily so ``import layerprune`` stays cheap)::

    import layerprune as lp
    model, tok = lp.load("default")                 # embedded SmolLM2-135M-Instruct, or any HF folder
    record = lp.prune_layers(model, remove=[22, 23, 24, 25, 26, 27, 28, 29])
    lp.save_pruned(model, tok, "smollm2-pruned", lp.build_manifest("default", record, method="reverse"))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "LayerpruneError": "errors",
    "load": "models", "load_model": "models", "load_tokenizer": "models", "default_model_path": "models",
    "save_pruned": "models", "build_manifest": "models", "count_parameters": "models",
    "parts": "arch", "adapter_for": "arch", "supported_types": "arch",
    "prune_layers": "prune", "prune_checkpoint": "prune", "prune_checkpoint_streaming": "prune",
    "PruneRecord": "prune",
    "score": "scoring", "select_layers": "select",
    "compensate": "compensation", "compensate_checkpoint": "compensation",
    "heal": "healing",
    "evaluate": "evaluation", "perplexity": "evaluation",
    "measure": "measurement",
    "run_recipe": "recipe",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # later accesses skip __getattr__; no submodule shares a public name
        return value
    raise AttributeError(f"module 'layerprune' has no attribute {name!r}")
