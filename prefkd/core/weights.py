"""Unit weights from contrastive log-prob differences: the CTPD estimator and the TIS-DPO transforms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefkd.core.layout import SIDES
from prefkd.errors import PrefkdError

TRANSFORMS = ("ctpd", "identity", "threshold", "threshold_scale", "binary_top", "rank", "random", "uniform")
AGGREGATIONS = ("sum", "mean")
WEIGHT_BINS = np.round(np.linspace(0.0, 5.0, 26), 2)  # histogram edges; values above 5 land in the last bin
# |exponent| of the unclamped ``identity`` transform: exp(80) ~ 5.5e34 stays far inside float32 (max ~3.4e38)
MAX_EXPONENT = 80.0


@dataclass
class WeightSpec:
    transform: str = "ctpd"
    aggregation: str = "sum"
    k: float = 1.0
    lower: float = -0.5  # L
    upper: float = 1.5  # U
    threshold: float = 0.1  # |delta| below this counts as no evidence (threshold transforms)
    top_fraction: float = 0.3  # binary_top: share of units that get the high weight
    seed: int = 1

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise PrefkdError(f"weight transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}.")
        if self.aggregation not in AGGREGATIONS:
            raise PrefkdError(f"weight aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}.")
        if self.lower > self.upper:
            raise PrefkdError(f"the weight clamp needs lower <= upper, got L={self.lower}, U={self.upper}.")


def transform_weights(
    delta: np.ndarray, mu: float, spec: WeightSpec, pair_id: int = 0, side: str = "chosen"
) -> np.ndarray:
    """Weights of the units of one response from their deltas (float64 in, float32 out).

    - ``ctpd``: k * exp(mu * clamp(delta, L, U))  (the CTPD / TIS-DPO estimator)
    - ``identity``: k * exp(mu * delta), delta unclamped; only the exponent mu * delta is clipped to
      [-MAX_EXPONENT, MAX_EXPONENT] (80) so that no weight overflows float32
    - ``threshold``: as ctpd, but units with |delta| < threshold get k (no evidence)
    - ``threshold_scale``: threshold, then scaled so the response's mean weight is k
    - ``binary_top``: k * exp(U) for the top ``top_fraction`` of units by mu * delta, k * exp(L) for the rest
    - ``rank``: k * exp(L + (U - L) * r), r in [0, 1] the rank of mu * delta within the response
    - ``random``: k * exp(mu * u), u ~ Uniform(L, U), seeded by (seed, pair_id, side)
    - ``uniform``: k
    """
    d = np.asarray(delta, dtype=np.float64)
    s = spec
    t = s.transform
    if t == "uniform" or len(d) == 0:
        w = np.full(len(d), s.k)
    elif t == "ctpd":
        w = s.k * np.exp(mu * np.clip(d, s.lower, s.upper))
    elif t == "identity":
        w = s.k * np.exp(np.clip(mu * d, -MAX_EXPONENT, MAX_EXPONENT))
    elif t in ("threshold", "threshold_scale"):
        w = s.k * np.exp(mu * np.clip(d, s.lower, s.upper))
        w = np.where(np.abs(d) < s.threshold, s.k, w)
        if t == "threshold_scale":
            w = w * (s.k / w.mean())
    elif t == "binary_top":
        score = mu * d
        n_top = max(1, int(round(s.top_fraction * len(d))))
        top = np.argsort(-score, kind="stable")[:n_top]
        w = np.full(len(d), s.k * np.exp(s.lower))
        w[top] = s.k * np.exp(s.upper)
    elif t == "rank":
        score = mu * d
        ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable")
        r = ranks / max(len(d) - 1, 1)
        w = s.k * np.exp(s.lower + (s.upper - s.lower) * r)
    elif t == "random":
        rng = np.random.default_rng([s.seed, int(pair_id) & 0x7FFFFFFF, SIDES.index(side)])
        w = s.k * np.exp(mu * rng.uniform(s.lower, s.upper, size=len(d)))
    else:  # pragma: no cover - validated in WeightSpec
        raise AssertionError(t)
    return w.astype(np.float32)
