"""Knowledge distillation: the unpruned model's logits as soft targets, mixed with the LM loss.

``loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the trained
(response) positions only; ``T^2`` keeps the KL gradient on the scale of the CE gradient (Hinton et al.).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerpruneError


class _TemperedKL(torch.autograd.Function):
    """``sum_n sum_k p[n, k] * (log p[n, k] - log_softmax(s[n] / T)[idx[n, k]])`` (``idx`` None: every entry)
    with a hand-written backward. autograd's log_softmax -> gather path spends about six passes over the [N, V]
    logits (the log-probs written out, a zero gradient filled and scattered into, log_softmax's own backward);
    this one keeps one tensor, ``exp((s - max) / T)``, and turns it into the gradient in place: 2.5x faster at
    SmolLM2's 49k vocabulary (0.36 s against 0.91 s per 2,048 positions on one core), the gradient equal to
    1e-8. The student's log-probs are only formed where the teacher has mass ([N, K] for a top-K cache)."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, t_logp: torch.Tensor, idx: torch.Tensor | None,
                t: float) -> torch.Tensor:
        m = s.amax(-1, keepdim=True)
        e = (s - m).mul_(1.0 / t).exp_()
        z = e.sum(-1, keepdim=True)
        lse = m / t + z.log()  # logsumexp(s / T) per row
        sk = s if idx is None else s.gather(-1, idx)
        p = t_logp.exp()
        ctx.save_for_backward(e, z, p, idx)
        ctx.t = t
        return (p * (t_logp - sk / t + lse)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        e, z, p, idx = ctx.saved_tensors
        t = ctx.t
        grad = e.mul_((g / t) * p.sum(-1, keepdim=True) / z)  # softmax(s / T) * sum_k p / T, in place
        if idx is None:
            grad.sub_(p * (g / t))
        else:
            grad.scatter_add_(-1, idx, p * (-g / t))
        return grad, None, None, None


def kd_loss_sum(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float,
                indices: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over positions of ``T^2 * KL(p_teacher || p_student)`` at temperature ``T``; rows are ``[N, V]``.

    ``teacher``: the teacher's logits or log-probs at temperature 1 (the teacher cache's; ``log_softmax`` is
    shift-invariant, so both give the same tempered teacher). With ``indices`` ([N, K]) the teacher is only its
    top K (renormalised over them) and the student's tempered log-probs are gathered there."""
    t = float(temperature)
    s = student_logits.float()
    with torch.no_grad():
        t_logp = F.log_softmax(teacher.to(s.device).float() / t, dim=-1)
    kl = _TemperedKL.apply(s, t_logp, None if indices is None else indices.to(s.device), t)
    return kl * (t * t)


def mixed_loss_sum(ce_sum: torch.Tensor, kd_sum: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * CE + weight * KD`` (both already summed over positions)."""
    return (1.0 - weight) * ce_sum + weight * kd_sum


def load_teacher(path: str, dtype: Any, device: str) -> nn.Module:
    """The teacher, frozen, in eval mode, on ``device``."""
    from ..models import load_model

    teacher = load_model(path, dtype=dtype)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device)


class SharedPrefix:
    """Shared-prefix distillation: when the student's frozen layers are the teacher's own first layers (same
    weights, same order — partial fine-tuning after removing later layers), the teacher does not run them again.

    A forward hook records what the student's last frozen layer hands on; during the teacher's pass its first
    ``first - 1`` layers hand their input on untouched and layer ``first - 1`` returns the recording, so the
    teacher computes only the layers above the shared prefix (and its head only where the loss is taken).
    """

    def __init__(self, student_layers: nn.ModuleList, teacher_layers: nn.ModuleList, first: int):
        self.first = first
        self.hidden: torch.Tensor | None = None
        self.active = False
        self.teacher_layers_run = 0  # teacher decoder-layer calls (for tests and heal.json)
        self.handle = student_layers[first - 1].register_forward_hook(self._record)
        for i, layer in enumerate(teacher_layers):
            self._wrap(layer, i)

    def _record(self, module: Any, args: tuple, out: Any) -> None:
        self.hidden = out if torch.is_tensor(out) else out[0]

    def _wrap(self, layer: nn.Module, i: int) -> None:
        fwd = layer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.active and i < self.first and self.hidden is not None:
                if i == self.first - 1:
                    return self.hidden
                return args[0] if args else kwargs["hidden_states"]
            self.teacher_layers_run += 1
            return fwd(*args, **kwargs)

        layer.forward = forward

    @classmethod
    def why_not(cls, student: Any, teacher: Any, first: int) -> str | None:
        """Why the prefix cannot be shared, or None when student and teacher agree on it exactly."""
        from ..arch import parts

        if first < 1:
            return "no frozen prefix"
        s, t = parts(student), parts(teacher)
        if t.num_layers < first:
            return "the teacher has fewer layers than the student's frozen prefix"
        pairs = [(s.embed, t.embed)] + [(s.layers[i], t.layers[i]) for i in range(first)]
        for a, b in pairs:
            sa, sb = a.state_dict(), b.state_dict()
            if sa.keys() != sb.keys() or any(not torch.equal(sa[k].to(sb[k].device), sb[k]) for k in sa):
                return "the student's frozen layers differ from the teacher's first layers"
        return None

    def remove(self) -> None:
        self.handle.remove()


def check_vocab(student: Any, teacher: Any) -> None:
    """Teacher and student must score the same vocabulary."""
    s = student.get_output_embeddings().weight.shape[0]
    t = teacher.get_output_embeddings().weight.shape[0]
    if s != t:
        raise LayerpruneError(f"teacher vocabulary ({t}) differs from the student's ({s}); distillation needs the "
                              "same tokenizer")


def check_cached_vocab(student: Any, cache: Any) -> None:
    """The cached teacher must score the student's vocabulary (known once any row is cached)."""
    s = student.get_output_embeddings().weight.shape[0]
    t = cache.vocab
    if t is not None and s != t:
        raise LayerpruneError(f"the cached teacher's vocabulary ({t}) differs from the student's ({s}); "
                              "distillation needs the same tokenizer")


__all__ = ["SharedPrefix", "check_cached_vocab", "check_vocab", "kd_loss_sum", "load_teacher", "mixed_loss_sum"]
