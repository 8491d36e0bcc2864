"""Training engine: transformers' Trainer with the loss, callbacks and bookkeeping healing needs.

* The loss is computed on the trained (response) positions only, and the head is applied only there: a forward
  pre-hook on the output head selects those hidden states, so logits for prompt and padding positions are never
  materialised (with a 49k-152k vocabulary they dominate activation memory).
* A NaN/inf loss aborts at once with one line, before the optimizer could apply it.
* The final step is always evaluated and saved, so ``load_best_model_at_end`` chooses among every evaluation.
* Step time, tokens and peak memory are measured for heal.json and the progress bar (loss, tokens/s, ETA).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from ..data.instruct import IGNORE_INDEX, SAMPLE_INDEX, PackCollator, PadCollator, model_inputs
from ..errors import LayerpruneError
from .distill import kd_loss_sum, mixed_loss_sum
from .heads import HeadSelector, _selected
from .prefix_cache import PrefixCache
from .teacher_cache import TeacherCache


class NonFiniteLoss(LayerpruneError):
    """Training produced a NaN or infinite loss."""


class Diverged(LayerpruneError):
    """Training destroyed the model (exploding weights, or predictions collapsed to uniform)."""


# A healthy model, even a badly pruned one, is confidently wrong: its predictive entropy sits far below ln(V).
# One that predicts (near-)uniformly has entropy ln(V) and a loss of ln(V) -- which can look like progress.
UNIFORM_ENTROPY = 0.95  # fraction of ln(V) that counts as uniform
BASELINE_ENTROPY = 0.9  # ... when the model started below this fraction (random tiny models start uniform)
WEIGHT_GROWTH = 10.0  # trainable-weight norm growth over the start that counts as exploding


class HealTrainer(Trainer):
    """Trainer with a response-only loss (+ optional distillation) and a NaN/inf guard."""

    def __init__(self, *args: Any, head: nn.Module, teacher: nn.Module | None = None,
                 teacher_head: nn.Module | None = None, distill_temperature: float = 2.0,
                 distill_weight: float = 0.5, prefix_cache: PrefixCache | None = None,
                 shared_prefix: Any = None, teacher_cache: TeacherCache | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.selector = HeadSelector(head)
        self.prefix_cache = prefix_cache
        self.teacher = teacher
        self.teacher_selector = HeadSelector(teacher_head) if teacher is not None and teacher_head else None
        self.shared_prefix = shared_prefix  # SharedPrefix: the teacher reuses the student's frozen prefix
        self.teacher_cache = teacher_cache  # the teacher's log-probs from disk (no teacher loaded)
        self.distill_temperature = distill_temperature
        self.distill_weight = distill_weight
        self._entropy = [0.0, 0]  # predictive entropy summed over the evaluated tokens, and their count
        self._vocab = 0
        self.entropy_start: float | None = None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        labels = inputs["labels"]
        fwd = model_inputs(inputs)
        targets = labels[:, 1:]
        sel = targets.ne(IGNORE_INDEX)
        keep = F.pad(sel, (0, 1), value=False)  # logits at t predict token t+1
        cached = self.prefix_cache.batch(inputs) if self.prefix_cache is not None and model.training \
            else contextlib.nullcontext()
        with self.selector.select(keep), cached:
            out = model(**fwd, use_cache=False)
        logits = _selected(out.logits, keep)
        loss_sum = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
        if not model.training:
            with torch.no_grad():
                logp = torch.log_softmax(logits.float(), dim=-1)
                self._entropy[0] += float(-(logp.exp() * logp).sum())
                self._entropy[1] += logits.shape[0]
                self._vocab = logits.shape[-1]
        if self.teacher_cache is not None and model.training:
            values, indices = self.teacher_cache.targets(inputs[SAMPLE_INDEX], logits.shape[0])
            kd = kd_loss_sum(logits, values, self.distill_temperature, indices)
            loss_sum = mixed_loss_sum(loss_sum, kd, self.distill_weight)
        elif self.teacher is not None and model.training:
            # Distillation shapes training only; evaluation reports the plain LM loss so validation losses
            # compare across methods and with the loss before healing.
            ctx = self.teacher_selector.select(keep) if self.teacher_selector else contextlib.nullcontext()
            share = self.shared_prefix
            if share is not None:
                share.active = True
            try:
                with torch.no_grad(), ctx:
                    t_logits = _selected(self.teacher(**fwd, use_cache=False).logits, keep)
            finally:
                if share is not None:
                    share.active = False
                    share.hidden = None
            kd = kd_loss_sum(logits, t_logits, self.distill_temperature)
            loss_sum = mixed_loss_sum(loss_sum, kd, self.distill_weight)
        # Same normalisation as transformers' own causal-LM loss: by the trained tokens of the whole
        # accumulated (and, across processes, gathered) batch when the Trainer counted them.
        denom = num_items_in_batch if num_items_in_batch is not None else sel.sum().clamp(min=1)
        loss = loss_sum / denom
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation, plus a stop when predictions have collapsed to uniform (divergence)."""
        self._entropy = [0.0, 0]
        metrics = super().evaluate(*args, **kwargs)
        if self._entropy[1] and self._vocab > 1:
            ent = self._entropy[0] / self._entropy[1] / math.log(self._vocab)  # as a fraction of ln(V)
            if self.entropy_start is None:
                self.entropy_start = ent
            elif ent >= UNIFORM_ENTROPY and self.entropy_start < BASELINE_ENTROPY:
                raise Diverged(
                    f"healing diverged at step {self.state.global_step}: the model now predicts almost uniformly "
                    f"(entropy {ent:.0%} of ln(vocab), {self.entropy_start:.0%} at the start; validation loss "
                    f"{metrics.get('eval_loss', float('nan')):.2f} is no improvement); nothing was saved -- lower "
                    f"--lr (now {self.args.learning_rate:g})")
        return metrics

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device)
        if self.args.world_size > 1:
            # Every process must stop together, or the others wait forever in the next all-reduce.
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLoss(f"training loss became {loss.item()} at step {self.state.global_step + 1}; "
                                "aborted before the update (lower --lr, check the data, or use float32)")
        return loss


