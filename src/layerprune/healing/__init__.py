"""The heal stage: recover a pruned model by fine-tuning (partial layers, LoRA/DoRA/QLoRA, full) or distillation.

Public API::

    from layerprune.healing import heal
    result = heal("pruned/", "healed/", method="partial", layers="last3", data="alpaca", max_steps=200)

``result`` is the content of ``healed/heal.json``. Methods live in :mod:`.methods` (a registry), the training
engine (transformers' Trainer) in :mod:`.train`, distillation in :mod:`.distill`, settings in :mod:`.config`.

``heal`` and ``HEAL_FILE`` are imported on first use: the Trainer imports peft, which imports bitsandbytes (and
through it the ``kernels`` package), and a command that only parses a heal flag must not pay for that or let
their import-time chatter reach stderr.
"""

from __future__ import annotations

import logging
from typing import Any

# Once the engine loads, the Trainer imports peft, which imports bitsandbytes; on AVX512-BF16 CPUs bitsandbytes
# then asks the `kernels` package for an optional CPU kernel, which warns that it is missing or (offline) that
# its publisher check is skipped. Healing never uses that kernel (see methods.disable_cpu_packing): the lines are
# only noise ahead of our own output, and under torchrun they would repeat once per rank.
for _name in ("bitsandbytes.backends.cpu", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .config import HealConfig  # noqa: E402
from .methods import METHODS, HealMethod, get_method, register_method  # noqa: E402

_LAZY = {"heal": "core", "HEAL_FILE": "core"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HEAL_FILE", "METHODS", "HealConfig", "HealMethod", "get_method", "heal", "register_method"]
