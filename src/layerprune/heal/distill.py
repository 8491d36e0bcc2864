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


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over positions of ``T^2 * KL(p_teacher || p_student)`` at temperature ``T``; logits are ``[N, V]``."""
    t = float(temperature)
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * (t * t)


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


def check_vocab(student: nn.Module, teacher: nn.Module) -> None:
    """Teacher and student must score the same vocabulary."""
    s = student.get_output_embeddings().weight.shape[0]
    t = teacher.get_output_embeddings().weight.shape[0]
    if s != t:
        raise LayerpruneError(f"teacher vocabulary ({t}) differs from the student's ({s}); distillation needs the "
                              "same tokenizer")


__all__ = ["check_vocab", "kd_loss_sum", "load_teacher", "mixed_loss_sum"]
