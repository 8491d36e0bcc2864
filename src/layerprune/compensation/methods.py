"""Compensation methods: fit one map per removed block from calibration statistics.

For a block, ``M`` is what the fold site writes to the residual stream (per token), ``h`` the residual the
pruned model hands past the block and ``y`` the dense model's residual after the block. The compensated
model hands on ``h + M·(T − I)``; the methods choose ``T``:

* ``lstsq`` — ``argmin ‖M·T − (M + y − h)‖²``, i.e. least squares onto the dense residual; with ``ridge`` the
  penalty is ``λ‖T − I‖²`` (shrinks towards "no compensation", so the fit can never be worse than none).
  Only ``MᵀM`` and ``Mᵀ(y − h)`` are kept, accumulated in float64: memory O(d²), any number of tokens.
* ``cosine`` — ReplaceMe's objective, mean cosine distance between ``h + M·(T − I)`` and ``y``, fitted by Adam
  from the ``lstsq`` solution on the stored activations (``max_tokens`` of them).
* ``scale`` — magnitude compensation (Prune&Comp): the residual after the block is rescaled by
  ``α = mean‖y‖ / mean‖h‖``.
* ``reconstruct`` — the ``lstsq`` map, then the kept layer(s) beside the block trained to the dense hidden state
  (:mod:`.reconstruct`); ``trains = True``: it changes weights, so hook-based users (frontier, the search
  proxy) get its ``lstsq`` part.
* ``none`` — nothing.

Adding a method: a subclass of :class:`CompMethod` and one :func:`register` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LayerpruneError


class Stats:
    """Running sums over calibration tokens for one block (float64)."""

    def __init__(self, dim: int, keep_activations: int = 0):
        self.dim = dim
        self.A = torch.zeros(dim, dim, dtype=torch.float64)  # Σ MᵀM
        self.C = torch.zeros(dim, dim, dtype=torch.float64)  # Σ Mᵀ(y − h)
        self.dd = 0.0  # Σ ‖y − h‖²
        self.yy = 0.0  # Σ ‖y‖²
        self.norm_h = 0.0  # Σ ‖h‖
        self.norm_y = 0.0  # Σ ‖y‖
        self.cos = 0.0  # Σ cos(h, y)
        self.tokens = 0
        self.keep = keep_activations
        self.acts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.kept = 0

    @torch.no_grad()
    def update(self, m: torch.Tensor | None, h: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens: ``m``, ``h``, ``y`` are [tokens, d] (``m`` may be None for methods that do not use it)."""
        h64, y64 = h.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        delta = y64 - h64
        if m is not None:
            m64 = m.detach().to("cpu", torch.float64)
            self.A += m64.T @ m64
            self.C += m64.T @ delta
        self.dd += float((delta * delta).sum())
        self.yy += float((y64 * y64).sum())
        self.norm_h += float(h64.norm(dim=-1).sum())
        self.norm_y += float(y64.norm(dim=-1).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(h64, y64, dim=-1).sum())
        self.tokens += h.shape[0]
        if self.keep and self.kept < self.keep and m is not None:
            n = min(self.keep - self.kept, h.shape[0])
            self.acts.append((m[:n].detach().float().cpu(), h[:n].detach().float().cpu(),
                              y[:n].detach().float().cpu()))
            self.kept += n

    def check_finite(self, label: str) -> None:
        values = (self.dd, self.yy, self.norm_h, self.norm_y)
        if not (bool(torch.isfinite(self.A).all()) and bool(torch.isfinite(self.C).all())
                and all(torch.isfinite(torch.tensor(v)) for v in values)):
            raise LayerpruneError(f"NaN or inf in the calibration statistics of block {label} (the model's "
                                  "activations overflow: load it in float32)")

    def sq_error(self, u: torch.Tensor, shape: str) -> float:
        """Σ ‖M·U − (y − h)‖² for the map ``T = I + U`` (diag: ``U`` is a vector), from the sums alone."""
        if shape == "diag":
            a, c = torch.diagonal(self.A), torch.diagonal(self.C)
            return float((u * u * a).sum() - 2 * (u * c).sum() + self.dd)
        return float((u * (self.A @ u)).sum() - 2 * (u * self.C).sum() + self.dd)


@dataclass
class Fit:
    """One block's fitted map: ``T = I + delta`` (matrix or diag) or a scalar ``alpha``; plus the fit report."""

    shape: str  # matrix | diag | scalar | none
    delta: torch.Tensor | None = None
    alpha: float | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def matrix(self) -> torch.Tensor:
        """T as a [d, d] float64 matrix (diag expanded)."""
        assert self.delta is not None
        eye = torch.eye(self.delta.shape[0], dtype=torch.float64)
        return eye + (torch.diag(self.delta) if self.shape == "diag" else self.delta)


