"""Forward-pass plumbing shared by the metrics: layer hooks, replaying a decoder layer, logits from a hidden
state, masked token NLL.

Decoder layers are called by their model with the hidden state first and everything else (mask, rotary
position embeddings, position ids, ...) as further arguments. Those arguments do not depend on the hidden
state, so we record them once per batch and can later call any layer on any hidden state, which is what
prefix reuse (ppl) and the layer-by-layer mode need. Nothing here knows a model family by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import get_module, parts

# Logits are computed in chunks of this many tokens so a large vocabulary never needs a [batch, seq, vocab]
# float32 tensor at once.
HEAD_CHUNK = 512


class StopForward(Exception):
    """Raised from the last layer's hook: everything after the decoder layers is not needed."""


@dataclass
class LayerCall:
    """The arguments a decoder layer received besides its hidden state (for one batch)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def layer_output(out: Any) -> torch.Tensor:
    # transformers 5 layers return a tensor; older ones (and some remote code) a tuple led by it.
    return out if isinstance(out, torch.Tensor) else out[0]


def record_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> LayerCall:
    if args:
        return LayerCall(tuple(args[1:]), dict(kwargs))
    kw = dict(kwargs)
    kw.pop("hidden_states")
    return LayerCall((), kw)


def call_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Run ``layer`` on ``hidden`` with the recorded other arguments."""
    if call.args or "hidden_states" not in call.kwargs:
        return layer_output(layer(hidden, *call.args, **call.kwargs))
    return layer_output(layer(hidden_states=hidden, **call.kwargs))


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the embedding's device (its execution device when offloaded)."""
    embed = parts(model).embed
    w = getattr(embed, "weight", None)
    if w is not None and w.device.type != "meta":
        return w.device
    hook = getattr(embed, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def model_inputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    dev = input_device(model)
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "use_cache": False}


@contextlib.contextmanager
def layer_hooks(layers: nn.ModuleList, fn: Callable[[int, tuple, dict, Any], None]) -> Iterator[None]:
    """Forward hooks (with kwargs) on every layer calling ``fn(position, args, kwargs, output)``."""
    handles = []
    for pos, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda mod, args, kwargs, out, pos=pos: fn(pos, args, kwargs, out), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_until_layers_done(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Forward ``model``; returns once the last layer's hook raised :class:`StopForward` (or at the end)."""
    with contextlib.suppress(StopForward):
        model(**model_inputs(model, ids, mask))


@dataclass
class Capture:
    """Per layer position and batch: the layer's input hidden state and its other arguments; plus the
    output of the last layer per batch."""

    inputs: list[list[torch.Tensor]]
    calls: list[list[LayerCall]]
    final: list[torch.Tensor]


@torch.no_grad()
def capture(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Capture:
    """One forward per batch through the decoder layers (not the head), recording every layer's input."""
    layers = parts(model).layers
    n = len(layers)
    cap = Capture([[] for _ in range(n)], [[] for _ in range(n)], [])

    def hook(pos: int, args: tuple, kwargs: dict, out: Any) -> None:
        cap.inputs[pos].append(layer_input(args, kwargs).detach())
        cap.calls[pos].append(record_call(args, kwargs))
        if pos == n - 1:
            cap.final.append(layer_output(out).detach())
            raise StopForward

    with layer_hooks(layers, hook):
        for ids, mask in batches:
            run_until_layers_done(model, ids, mask)
    return cap


def finish_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits from the last decoder layer's output: final norm, optional projection, head, logit transforms.

    The logit transforms are read from the config (Gemma-2/3 soft-capping, Cohere ``logit_scale``, Granite
    ``logits_scaling``). :func:`verify_finish` checks the result against the model's own logits.
    """
    p = parts(model)
    cfg = model.config
    project_out = get_module(model, "model.decoder.project_out")  # OPT with word_embed_proj_dim != hidden
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    divide = getattr(cfg, "logits_scaling", None)

    def finish(h: torch.Tensor) -> torch.Tensor:
        if p.norm is not None:
            h = p.norm(h)
        if project_out is not None:
            h = project_out(h)
        logits = p.head(h)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if divide:
            logits = logits / divide
        return logits

    return finish


@torch.no_grad()
def verify_finish(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  finish: Callable[[torch.Tensor], torch.Tensor], tokens: int = 16) -> bool:
    """True when ``finish(last layer output)`` reproduces the model's logits on a short input."""
    ids, mask = ids[:1, :tokens], mask[:1, :tokens]
    layers = parts(model).layers
    got: list[torch.Tensor] = []

    def hook(pos: int, args: tuple, kwargs: dict, out: Any) -> None:
        if pos == len(layers) - 1:
            got.append(layer_output(out))

    with layer_hooks(layers, hook):
        ref = model(**model_inputs(model, ids, mask)).logits
    if not got:
        return False
    mine = finish(got[0]).to(ref.device)
    if mine.shape != ref.shape:
        return False
    tol = 1e-4 if ref.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(mine.float(), ref.float(), rtol=tol, atol=tol * float(ref.float().abs().max())))


def target_mask(mask: torch.Tensor) -> torch.Tensor:
    """[b, s-1] bool: position t predicts token t+1, counted when both are real tokens."""
    m = mask.bool()
    return m[:, 1:] & m[:, :-1]


@torch.no_grad()
def nll_from_hidden(finish: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ids: torch.Tensor,
                    mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) and token count, computing logits chunk by chunk (fp32 CE)."""
    valid = target_mask(mask).to(hidden.device)
    h = hidden[:, :-1][valid]
    y = ids[:, 1:].to(hidden.device)[valid]
    total = 0.0
    for i in range(0, h.shape[0], HEAD_CHUNK):
        logits = finish(h[i:i + HEAD_CHUNK])
        total += float(F.cross_entropy(logits.float(), y[i:i + HEAD_CHUNK].to(logits.device),
                                       reduction="sum").double())
    return total, int(y.numel())


def nll_from_logits(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and count from full logits (used when :func:`finish_fn` cannot be verified)."""
    valid = target_mask(mask).to(logits.device)
    lg = logits[:, :-1][valid].float()
    y = ids[:, 1:].to(logits.device)[valid]
    return float(F.cross_entropy(lg, y, reduction="sum").double()), int(y.numel())


class SkipLayer(nn.Module):
    """Stands in for a decoder layer and returns its input unchanged (a layer skipped in place)."""

    def __init__(self, original: nn.Module, tuple_output: bool = False):
        super().__init__()
        # Some models read a per-layer attribute (e.g. attention_type) while looping over the layers.
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr) and not isinstance(getattr(original, attr), nn.Module):
                setattr(self, attr, getattr(original, attr))
        self.tuple_output = tuple_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = layer_input(args, kwargs)
        return (h,) if self.tuple_output else h


@contextlib.contextmanager
def skipped(layers: nn.ModuleList, pos: int, tuple_output: bool = False) -> Iterator[None]:
    """Temporarily replace ``layers[pos]`` by a :class:`SkipLayer` (no model is rebuilt)."""
    original = layers[pos]
    layers[pos] = SkipLayer(original, tuple_output)
    try:
        yield
    finally:
        layers[pos] = original
