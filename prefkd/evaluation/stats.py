"""Uncertainty of the report's numbers: bootstrap intervals and paired tests on per-item outcomes (pure).

An *outcome* is one held-out item's contribution to a rate: 1 (win / correct), 0 (loss / wrong) or 0.5 (a
tie, which the preference accuracy and the win rate count as one half), so the rate is the mean of the
outcomes and its interval is that of a mean.

* ``bootstrap_ci``: the percentile bootstrap interval of the mean (items resampled with replacement).
* ``paired_bootstrap``: two methods on the same items; the items are resampled jointly, so the interval of
  the difference of the means accounts for the items both methods find easy or hard.  Its two-sided p-value
  compares the bootstrap differences, centred on the observed one (an estimate of the difference's null
  distribution), with the observed difference: ``p = (1 + #{|d* - d| >= |d|}) / (B + 1)``.
* ``sign_test``: the exact two-sided sign test on the per-item differences (items where both methods do
  equally well drop out).  For binary outcomes it is McNemar's exact test.  It needs no resampling, so it
  stays valid at the 60-80 test pairs the report sees, where the bootstrap is somewhat anti-conservative.

Every random draw comes from ``numpy.random.default_rng(seed)``: the same inputs give the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

from prefkd.errors import PrefkdError

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _values(outcomes, what: str = "outcomes") -> np.ndarray:
    x = np.asarray([float(v) for v in outcomes], dtype=np.float64)
    if x.size == 0:
        raise PrefkdError(f"no {what} to compute an interval from; the list is empty.")
    if not np.isfinite(x).all():
        raise PrefkdError(f"the {what} hold a value that is not a finite number.")
    return x


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise PrefkdError(f"the bootstrap needs at least 1 resample, got {resamples}.")
    if not 0 < level < 1:
        raise PrefkdError(f"the interval level must lie strictly between 0 and 1, got {level}.")


def _resampled_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` resamples (with replacement) of the rows of x; x is [n] or [n, k]."""
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    return x[idx].mean(axis=1)


def bootstrap_ci(outcomes, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval ``(lo, hi)`` of the mean of per-item outcomes."""
    _check(resamples, level)
    means = _resampled_means(_values(outcomes), resamples, seed)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_bootstrap(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict:
    """Method a against method b on the same items (same order): the difference of the means ``a - b``,
    its percentile interval ``lo``/``hi`` and the two-sided bootstrap p-value (see the module docstring)."""
    _check(resamples, level)
    x, y = _values(a), _values(b)
    if x.shape != y.shape:
        raise PrefkdError(f"a paired comparison needs outcomes of the same items: {x.size} against {y.size}.")
    d = x - y
    observed = float(d.mean())
    diffs = _resampled_means(d, resamples, seed)
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    extreme = int((np.abs(diffs - observed) >= abs(observed) - 1e-12).sum())
    return {
        "difference": observed,
        "lo": float(lo),
        "hi": float(hi),
        "p_value": (1 + extreme) / (resamples + 1),
        "n": int(d.size),
    }


def sign_test(a, b) -> dict:
    """Exact two-sided sign test of paired outcomes: ``better``/``worse`` count the items where a is above /
    below b; ``p_value = min(1, 2 * P(X <= min(better, worse)))`` with X ~ Binomial(better + worse, 1/2)."""
    x, y = _values(a), _values(b)
    if x.shape != y.shape:
        raise PrefkdError(f"a paired comparison needs outcomes of the same items: {x.size} against {y.size}.")
    better, worse = int((x > y).sum()), int((x < y).sum())
    n = better + worse
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2**n
    return {"better": better, "worse": worse, "p_value": min(1.0, 2 * tail), "n": int(x.size)}


def paired_outcomes(a: dict, b: dict) -> tuple[list, list, list]:
    """(common ids in a's order, a's outcomes, b's outcomes) of two {id: outcome} maps."""
    ids = [k for k in a if k in b]
    return ids, [a[k] for k in ids], [b[k] for k in ids]


def compare(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict:
    """``paired_bootstrap`` of a against b, with the exact sign test's p-value as ``sign_p_value``."""
    out = paired_bootstrap(a, b, resamples, level, seed)
    return {**out, "sign_p_value": sign_test(a, b)["p_value"]}


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of per-seed numbers.

    >>> mean_sd([60.0, 64.0])
    (62.0, 2.8284271247461903)
    """
    x = _values(values, "values")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def seed_mean_outcomes(per_seed: list[dict]) -> dict:
    """{item id: mean outcome over the seeds} on the items every seed has (several seeds of one method, for
    paired tests between methods that average out the seed's noise as well as the items')."""
    if not per_seed:
        return {}
    ids = [k for k in per_seed[0] if all(k in s for s in per_seed[1:])]
    return {k: sum(s[k] for s in per_seed) / len(per_seed) for k in ids}