def _fit_report(stats: Stats, err_after: float, cos_after: float | None = None) -> dict[str, Any]:
    n = max(stats.tokens, 1)
    rep = {"tokens": stats.tokens, "mse_before": stats.dd / n, "mse_after": err_after / n,
           "relative_error_before": stats.dd / stats.yy if stats.yy else None,
           "relative_error_after": err_after / stats.yy if stats.yy else None,
           "cosine_before": stats.cos / n}
    if cos_after is not None:
        rep["cosine_after"] = cos_after
    return rep


RECON_LAYERS = ("before", "after", "both")
RECON_LOSSES = ("mse", "cosine")


@dataclass(frozen=True)
class ReconSpec:
    """Training of ``reconstruct``: Adam steps and learning rate, which kept layers, which loss."""

    # Chosen on SmolLM2 (C4 64x256, bench/recon_quality.py): on the demo cut (lstsq 860.7) 50 steps at 2e-3
    # give 412.6, at 1e-3 448.3, 100 at 5e-4 462.0, 200 at 5e-4 464.8 (more training fits C4, not wikitext);
    # a span that a high rate does not improve is retried at a quarter of it (train_span; docs/compensation.md).
    steps: int = 50
    lr: float = 2e-3
    layers: str = "before"
    loss: str = "mse"
    batch: int = 2  # calibration windows per step (only the trained layers run: small steps, many of them)
    depth: int = 1  # kept layers trained on each chosen side of a block

    def validate(self) -> None:
        if self.steps < 0 or not self.lr > 0 or self.batch < 1 or self.depth < 1:
            raise LayerpruneError("reconstruct needs --recon-steps >= 0, --recon-lr > 0, --recon-batch >= 1 and "
                                  "--recon-depth >= 1")
        if self.layers not in RECON_LAYERS:
            raise LayerpruneError(f"unknown --recon-layers '{self.layers}'; choose one of {', '.join(RECON_LAYERS)}")
        if self.loss not in RECON_LOSSES:
            raise LayerpruneError(f"unknown --recon-loss '{self.loss}'; choose one of {', '.join(RECON_LOSSES)}")


class CompMethod:
    """Base class: ``map_shape`` says what the method fits (matrix, or a scalar on the residual); ``trains``:
    the method also trains weights after the fold (see :mod:`.reconstruct`)."""

    name = "base"
    map_shape = "matrix"
    trains = False
    doc = ""

    def __init__(self, ridge: float = 0.0, steps: int = 100, lr: float = 1e-3, max_tokens: int = 16384,
                 recon: ReconSpec | None = None):
        if ridge < 0:
            raise LayerpruneError("--ridge must be >= 0")
        self.ridge, self.steps, self.lr, self.max_tokens = ridge, steps, lr, max_tokens
        self.recon = recon or ReconSpec()
        self.recon.validate()

    def keep_activations(self) -> int:
        return 0

    def check_tokens(self, tokens: int, dim: int, site_shape: str) -> None:
        """Refuse before the forward passes when the fit would be underdetermined."""

    def fit(self, stats: Stats, site_shape: str, label: str) -> Fit:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {"ridge": self.ridge}


class NoneMethod(CompMethod):
    name = "none"
    map_shape = "none"
    doc = "no compensation"

    def fit(self, stats: Stats, site_shape: str, label: str) -> Fit:
        return Fit("none")


class LstsqMethod(CompMethod):
    name = "lstsq"
    doc = "least-squares linear map onto the dense residual (ReplaceMe-style), closed form"

    def check_tokens(self, tokens: int, dim: int, site_shape: str) -> None:
        if site_shape == "matrix" and self.ridge == 0 and tokens < dim:
            raise LayerpruneError(f"lstsq needs at least as many calibration tokens ({tokens}) as the hidden size "
                                  f"({dim}) without --ridge: raise --nsamples/--seqlen or give --ridge")

    def solve(self, stats: Stats, site_shape: str, label: str) -> torch.Tensor:
        stats.check_finite(label)
        d = stats.dim
        lam = self.ridge * float(torch.diagonal(stats.A).mean())  # relative to the mean activation energy
        if site_shape == "diag":
            a = torch.diagonal(stats.A) + lam
            if bool((a <= 0).any()):
                raise LayerpruneError(f"block {label}: a channel of the fold site is always zero; give --ridge")
            return torch.diagonal(stats.C) / a
        A = stats.A + lam * torch.eye(d, dtype=torch.float64)
        try:
            u = torch.linalg.solve(A, stats.C)
        except RuntimeError:
            raise LayerpruneError(f"block {label}: the calibration statistics are singular; give --ridge "
                                  "(e.g. 1e-3) or more calibration tokens") from None
        if not bool(torch.isfinite(u).all()):
            raise LayerpruneError(f"block {label}: the least-squares solution is not finite; give --ridge")
        return u

    def fit(self, stats: Stats, site_shape: str, label: str) -> Fit:
        u = self.solve(stats, site_shape, label)
        err = stats.sq_error(u, site_shape)
        if err > stats.dd:  # rounding only (the identity is feasible): never hand back a worse map
            u = torch.zeros_like(u)
            err = stats.dd
        return Fit(site_shape, u, report=_fit_report(stats, err))


