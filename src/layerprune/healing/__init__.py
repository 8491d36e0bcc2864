"""The heal stage: recover a pruned model by fine-tuning (partial layers, LoRA/DoRA/QLoRA, full) or distillation.

Public API::

    from layerprune.healing import heal
    result = heal("pruned/", "healed/", method="partial", layers="last3", data="alpaca", max_steps=200)

``result`` is the content of ``healed/heal.json``. Methods live in :mod:`.methods` (a registry), the training
engine (transformers' Trainer) in :mod:`.train`, distillation in :mod:`.distill`, settings in :mod:`.config`.
"""

from __future__ import annotations

import logging

# transformers' Trainer imports peft, which imports bitsandbytes; on AVX512-BF16 CPUs bitsandbytes then warns
# that an optional inference kernel package is missing. Healing never uses that kernel (see
# methods.disable_cpu_packing), so the line is only noise.
logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)

from .config import HealConfig  # noqa: E402
from .core import HEAL_FILE, heal  # noqa: E402
from .methods import METHODS, HealMethod, get_method, register_method  # noqa: E402

__all__ = ["HEAL_FILE", "METHODS", "HealConfig", "HealMethod", "get_method", "heal", "register_method"]
