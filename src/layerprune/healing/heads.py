"""The output head applied only where a loss is taken (training, the teacher cache): a vocabulary-sized matmul
on every position is most of a small model's compute."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class HeadSelector:
    """Applies the output head only at selected positions (``keep``: bool ``[B, T]``) while active."""

    def __init__(self, head: nn.Module):
        self._keep: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> tuple | None:
        keep = self._keep
        if keep is None or not args:
            return None
        h = args[0]
        if not torch.is_tensor(h) or h.dim() != 3 or h.shape[:2] != keep.shape:
            return None
        return (h[keep],) + tuple(args[1:])

    @contextlib.contextmanager
    def select(self, keep: torch.Tensor) -> Iterator[None]:
        self._keep = keep
        try:
            yield
        finally:
            self._keep = None

    def remove(self) -> None:
        self.handle.remove()


def _selected(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # The hook engaged: logits are already [N, V]; otherwise select from [B, T, V].
    return logits if logits.dim() == 2 else logits[keep]


__all__ = ["HeadSelector"]
