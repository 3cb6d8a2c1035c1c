"""Unit weights from contrastive log-prob differences: the CTPD estimator and the TIS-DPO transforms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefkd.core.layout import SIDES
from prefkd.errors import PrefkdError

TRANSFORMS = ("ctpd", "identity", "threshold", "threshold_scale", "binary_top", "rank", "random", "uniform")
AGGREGATIONS = ("sum", "mean")
# what a unit's delta contrasts: two models on the same response (l_pos - l_neg: CTPD, TIS-DPO), or one model on
# the two responses, spans paired by index (l(p_i^chosen) - l(p_i^rejected): CTPD-Lite)
CONTRASTS = ("models", "sides")
NORMALIZATIONS = ("none", "mean")  # signals.normalize: scale each response's weights to mean 1 or not
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
    top_fraction: float = 0.3  # binary_top: share of units that get weight 1 (TIS-DPO's top_percent / 100)
    seed: int = 1
    scale_min: float = 0.7  # rank and random: the range of TIS-DPO's rank_based / random transforms
    scale_max: float = 1.3
    eos_weight: float | None = None  # the EOS unit's weight (TIS-DPO: 0); None: the transform weighs it like any unit
    contrast: str = "models"  # see CONTRASTS
    normalize: str = "none"  # see NORMALIZATIONS

    def __post_init__(self):
        if self.contrast not in CONTRASTS:
            raise PrefkdError(f"the weight contrast must be one of {', '.join(CONTRASTS)}, got {self.contrast!r}.")
        if self.normalize not in NORMALIZATIONS:
            raise PrefkdError(f"weight normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}.")
        if self.transform not in TRANSFORMS:
            raise PrefkdError(f"weight transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}.")
        if self.aggregation not in AGGREGATIONS:
            raise PrefkdError(f"weight aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}.")
        if self.lower > self.upper:
            raise PrefkdError(f"the weight clamp needs lower <= upper, got L={self.lower}, U={self.upper}.")
        if self.scale_min > self.scale_max:
            raise PrefkdError(
                f"the rank/random weight range needs scale_min <= scale_max, got {self.scale_min} > {self.scale_max}."
            )
        if not 0.0 <= self.top_fraction <= 1.0:
            raise PrefkdError(f"binary_top's top_fraction must lie in [0, 1], got {self.top_fraction}.")


def _binary_top(score: np.ndarray, fraction: float) -> np.ndarray:
    """TIS-DPO's binary transform: 1 for the top ``int(n * fraction)`` scores, 0 for the rest. A score value that
    straddles the cut gets 0 everywhere (the released code maps each value to the flag of its last sorted place)."""
    n_top = int(len(score) * fraction + 1e-9)  # TIS-DPO: int(len * top_percent / 100); 1e-9 absorbs 0.3 * 10 < 3
    at_least = (score[None, :] >= score[:, None]).sum(axis=1)  # per unit: units scoring >= it (itself included)
    return (at_least <= n_top).astype(np.float64)


def _rank(score: np.ndarray, low: float, high: float) -> np.ndarray:
    """TIS-DPO's rank_based transform: low + (high - low) * rank / (n - 1), rank 0 for the lowest score (a stable
    sort: of equal scores the earlier unit ranks lower); a lone unit gets 1.0."""
    if len(score) == 1:
        return np.ones(1)
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(len(score))
    return low + (high - low) * ranks / (len(score) - 1)


def normalize_weights(w: np.ndarray, how: str) -> np.ndarray:
    """``mean``: scale one response's weights to mean 1 (k = M / sum w), so the weights reorder the response's
    units without changing the scale of its margin; ``none``: as they are. All-zero weights stay zero."""
    total = float(np.sum(w, dtype=np.float64))
    if how == "none" or total <= 0:
        return w
    return (w * (len(w) / total)).astype(w.dtype)


def transform_weights(
    delta: np.ndarray, mu: float, spec: WeightSpec, pair_id: int = 0, side: str = "chosen", eos: bool = False
) -> np.ndarray:
    """Weights of the units of one response from their deltas (float64 in, float32 out).

    - ``ctpd``: k * exp(mu * clamp(delta, L, U))  (the CTPD / TIS-DPO estimator)
    - ``identity``: k * exp(mu * delta), delta unclamped; only the exponent mu * delta is clipped to
      [-MAX_EXPONENT, MAX_EXPONENT] (80) so that no weight overflows float32
    - ``threshold``: as ctpd, but units with |delta| < threshold get k (no evidence)
    - ``threshold_scale``: threshold, then scaled so the response's mean weight is k
    - ``binary_top``: 1 for the top ``top_fraction`` of units by mu * delta, 0 for the rest (TIS-DPO's ``binary``)
    - ``rank``: scale_min + (scale_max - scale_min) * r, r in [0, 1] the rank of mu * delta within the response
      (TIS-DPO's ``rank_based``: 0.7 to 1.3, linear)
    - ``random``: Uniform(scale_min, scale_max) = U(0.7, 1.3) per unit, on both responses alike and independent of
      delta (the CTPD authors' random ablation, TIS-DPO's ``random``); seeded by (seed, pair_id, side)
    - ``uniform``: k

    The last four follow TIS-DPO's released code (preference_datasets.py), which maps mu * delta of the response
    tokens directly to these weights. ``eos`` says that the last unit is the response's EOS: with
    ``spec.eos_weight`` set it gets that weight and the transform sees only the other units (TIS-DPO's code gives
    the EOS token weight 0 and ranks the response tokens among themselves).
    """
    d = np.asarray(delta, dtype=np.float64)
    s = spec
    if eos and s.eos_weight is not None and len(d):
        rest = transform_weights(d[:-1], mu, s, pair_id, side)
        return np.append(rest, np.float32(s.eos_weight)).astype(np.float32)
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
        w = _binary_top(mu * d, s.top_fraction)
    elif t == "rank":
        w = _rank(mu * d, s.scale_min, s.scale_max)
    elif t == "random":
        rng = np.random.default_rng([s.seed, int(pair_id) & 0x7FFFFFFF, SIDES.index(side)])
        w = rng.uniform(s.scale_min, s.scale_max, size=len(d))
    else:  # pragma: no cover - validated in WeightSpec
        raise AssertionError(t)
    return w.astype(np.float32)


def side_contrast_weights(
    chosen: np.ndarray, rejected: np.ndarray, spec: WeightSpec, eos: tuple[bool, bool] = (False, False), pair_id=0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CTPD-Lite: weights of both responses from ONE model's unit log-probs of each, spans paired by index.

    ``chosen`` / ``rejected`` are the unit log-probs of the two responses (their last unit is the EOS when the
    matching ``eos`` flag is set). For the first n = min(spans of chosen, spans of rejected) spans,
    s_i = l(p_i^chosen) - l(p_i^rejected), and the chosen span gets transform(s_i) with mu = +1, the rejected one
    with mu = -1 (ctpd: k * exp(+-clamp(s_i, L, U))). The spans beyond the shorter response have no partner and
    get weight 1, and so does the EOS unit (``spec.eos_weight`` when set): it is no span of the response text
    (the authors' weight_lite.py scores only the aligned spans, and pads the unpaired tail with 1.0).
    -> (delta_chosen, delta_rejected, w_chosen, w_rejected): the deltas are s_i on the paired spans, 0 elsewhere.
    """
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    spans = (len(c) - int(eos[0]), len(r) - int(eos[1]))
    n = min(spans)
    s = c[:n] - r[:n]
    out = []
    for side, total, n_spans, has_eos, mu in (
        ("chosen", len(c), spans[0], eos[0], 1.0),
        ("rejected", len(r), spans[1], eos[1], -1.0),
    ):
        w = np.ones(total)
        w[:n] = transform_weights(s, mu, spec, pair_id, side)
        if has_eos and spec.eos_weight is not None:
            w[n_spans] = spec.eos_weight
        d = np.zeros(total)
        d[:n] = s
        out.append((d, w.astype(np.float32)))
    (d_c, w_c), (d_r, w_r) = out
    return d_c, d_r, w_c, w_r