# Packed micro-batches above this many tokens are not used by default: the sdpa/eager path builds an N x N
# mask (N = all tokens of the micro-batch), so attention memory grows with the square of the micro-batch.
PACK_AUTO_MAX_TOKENS = 8192


def packing_problem(model: nn.Module, rows: list[dict[str, list[int]]], pad_id: int) -> str | None:
    """Why ``model`` cannot be trained on packed sequences, or None when it can: two short samples must give the
    same logits packed into one row (``position_ids`` restarting per sample, no attention mask) as in a padded
    batch. An architecture that ignores ``position_ids`` or lets samples attend to each other fails this."""
    lengths = (12, 9)
    two = [{"input_ids": r["input_ids"][:n], "labels": r["labels"][:n]} for r, n in zip(rows[:2], lengths)]
    if len(two) < 2 or len(two[1]["input_ids"]) < 2:
        return "fewer than two training samples to check it on"
    param = next(model.parameters())
    device, half = param.device, param.dtype in (torch.float16, torch.bfloat16)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = PadCollator(pad_id, pad_to_multiple_of=None)(two)
            packed = PackCollator()(two)
            ref = model(**{k: v.to(device) for k, v in model_inputs(padded).items()}, use_cache=False).logits
            ref = ref[padded["attention_mask"].bool().to(device)].float()
            got = model(**{k: v.to(device) for k, v in model_inputs(packed).items()}, use_cache=False).logits
            got = got[0].float()
    except Exception as e:  # noqa: BLE001 - any failure means "cannot pack", never a crash
        return f"the model rejected packed inputs ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    finally:
        model.train(was_training)
    if got.shape != ref.shape:
        return f"packed logits have shape {tuple(got.shape)}, padded {tuple(ref.shape)}"
    tol = (5e-2 if half else 1e-3) * float(ref.abs().max()) + 1e-5
    diff = float((got - ref).abs().max())
    if diff > tol:
        return f"packed and padded logits differ (max {diff:.3g} > {tol:.3g}): samples are not kept apart"
    return None