class CosineMethod(LstsqMethod):
    name = "cosine"
    doc = "ReplaceMe's cosine-distance objective, Adam from the least-squares solution"

    def keep_activations(self) -> int:
        return self.max_tokens

    def params(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "steps": self.steps, "lr": self.lr, "max_tokens": self.max_tokens}

    def fit(self, stats: Stats, site_shape: str, label: str) -> Fit:
        u0 = self.solve(stats, site_shape, label)
        # float32 for the optimisation (10x faster than float64 on a CPU); the start and result stay float64.
        m = torch.cat([a[0] for a in stats.acts])
        h = torch.cat([a[1] for a in stats.acts])
        y = torch.cat([a[2] for a in stats.acts])

        def loss(u: torch.Tensor) -> torch.Tensor:
            u = u.float()
            out = h + (m * u if site_shape == "diag" else m @ u)
            return (1 - torch.nn.functional.cosine_similarity(out, y, dim=-1)).mean()

        with torch.no_grad():
            candidates = [(float(loss(torch.zeros_like(u0))), torch.zeros_like(u0)), (float(loss(u0)), u0)]
        u = u0.float().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=self.lr)
        with torch.enable_grad():  # the drivers run under no_grad
            for _ in range(self.steps):
                opt.zero_grad()
                val = loss(u)
                val.backward()
                opt.step()
        with torch.no_grad():
            candidates.append((float(loss(u)), u.detach().double().clone()))
        best_loss, best = min(candidates, key=lambda c: c[0])  # never worse than no map or the lstsq start
        rep = _fit_report(stats, stats.sq_error(best, site_shape), cos_after=1 - best_loss)
        rep["cosine_distance_before"] = candidates[0][0]
        rep["cosine_distance_after"] = best_loss
        rep["fit_tokens"] = int(m.shape[0])
        return Fit(site_shape, best, report=rep)


class ScaleMethod(CompMethod):
    name = "scale"
    map_shape = "scalar"
    doc = "magnitude compensation (Prune&Comp): rescale the residual after the block to the dense norm"

    def params(self) -> dict[str, Any]:
        return {}

    def fit(self, stats: Stats, site_shape: str, label: str) -> Fit:
        stats.check_finite(label)
        alpha = stats.norm_y / stats.norm_h if stats.norm_h > 0 else 1.0
        n = max(stats.tokens, 1)
        rep = {"tokens": stats.tokens, "alpha": alpha, "mean_norm_before": stats.norm_h / n,
               "mean_norm_dense": stats.norm_y / n, "mean_norm_after": alpha * stats.norm_h / n,
               "cosine_before": stats.cos / n}
        return Fit("scalar", alpha=alpha, report=rep)


class ReconstructMethod(LstsqMethod):
    name = "reconstruct"
    trains = True
    doc = "block-local reconstruction: lstsq, then the kept layer beside each block trained to the dense state"

    def params(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "steps": self.recon.steps, "lr": self.recon.lr, "layers": self.recon.layers,
                "loss": self.recon.loss, "batch": self.recon.batch, "depth": self.recon.depth}


METHODS: dict[str, type[CompMethod]] = {}


def register(cls: type[CompMethod]) -> type[CompMethod]:
    METHODS[cls.name] = cls
    return cls


for _cls in (NoneMethod, LstsqMethod, CosineMethod, ScaleMethod, ReconstructMethod):
    register(_cls)


def make_method(name: str, **params: Any) -> CompMethod:
    """A method instance by name; unknown names are a one-line error listing the registered ones."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise LayerpruneError(f"unknown compensation method '{name}'; choose one of {', '.join(METHODS)}") from None
    return cls(**params)


__all__ = ["METHODS", "CompMethod", "Fit", "ReconSpec", "Stats", "make_method", "register"]
