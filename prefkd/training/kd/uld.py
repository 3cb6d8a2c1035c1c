"""ULD: universal logit distillation (Boizard et al. 2024)."""

from __future__ import annotations

import torch

from prefkd.training.kd.base import KDLoss, KDSide, zero_loss
from prefkd.training.kd.pairing import ordered_response_predictions


class ULD(KDLoss):
    """Universal Logit Distillation (Boizard et al. 2024).

    Per paired position: the closed-form Wasserstein-1 distance the paper uses, i.e. the L1 distance
    between the two probability vectors sorted in decreasing order, the smaller vocabulary padded
    with zeros: ``sum_k |sort(p_s)_k - sort(p_t)_k|``. Positions are paired by order within the
    response (i-th with i-th, up to the shorter response). ``p = softmax(logits / T)`` on both sides;
    no T^2 factor. Mean over paired positions.
    """

    name = "uld"

    def forward(self, student: KDSide, teacher: KDSide):
        b, ps, pt = ordered_response_predictions(student, teacher)
        if b.numel() == 0:
            return zero_loss(student.logits), {"kd": 0.0, "kd_positions": 0}
        dev_t = teacher.logits.device
        zt = teacher.logits.detach()[b.to(dev_t), pt.to(dev_t)].to(student.logits.device)
        s = torch.softmax(student.logits[b, ps].float() / self.temperature, dim=-1)
        t = torch.softmax(zt.float() / self.temperature, dim=-1)
        common = min(s.shape[-1], t.shape[-1])
        # Only the largest `common` probabilities of the larger vocabulary meet a non-padding entry;
        # its remaining tail meets the zero padding and enters as one sum. (topk is ~3x faster than a
        # full sort of a 150k vocabulary and gives the same value and gradient.)
        s_top = s.topk(common, dim=-1, sorted=True).values
        t_top = t.topk(common, dim=-1, sorted=True).values
        dist = (s_top - t_top).abs().sum(-1)
        dist = dist + (s.sum(-1) - s_top.sum(-1)) + (t.sum(-1) - t_top.sum(-1))
        loss = dist.mean()
        return loss, {"kd": float(loss.detach()), "kd_positions": int(b.numel())}