class HealProgress(TrainerCallback):
    """Progress bar (loss, tokens/s, ETA), eval lines, step timing and tokens for heal.json."""

    def __init__(self, enabled: bool = True, desc: str = "heal"):
        self.enabled = enabled
        self.desc = desc
        self.bar: Any = None
        self.step_time = 0.0
        self._t0: float | None = None
        self.tokens_start = 0
        self.tokens_end = 0
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.evals: list[tuple[int, float]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.tokens_start = self.tokens_end = state.num_input_tokens_seen
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                            dynamic_ncols=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._t0 is not None:
            self.step_time += time.perf_counter() - self._t0
            self._t0 = None
        self.tokens_end = state.num_input_tokens_seen
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(self._postfix(), refresh=False)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
        if not metrics or "eval_loss" not in metrics:
            return
        v = float(metrics["eval_loss"])
        if not math.isfinite(v):
            raise NonFiniteLoss(f"validation loss is {v} at step {state.global_step}; aborted")
        self.last_eval = v
        self.evals.append((state.global_step, v))
        if self.bar is not None:
            self.bar.write(f"step {state.global_step}: val loss {v:.4f}")
            self.bar.set_postfix(self._postfix())

    def _postfix(self) -> dict[str, str]:
        post = {}
        if self.last_loss is not None:
            post["loss"] = f"{self.last_loss:.4f}"
        if self.last_eval is not None:
            post["val"] = f"{self.last_eval:.4f}"
        post["tok/s"] = f"{self.tokens_per_s:.0f}"
        return post

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @property
    def tokens(self) -> int:
        return int(self.tokens_end - self.tokens_start)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time if self.step_time > 0 else 0.0


class DivergenceGuard(TrainerCallback):
    """Stop when the trainable weights stop being finite or grow far beyond their starting norm."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.start = 0.0

    def _norm(self) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach().float())
                                                           for p in self.params])))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self.start = self._norm() if self.params else 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.params:
            return
        norm = self._norm()
        if not math.isfinite(norm) or (self.start > 0 and norm > WEIGHT_GROWTH * self.start):
            raise Diverged(f"healing diverged at step {state.global_step}: the trained weights' norm went from "
                           f"{self.start:.3g} to {norm:.3g}; nothing was saved -- lower --lr (now "
                           f"{args.learning_rate:g})")


class EvalAtEnd(TrainerCallback):
    """Evaluate and save at the last step too, so the best checkpoint is chosen among all evaluations; log the
    training loss at every checkpoint and at the last step, so the logged windows restart where a resumed run
    restarts (its loss history equals an uninterrupted run's) and cover every step."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        last = state.global_step >= state.max_steps
        if last and args.eval_strategy != "no":
            control.should_evaluate = True
            control.should_save = True
        if last or control.should_save:
            control.should_log = True
        return control


class PeakMemory:
    """Peak memory over a region: CUDA allocator peak, else the process's resident-set high-water mark (reset
    through /proc/self/clear_refs where the kernel allows, else the lifetime peak)."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "none"

    def start(self) -> None:
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda_max_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "rss_peak"
        except OSError:
            self.kind = "rss_peak_process_lifetime"

    def read(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.max_memory_allocated())
        peak = _proc_status_bytes("VmHWM") if self.kind == "rss_peak" else None
        return peak if peak is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _proc_status_bytes(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where /proc lacks it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident memory now (bytes); 0 where /proc is missing."""
    return _proc_status_bytes("VmRSS") or 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


__all__ = ["PACK_AUTO_MAX_TOKENS", "EvalAtEnd", "HeadSelector", "HealProgress", "HealTrainer", "NonFiniteLoss",
           "PeakMemory", "current_rss", "packing_problem", "world_size"]
