"""Weight magnitude (``magnitude``, aliases ``magnitude_l1``/``magnitude_l2``): no data, no forward.

Which parameters count, per decoder layer (the module from :func:`layerprune.arch.parts`):

* every weight with two or more dimensions: attention q/k/v/o (or fused qkv), MLP gate/up/down (or fused),
  MoE experts and router. ``nn.Linear`` weights are [out, in]; GPT-2 ``Conv1D`` weights are [in, out] and
  are transposed; tensors with more than two dimensions are viewed as [-1, last dim];
* the weights of normalisation modules (any module whose class name contains ``Norm``), each element a
  row of length 1 (set ``include_norms=False`` to leave them out);
* never biases, embeddings, the final norm or the LM head.

Per matrix: ``r_o = sum_in |W[o, in]|^p`` (one value per output row), then ``weight_reduction`` over the
outputs (sum|mean|max|prod). By default the p-th root of that is taken, so with sum/sum the layer score is
the published ``sum_k ||W_k||_p``; ``seed_compat`` keeps the seed's ``sum_k ||W_k||_p^p``. Then
``block_reduction`` (sum|mean|max|prod) over the layer's matrices. ``prod`` is computed in log space (the
product of hundreds of small numbers underflows even in float64); when it is used the reported score is the
natural log of the product, which ranks identically (``extra['log_scale'] = True``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import parts
from ..errors import LayerpruneError
from .base import Metric, MetricResult, ScoreContext, register_metric

REDUCTIONS = ("sum", "mean", "max", "prod")


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2) stores its weight as [in, out].
    return type(module).__name__ == "Conv1D"


def weight_rows(layer: nn.Module, include_norms: bool = True,
                tensors: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, kind, rows) for every counted parameter of ``layer``; rows are [outputs, inputs].

    ``tensors`` overrides the parameter values by name (Taylor passes W * grad here).
    """
    for mod_name, mod in layer.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or p_name.endswith("_bias"):
                continue
            t = tensors[full] if tensors is not None else p.detach()
            if p.dim() >= 2:
                rows = t.t() if (_is_conv1d(mod) and p.dim() == 2) else t.reshape(-1, t.shape[-1])
                yield full, "matrix", rows
            elif p.dim() == 1 and include_norms and is_norm(mod):
                yield full, "norm", t.reshape(-1, 1)


def _reduce(values: torch.Tensor, how: str, log: bool) -> torch.Tensor:
    """Reduce a 1-D float64 tensor; in log space when ``log`` (values are logs)."""
    if log:
        if how == "sum":
            return torch.logsumexp(values, 0)
        if how == "mean":
            return torch.logsumexp(values, 0) - math.log(values.numel())
        if how == "max":
            return values.max()
        return values.sum()  # prod
    if how == "sum":
        return values.sum()
    if how == "mean":
        return values.mean()
    if how == "max":
        return values.max()
    return values.prod()


def layer_norm_score(rows_iter: Iterator[tuple[str, str, torch.Tensor]], p: int, weight_reduction: str,
                     block_reduction: str, root: bool) -> tuple[float, list[str]]:
    """Score of one layer from its parameter rows; returns (score, names counted)."""
    log = "prod" in (weight_reduction, block_reduction)
    per_matrix = []
    names = []
    for name, _kind, rows in rows_iter:
        r = rows.detach().to(torch.float64).abs().pow(p).sum(dim=1)  # one value per output
        if log:
            r = torch.log(r)
        s = _reduce(r, weight_reduction, log)
        if root and p != 1:
            s = s / p if log else s.pow(1.0 / p)
        per_matrix.append(s.cpu())
        names.append(name)
    if not per_matrix:
        return math.nan, names
    return float(_reduce(torch.stack(per_matrix), block_reduction, log)), names


@dataclass
class _NormParams(Metric):
    p: int = field(default=2, metadata={"help": "norm order (magnitude default 2, magnitude_l1/_l2 fix it; taylor "
                                                "default 1)", "choices": (1, 2)})
    weight_reduction: str = field(default="sum", metadata={"help": "reduction over a matrix's outputs",
                                                           "choices": REDUCTIONS})
    block_reduction: str = field(default="sum", metadata={"help": "reduction over a layer's matrices",
                                                          "choices": REDUCTIONS})
    seed_compat: bool = field(default=False, metadata={"help": "reproduce the seed: ||W||_p^p (bi: one global "
                                                               "cosine)"})
    include_norms: bool = field(default=True, metadata={"flag": "--no-norms", "help": "leave normalisation "
                                                        "weights out"})

    def __post_init__(self) -> None:
        if self.p not in (1, 2):
            raise ValueError("p must be 1 or 2")
        for r in (self.weight_reduction, self.block_reduction):
            if r not in REDUCTIONS:
                raise ValueError(f"reduction '{r}' not in {REDUCTIONS}")

    @property
    def log_scale(self) -> bool:
        return "prod" in (self.weight_reduction, self.block_reduction)

    def score_layer(self, layer: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> tuple[float, list[str]]:
        return layer_norm_score(weight_rows(layer, self.include_norms, tensors), self.p, self.weight_reduction,
                                self.block_reduction, root=not self.seed_compat)


@register_metric
@dataclass
class Magnitude(_NormParams):
    """Sum over a layer's weight matrices of ||W||_p (seed_compat: ||W||_p^p)."""

    name: ClassVar[str] = "magnitude"
    group: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    @classmethod
    @torch.no_grad()
    def run(cls, metrics: list[Metric], model: nn.Module, calib: Any, ctx: ScoreContext) -> list[MetricResult]:
        layers = parts(model).layers
        out = []
        for m in metrics:
            assert isinstance(m, Magnitude)
            vals: list[float] = []
            names: list[str] = []
            for layer in layers:
                with _resident(layer):
                    v, names = m.score_layer(layer)
                vals.append(v)
            out.append(m.finish(vals, names, ctx))
        return out

    def finish(self, vals: list[float], names: list[str], ctx: ScoreContext) -> MetricResult:
        return self.result(ctx.full(vals), ctx, None, extra={"counted_parameters": names,
                                                              "log_scale": self.log_scale})

    @classmethod
    def layerwise_consumer(cls, metrics: list[Metric], ctx: ScoreContext, calib: Any) -> Any:
        from .layerwise import MagnitudeConsumer

        return MagnitudeConsumer(metrics, ctx)


register_metric(Magnitude, name="magnitude_l1", p=1)
register_metric(Magnitude, name="magnitude_l2", p=2)


class _resident:
    """Context manager: weights of an accelerate-offloaded layer materialised while inside.

    accelerate puts its offload hooks on the leaf modules (or on the layer), so every submodule that holds
    offloaded parameters is aligned to its execution device.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> nn.Module:
        if any(p.device.type == "meta" for p in self.layer.parameters()):
            from accelerate.utils import align_module_device, has_offloaded_params

            for mod in self.layer.modules():
                if has_offloaded_params(mod):
                    self.stack.enter_context(align_module_device(mod))
            if any(p.device.type == "meta" for p in self.layer.parameters()):
                self.stack.close()
                raise LayerpruneError("magnitude: some layer weights are on the meta device and not offloaded "
                                      "through accelerate; use --mode layerwise")
        return self.layer

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()
