"""prefkd.evaluation.stats: bootstrap intervals and paired tests, checked on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefkd.errors import PrefkdError
from prefkd.evaluation.stats import bootstrap_ci, compare, paired_bootstrap, paired_outcomes, sign_test


def test_bootstrap_ci_of_a_constant_is_the_constant():
    assert bootstrap_ci([0.5] * 16) == (0.5, 0.5)  # the reference model: every pair a tie
    assert bootstrap_ci([1.0]) == (1.0, 1.0)


def test_bootstrap_ci_matches_the_binomial_standard_error_and_is_seeded():
    # 44 of 80 pairs right (55%): one standard error is sqrt(.55 * .45 / 80) = 5.56 points, the "about 5.6"
    outcomes = [1.0] * 44 + [0.0] * 36
    lo, hi = bootstrap_ci(outcomes, resamples=4000)
    se = math.sqrt(0.55 * 0.45 / 80)
    assert lo < 0.55 < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert bootstrap_ci(outcomes) == bootstrap_ci(outcomes)  # same seed, same numbers
    assert bootstrap_ci(outcomes, seed=1) != bootstrap_ci(outcomes, seed=2)
    lo99, hi99 = bootstrap_ci(outcomes, resamples=4000, level=0.99)  # a higher level, a wider interval
    assert lo99 < lo and hi99 > hi


def test_sign_test_hand_computed():
    # 3 better, 0 worse: p = 2 * (1/2)^3
    assert sign_test([1, 1, 1, 0], [0, 0, 0, 0])["p_value"] == 0.25
    # 8 better, 2 worse, 5 equal: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024
    a = [1] * 8 + [0] * 2 + [1] * 3 + [0] * 2
    b = [0] * 8 + [1] * 2 + [1] * 3 + [0] * 2
    out = sign_test(a, b)
    assert (out["better"], out["worse"], out["n"]) == (8, 2, 15)
    assert out["p_value"] == pytest.approx(112 / 1024)
    assert sign_test([1, 0], [1, 0])["p_value"] == 1.0  # nothing differs
    # a half (tie) against a loss is a difference in a's favour
    assert sign_test([0.5], [0.0])["better"] == 1


def test_sign_test_is_mcnemars_exact_test_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for n in (10, 33, 80):
        a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
        better, worse = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        expected = scipy_stats.binomtest(better, better + worse, 0.5).pvalue if better + worse else 1.0
        assert sign_test(a, b)["p_value"] == pytest.approx(expected, rel=1e-12)


def test_the_hh_gap_of_dpo_over_ctpd_is_not_significant():
    """DPO 63.75 vs CTPD 52.5 on 80 pairs (issue 12): 30 both right, 21 only DPO, 12 only CTPD."""
    dpo = [1.0] * 30 + [1.0] * 21 + [0.0] * 12 + [0.0] * 17
    ctpd = [1.0] * 30 + [0.0] * 21 + [1.0] * 12 + [0.0] * 17
    assert (sum(dpo) / 80, sum(ctpd) / 80) == (0.6375, 0.525)
    out = compare(ctpd, dpo)
    assert out["difference"] == pytest.approx(-0.1125) and out["n"] == 80
    assert out["lo"] < 0 < out["hi"]  # the interval holds 0
    assert out["p_value"] > 0.05 and out["sign_p_value"] > 0.05
    # exact: 2 * P(X <= 12), X ~ Bin(33, 1/2)
    assert out["sign_p_value"] == pytest.approx(2 * sum(math.comb(33, k) for k in range(13)) / 2**33)


def test_paired_bootstrap_extremes():
    same = paired_bootstrap([1, 0, 0.5, 1], [1, 0, 0.5, 1])
    assert (same["difference"], same["lo"], same["hi"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    # a always right, b always wrong: every resample differs by 1, so p is the smallest it can be
    far = paired_bootstrap([1] * 20, [0] * 20, resamples=999)
    assert (far["difference"], far["lo"], far["hi"]) == (1.0, 1.0, 1.0)
    assert far["p_value"] == 1 / 1000
    # pairing matters: the same two marginal rates, one paired so that the difference is constant
    a, b = [1, 1, 1, 0, 0, 0] * 10, [1, 1, 0, 0, 0, 0] * 10
    assert paired_bootstrap(a, b)["p_value"] < 0.01
    assert paired_bootstrap(a, b[::-1])["p_value"] > paired_bootstrap(a, b)["p_value"]


def test_paired_outcomes_match_ids():
    ids, xs, ys = paired_outcomes({3: 1.0, 1: 0.0, 7: 0.5}, {1: 1.0, 3: 1.0})
    assert (ids, xs, ys) == ([3, 1], [1.0, 0.0], [1.0, 1.0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bootstrap_ci([]), "empty"),
        (lambda: bootstrap_ci([1.0, float("nan")]), "finite"),
        (lambda: bootstrap_ci([1.0], level=1.0), "strictly between"),
        (lambda: bootstrap_ci([1.0], resamples=0), "at least 1"),
        (lambda: paired_bootstrap([1, 0], [1]), "same items"),
        (lambda: sign_test([1, 0], [1]), "same items"),
    ],
)
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(PrefkdError, match=message):
        call()
