"""The layout of a preference pair, stated once.

A pair has two sides, ``chosen`` and ``rejected``, and each side has the token ids
of two roles, the ``teacher`` and the ``student`` tokenizer.  A batch of B pairs
is laid out as ``[chosen; rejected]`` along dim 0: rows ``0..B-1`` are the chosen
responses and rows ``B..2B-1`` their rejected responses, in the same order.
"""

from __future__ import annotations

ROLES = ("teacher", "student")
SIDES = ("chosen", "rejected")
UNITS = ("span", "token")  # loss units: aligned spans (CTPD) or each model's own tokens (DPO, TIS-DPO)


def chosen_rejected(x):
    """Split a ``[chosen; rejected]`` tensor [2B, ...] into its chosen [B, ...] and rejected [B, ...] halves."""
    chosen, rejected = x.chunk(2)
    return chosen, rejected
