"""First-order Taylor importance (``taylor``), as the seed and Shortened-LLaMA compute it.

Per parameter ``S = | W * sum_batches dL/dW |`` where L is the causal-LM loss on the calibration data (mean
next-token cross-entropy over ALL calibration tokens: each batch contributes its summed token loss divided by
the total token count, so the result does not depend on the batch size). The signed gradients are summed
across batches before the absolute value, as the seed does; gradients are accumulated in float32 even for a
bf16/fp16 model. ``S`` is then reduced exactly like :mod:`.magnitude` (same counted parameters: layer weights
and norm weights, no biases), with p = 1 by default (the seed's ``--norm_power``).

Needs the decoder-layer weights resident (no accelerate disk/CPU weight offload): gradients of offloaded
weights are not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import parts
from ..errors import LayerpruneError
from ._forward import model_inputs, target_mask
from .base import Metric, MetricResult, ScoreContext, register_metric
from .magnitude import _NormParams


@register_metric
@dataclass
class Taylor(_NormParams):
    """| W * dL/dW | per weight, reduced per layer like magnitude."""

    name: ClassVar[str] = "taylor"
    group: ClassVar[str] = "taylor"
    p: int = 1

    @classmethod
    def run(cls, metrics: list[Metric], model: nn.Module, calib: Any, ctx: ScoreContext) -> list[MetricResult]:
        grads = taylor_gradients(model, calib, ctx.batch_size, ctx.progress)
        layers = parts(model).layers
        out = []
        with torch.no_grad():
            for m in metrics:
                assert isinstance(m, Taylor)
                vals: list[float] = []
                names: list[str] = []
                for pos, layer in enumerate(layers):
                    sal = {n: (p.detach().float() * grads[pos][n]).abs() for n, p in layer.named_parameters()}
                    v, names = m.score_layer(layer, sal)
                    vals.append(v)
                out.append(m.result(ctx.full(vals), ctx, calib,
                                    extra={"counted_parameters": names, "log_scale": m.log_scale,
                                           "loss": "mean next-token cross-entropy over all calibration tokens"}))
        return out


def taylor_gradients(model: nn.Module, calib: Any, batch_size: int | None = None,
                     progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per layer position: name -> float32 sum over batches of dL/dW (L = global mean token NLL)."""
    layers = parts(model).layers
    if any(p.device.type == "meta" for p in layers.parameters()):
        raise LayerpruneError("taylor needs the decoder-layer weights resident: load without disk/CPU weight "
                              "offload (device_map over GPUs is fine)")
    total = calib.num_target_tokens()
    if total == 0:
        raise LayerpruneError("calibration has no target tokens")
    saved = {id(p): p.requires_grad for p in model.parameters()}
    layer_params = {id(p) for p in layers.parameters()}
    acc: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic loss
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in layer_params)
            p.grad = None
        for ids, mask in tqdm(calib.batches(batch_size), desc="taylor gradients", disable=not progress,
                              leave=False):
            with torch.enable_grad():
                logits = model(**model_inputs(model, ids, mask)).logits
                valid = target_mask(mask).to(logits.device)
                y = ids[:, 1:].to(logits.device)[valid]
                loss = F.cross_entropy(logits[:, :-1][valid].float(), y, reduction="sum") / total
                loss.backward()
            del logits, loss
            for pos, layer in enumerate(layers):
                for n, p in layer.named_parameters():
                    if p.grad is None:
                        continue
                    g = p.grad.detach().float()  # the grad itself when fp32, else an fp32 copy
                    p.grad = None  # accumulation happens in acc (fp32), whatever the parameter dtype
                    if n in acc[pos]:
                        acc[pos][n].add_(g)
                    else:
                        acc[pos][n] = g
        for pos, layer in enumerate(layers):
            for n, p in layer.named_parameters():
                acc[pos].setdefault(n, torch.zeros_like(p, dtype=torch.float32))
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
        model.train(was_training)
    return acc
