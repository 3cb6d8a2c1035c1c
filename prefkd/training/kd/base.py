"""The common base of the KD terms: each model's view of a batch (``KDSide``), ``KDLoss``, and small helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefkd.errors import PrefkdError

NO_ID = -1


@dataclass
class KDSide:
    """One model's view of a batch of chosen responses."""

    logits: torch.Tensor  # [B, T, V]; logits[b, t] predicts token t + 1
    hidden: torch.Tensor | None  # [B, T, H] final hidden states (DSKD only)
    input_ids: torch.Tensor  # [B, T]
    unit_ids: torch.Tensor  # [B, T] aligned unit (span / EOS) of every token, -1 elsewhere
    target_mask: torch.Tensor  # [B, T] 1.0 where token t is a response token to predict (t >= 1)


class KDLoss(torch.nn.Module):
    """Base of all KD terms: ``forward(student, teacher) -> (loss scalar, metrics dict of floats)``."""

    name = "kd"

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        if not temperature > 0:
            raise PrefkdError(f"the KD temperature must be positive, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, student: KDSide, teacher: KDSide):  # pragma: no cover - abstract
        raise NotImplementedError


def kd_mix(ce: torch.Tensor, kd: torch.Tensor, kappa: float = 0.5) -> torch.Tensor:
    """``(1 - kappa) * ce + kappa * kd``."""
    return (1.0 - kappa) * ce + kappa * kd


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 connected to the graph of every given tensor (the loss of an empty batch)."""
    out = None
    for t in tensors:
        term = t.sum() * 0.0
        out = term if out is None else out + term
    return out.float()


def check_pair(student: KDSide, teacher: KDSide) -> None:
    if student.logits.shape[0] != teacher.logits.shape[0]:
        raise PrefkdError(
            f"the student batch has {student.logits.shape[0]} rows and the teacher batch "
            f"{teacher.logits.shape[0]}; KD needs both views of the same responses in the same order."
        )


def prediction_mask(side: KDSide) -> torch.Tensor:
    """[B, T] bool: position t predicts a target token (target_mask[t + 1] is set)."""
    tm = side.target_mask > 0
    out = torch.zeros_like(tm)
    out[:, :-1] = tm[:, 1:]
    return out


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row KL(softmax(p / T) || softmax(q / T)), float32, clamped at 0 (rounding)."""
    logp = F.log_softmax(p_logits.float() / temperature, dim=-1)
    logq = F.log_softmax(q_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)
