"""The heal stage: recover a pruned model by fine-tuning (partial layers, LoRA/DoRA/QLoRA, full) or distillation.

Public API::

    from layerprune.heal import heal
    result = heal("pruned/", "healed/", method="partial", layers="last3", data="alpaca", max_steps=200)

``result`` is the content of ``healed/heal.json``. Methods live in :mod:`.methods` (a registry), the training
engine (transformers' Trainer) in :mod:`.train`, distillation in :mod:`.distill`, settings in :mod:`.config`.
"""

from __future__ import annotations

from .config import HealConfig
from .core import HEAL_FILE, heal
from .methods import METHODS, HealMethod, get_method, register_method

__all__ = ["HEAL_FILE", "METHODS", "HealConfig", "HealMethod", "get_method", "heal", "register_method"]
