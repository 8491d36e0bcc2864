"""Frozen-prefix cache: partial healing computes the frozen layers once per sample, not once per epoch.

With ``partial`` (and distillation on top of it) the decoder layers below the first trained one are frozen and
deterministic, so the hidden states they hand to the first trained layer depend on the sample only. In packed
micro-batches (no padding, no attention across samples) those states split cleanly into one tensor per sample.
The first epoch records them (on the CPU, up to a memory budget); a later micro-batch whose samples are all
recorded skips the frozen layers: the lower ones return their input untouched and the last one returns the
recorded states. The result equals the uncached run up to floating-point rounding (the recorded states were
computed next to other samples in their micro-batch).

It is not used where the prefix is random (dropout), where the layers do not return a plain tensor, without
packing, or without a frozen prefix (LoRA, full, a tied head trained with the embeddings).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..data.instruct import SAMPLE_INDEX


def _random_modules(modules: list[nn.Module]) -> list[str]:
    """Names of dropout-like parts with a non-zero rate (nn.Dropout modules and the float dropout attributes
    attention modules use in their functional calls)."""
    found: list[str] = []
    for top in modules:
        for name, mod in top.named_modules():
            if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
                found.append(name or type(mod).__name__)
            for attr in ("attention_dropout", "dropout", "attn_dropout", "hidden_dropout"):
                v = getattr(mod, attr, None)
                if isinstance(v, float) and v > 0:
                    found.append(f"{name}.{attr}" if name else attr)
    return found


class PrefixCache:
    """Records and replays the output of the frozen prefix ``layers`` per training sample."""

    def __init__(self, layers: list[nn.Module], max_bytes: int):
        self.layers = layers
        self.max_bytes = max_bytes
        self.store: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.replayed = 0  # micro-batches that skipped the prefix
        self.computed = 0  # micro-batches that ran it
        self.full = False  # the budget stopped recording
        self._mode = "off"
        self._ids: list[int] = []
        self._lengths: list[int] = []
        self._replay: torch.Tensor | None = None
        self._not_tensor = False
        for i, layer in enumerate(layers):
            self._wrap(layer, last=i == len(layers) - 1)

    # --------------------------------------------------------------------------------------------- setup

    @classmethod
    def why_not(cls, layers: list[nn.Module], packing: bool, max_bytes: int) -> str | None:
        """Why the cache cannot serve this run, or None when it can."""
        if max_bytes <= 0:
            return "off (budget 0)"
        if not layers:
            return "no frozen prefix (every decoder layer, or the input embeddings, train)"
        if not packing:
            return "needs packed micro-batches"
        rnd = _random_modules(layers)
        if rnd:
            return f"the frozen layers are random (dropout: {', '.join(rnd[:3])})"
        return None

    def _wrap(self, layer: nn.Module, last: bool) -> None:
        fwd = layer.forward

        @functools.wraps(fwd)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._mode == "replay":
                # Below the last frozen layer: hand the input on untouched (nothing reads it); the last one
                # returns the recorded states.
                return self._replay if last else (args[0] if args else kwargs["hidden_states"])
            out = fwd(*args, **kwargs)
            if last and self._mode == "record":
                self._record(out)
            return out

        layer.forward = forward

    def _record(self, out: Any) -> None:
        if not torch.is_tensor(out) or out.dim() != 3 or out.shape[0] != 1 or out.shape[1] != sum(self._lengths):
            self._not_tensor = True  # an unexpected output: never replay what we cannot reproduce
            return
        for sid, piece in zip(self._ids, out[0].split(self._lengths)):
            if sid in self.store:
                continue
            size = piece.numel() * piece.element_size()
            if self.bytes + size > self.max_bytes:
                self.full = True
                return
            self.store[sid] = piece.detach().to("cpu", copy=True)
            self.bytes += size

    # --------------------------------------------------------------------------------------------- use

    @contextlib.contextmanager
    def batch(self, inputs: dict[str, Any]) -> Iterator[None]:
        """Around one training forward: replay when every sample is recorded, else run and record."""
        ids = inputs.get(SAMPLE_INDEX)
        pos = inputs.get("position_ids")
        if ids is None or pos is None or pos.shape[0] != 1 or self._not_tensor:
            yield
            return
        starts = (pos[0] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        self._ids = [int(i) for i in ids.flatten().tolist()]
        self._lengths = [b - a for a, b in zip(starts, starts[1:])]
        if len(self._lengths) != len(self._ids):
            yield
            return
        if all(i in self.store for i in self._ids):
            self._mode = "replay"
            self._replay = torch.cat([self.store[i] for i in self._ids]).unsqueeze(0).to(pos.device)
            self.replayed += 1
        else:
            self._mode = "record"
            self.computed += 1
        try:
            yield
        finally:
            self._mode = "off"
            self._replay = None

    def summary(self) -> dict[str, Any]:
        return {"used": True, "samples": len(self.store), "bytes": self.bytes, "budget_bytes": self.max_bytes,
                "budget_reached": self.full, "micro_batches_replayed": self.replayed,
                "micro_batches_computed": self.computed}


__all__ = ["PrefixCache"]
