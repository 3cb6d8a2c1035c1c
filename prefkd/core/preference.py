"""The one preference loss over units (tokens or aligned spans).

DPO, TIS-DPO and CTPD are configurations of it:
``margin = sum_i w_i * (l_policy_i - l_ref_i)`` per response and
``loss = -logsigmoid(beta * (margin_chosen - margin_rejected))``.

Every tensor is in the ``[chosen; rejected]`` batch layout of ``prefkd.core.layout``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefkd.core.layout import chosen_rejected

# A log-ratio margin within this many nats of 0 is a tie. TRL's ``rewards/accuracies`` counts ``chosen > rejected``
# with a live reference, so policy == reference is an exact tie (not a win); prefkd's reference log-probs are stored
# by another job, and the same model scored again differs by float noise (1e-8 to 1e-4 nats per pair in float32).
# The same tolerance as the held-out evaluation's (prefkd.evaluation.preference.TIE_NATS).
TIE_NATS = 1e-3
# A pair whose loss gradient factor sigmoid(-beta * margin) is above this is saturated: the loss pushes it at full
# strength whatever its margin, so the objective acts as a fixed weighted push (issue 12's diagnostic).
SATURATED_FACTOR = 0.99


@dataclass
class PairUnits:
    """Per-unit values of a batch of pairs, every tensor [2B, M] in the ``[chosen; rejected]`` layout."""

    policy: torch.Tensor  # [2B, M] the trained model's unit log-probs
    reference: torch.Tensor  # [2B, M] the reference model's unit log-probs (constants)
    weights: torch.Tensor  # [2B, M] unit weights (constants; 1 for DPO)
    mask: torch.Tensor  # [2B, M] 1 for real units, 0 for padding


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar mean over pairs
    losses: torch.Tensor  # [B]
    reward_chosen: torch.Tensor  # [B] beta * margin_w
    reward_rejected: torch.Tensor  # [B] beta * margin_l
    logratio: torch.Tensor  # [B] margin_w - margin_l (nats, unscaled)
    mean_weight: tuple[float, float] = (1.0, 1.0)  # mean unit weight of the chosen and the rejected responses

    def metrics(self) -> dict[str, float]:
        """Mean loss, rewards and margin; ``rewards/accuracy``: the share of pairs the chosen response wins, a tie
        (``|logratio| <= TIE_NATS``) counting as no win, as TRL's strict ``chosen_rewards > rejected_rewards``."""
        margin = self.reward_chosen - self.reward_rejected
        return {
            "loss": float(self.loss.detach()),
            "rewards/chosen": float(self.reward_chosen.mean()),
            "rewards/rejected": float(self.reward_rejected.mean()),
            "rewards/margin": float(margin.mean()),
            "rewards/accuracy": float((self.logratio > TIE_NATS).float().mean()),
            # diagnostics of the objective: beta * margin, the share of saturated pairs, the weights' scale
            "objective/beta_margin": float(margin.mean()),
            "objective/saturated": float((torch.sigmoid(-margin) > SATURATED_FACTOR).float().mean()),
            "weights/chosen": self.mean_weight[0],
            "weights/rejected": self.mean_weight[1],
        }


def weighted_margin(
    policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``sum_i w_i * (policy_i - reference_i)`` over valid units (mask), per row."""
    return ((policy - reference) * weights * mask).sum(dim=-1)


def preference_loss(units: PairUnits, beta: float) -> PreferenceOutput:
    """The one preference loss over ``units`` ([chosen; rejected] rows).

    Reference values and weights are constants (detached here), so gradient flows
    only through the policy's log-probs.
    """
    margins = weighted_margin(units.policy, units.reference.detach(), units.weights.detach(), units.mask)  # [2B]
    m_w, m_l = chosen_rejected(margins)  # [B], [B]
    losses = -F.logsigmoid(beta * (m_w - m_l))  # [B]
    return PreferenceOutput(
        loss=losses.mean(),
        losses=losses,
        reward_chosen=(beta * m_w).detach(),
        reward_rejected=(beta * m_l).detach(),
        logratio=(m_w - m_l).detach(),
        mean_weight=_mean_weights(units),
    )


def _mean_weights(units: PairUnits) -> tuple[float, float]:
    """The mean weight of a real unit of the chosen and of the rejected responses."""
    w_w, w_l = chosen_rejected(units.weights.detach() * units.mask)  # [B, M], [B, M]
    n_w, n_l = chosen_rejected(units.mask)  # [B, M], [B, M]
    return float(w_w.sum() / n_w.sum().clamp(min=1)), float(w_l.sum() / n_l.sum().clamp(min=1))
