"""Every search setting in one dataclass: the single source of the CLI flags and the recipe's ``search:`` keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import options
from ..errors import LayerpruneError
from ..options import opt

FINAL_MODES = ("restart", "continue")
DEFAULT_METRICS = ["bi", "angular", "taylor", "ppl", "magnitude", "reverse"]


@dataclass
class SearchConfig:
    """What ``search`` tries, how it ranks, and how much it spends before the final heal."""

    # Candidates.
    metrics: list[str] = opt(DEFAULT_METRICS, "metrics whose cut is a candidate (comma-separated)", "search")
    iterative: list[str] = opt(["bi"], "calibration metrics also re-scored after each removal (SLEB-style; "
                                       "one-shot scores pick scattered layers)", "search")
    blocks: bool = opt(True, "every contiguous block of the needed length is a candidate", "search")
    random: int = opt(1, "random cuts as a control", "search")
    protect_first: int = opt(0, "never remove the first N layers", "search")
    protect_last: int = opt(0, "never remove the last N layers", "search")
    # Calibration and the proxy (no training).
    calib: str = opt("c4", "calibration text for scoring, fitting and the proxy (never evaluation text)", "search")
    nsamples: int = opt(8, "scoring windows", "search")
    heldout: int = opt(16, "held-out windows for the proxy, disjoint from every scoring and fitting window",
                       "search")
    seqlen: int = opt(128, "tokens per scoring / held-out window", "search")
    batch_size: int = opt(8, "windows per forward pass", "search")
    compensation: str = opt("lstsq", "training-free compensation tried per candidate (none: off)", "search")
    compensate_top: int = opt(2, "best candidates (by uncompensated KL) also tried compensated; the seed's "
                                 "reverse cut always is", "search")
    fit_nsamples: int = opt(32, "windows the compensation map is fitted on (disjoint from the held-out ones)",
                            "search")
    fit_seqlen: int = opt(256, "tokens per fitting window", "search")
    # Probe (a short heal of the best few) and final heal.
    probe_top: int = opt(3, "candidates (by proxy KL) probed with a short heal (0: the proxy decides)", "search")
    probe_steps: int | None = opt(None, "healing steps per probe (default: a tenth of the final heal's steps, "
                                        "at least 5)", "search")
    probe_prompts: int = opt(4, "held-out instructions for the probe's greedy agreement with dense", "search")
    probe_new_tokens: int = opt(32, "tokens generated per probe prompt", "search")
    final: str = opt("restart", "final heal: restart from the winner's unprobed cut (Puzzletron's rule) or "
                                "continue from its probe", "search", FINAL_MODES)
    budget_minutes: float | None = opt(None, "wall-clock budget: the final heal gets the steps the time left "
                                             "after the search allows, at the probe's measured step time", "search")
    seed: int = opt(42, "seed of calibration sampling and the random control", "search", recipe=False)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SearchConfig:
        return options.from_kwargs(cls, "search", kwargs)

    def validate(self) -> None:
        from ..compensation import METHODS as COMP
        from ..metrics import make_metric

        if not self.metrics and not self.blocks and self.random < 1:
            raise LayerpruneError("search has no candidates: give --metrics, --blocks or --random")
        for m in [*self.metrics, *self.iterative]:
            make_metric(m)  # an unknown name is one line, before any work
        bad = sorted(set(self.iterative) - set(self.metrics))
        if bad:
            raise LayerpruneError(f"search: iterative metrics {bad} are not among the metrics {self.metrics}")
        if self.compensation not in COMP:
            raise LayerpruneError(f"search: unknown compensation '{self.compensation}'; choose one of "
                                  f"{', '.join(COMP)}")
        for name in ("nsamples", "heldout", "batch_size", "fit_nsamples", "probe_prompts", "probe_new_tokens"):
            if getattr(self, name) < 1:
                raise LayerpruneError(f"search: {name} must be >= 1 (got {getattr(self, name)})")
        for name in ("seqlen", "fit_seqlen"):
            if getattr(self, name) < 2:
                raise LayerpruneError(f"search: {name} must be >= 2")
        for name in ("random", "compensate_top", "probe_top", "protect_first", "protect_last"):
            if getattr(self, name) < 0:
                raise LayerpruneError(f"search: {name} must be >= 0 (got {getattr(self, name)})")
        if self.probe_steps is not None and self.probe_steps < 1:
            raise LayerpruneError("search: probe_steps must be >= 1")
        if self.final not in FINAL_MODES:
            raise LayerpruneError(f"search: final must be one of {', '.join(FINAL_MODES)}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise LayerpruneError("search: budget_minutes must be positive")

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


__all__ = ["DEFAULT_METRICS", "FINAL_MODES", "SearchConfig"]
