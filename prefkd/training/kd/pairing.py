"""Which student and teacher predictions are compared (see the package docstring)."""

from __future__ import annotations

import torch

from prefkd.training.kd.base import KDSide, check_pair, prediction_mask


def _unit_starts(side: KDSide):
    """(row, unit, prediction position) for the first token of every unit on this side."""
    u = side.unit_ids.long()
    tm = side.target_mask > 0
    prev = torch.full_like(u, -2)
    prev[:, 1:] = u[:, :-1]
    start = (u >= 0) & tm & (u != prev)
    start[:, 0] = False  # nothing predicts position 0
    rows, cols = start.nonzero(as_tuple=True)
    return rows, u[rows, cols], cols - 1


def aligned_unit_predictions(student: KDSide, teacher: KDSide):
    """Pairs of comparable predictions: ``(row, student position, teacher position)`` (LongTensors).

    One pair per unit (span or EOS) present on both sides: each side's prediction made just before
    the first token of that unit (see the module docstring for why these, and only these, match).
    """
    check_pair(student, teacher)
    device = student.logits.device
    rs, us, ps = _unit_starts(student)
    rt, ut, pt = _unit_starts(teacher)
    rt, ut, pt = rt.to(device), ut.to(device), pt.to(device)
    rs, us, ps = rs.to(device), us.to(device), ps.to(device)
    if us.numel() == 0 or ut.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    rows = student.unit_ids.shape[0]
    width = int(torch.maximum(us.max(), ut.max())) + 1
    big = torch.iinfo(torch.long).max

    def table(r, u, p):
        flat = torch.full((rows * width,), big, dtype=torch.long, device=device)
        flat.scatter_reduce_(0, r * width + u, p, reduce="amin")
        return flat.view(rows, width)

    ts, tt = table(rs, us, ps), table(rt, ut, pt)
    b, k = ((ts != big) & (tt != big)).nonzero(as_tuple=True)
    return b, ts[b, k], tt[b, k]


def _response_order(side: KDSide):
    """[B, R] prediction positions of each row in response order (-1 padded) and their count [B]."""
    m = prediction_mask(side)
    count = m.sum(1)
    width = int(count.max()) if m.numel() else 0
    table = torch.full((m.shape[0], max(width, 1)), -1, dtype=torch.long, device=m.device)
    rows, cols = m.nonzero(as_tuple=True)
    rank = m.long().cumsum(1) - 1
    table[rows, rank[rows, cols]] = cols
    return table, count


def ordered_response_predictions(student: KDSide, teacher: KDSide):
    """ULD pairing: the i-th response prediction of each side, i < min of the two lengths."""
    check_pair(student, teacher)
    device = student.logits.device
    ts, cs = _response_order(student)
    tt, ct = _response_order(teacher)
    tt, ct = tt.to(device), ct.to(device)
    n = torch.minimum(cs, ct)
    width = min(ts.shape[1], tt.shape[1])
    keep = torch.arange(width, device=device)[None, :] < n[:, None]
    b, i = keep.nonzero(as_tuple=True)
    return b, ts[b, i], tt[b, i]
