"""The statistics of `qdiablo compare` against independent computations."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from qdiablo.pipeline.stats import discordant_pairs, mcnemar_exact, mean_interval, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (10, 20), (20, 20), (7, 254), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_textbook_value_and_edges():
    # Textbook: 81 of 263, z = 1.959964 -> (0.2553, 0.3662) (Newcombe 1998, method 3 style).
    z = 1.959963984540054
    p, n = 81 / 263, 263
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(81, 263)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    wide = wilson_interval(5, 20, confidence=0.99)
    narrow = wilson_interval(5, 20, confidence=0.95)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_mean_interval_brackets_the_mean():
    counts = [(3, 20), (0, 20), (10, 20), (5, 20)]
    lo, hi = mean_interval(counts)
    mean = sum(k / n for k, n in counts) / 4
    se = math.sqrt(sum((k / n) * (1 - k / n) / n for k, n in counts)) / 4
    assert (lo, hi) == pytest.approx((mean - 1.959964 * se, mean + 1.959964 * se), abs=1e-6)
    assert mean_interval([(0, 10), (0, 10)]) == (0.0, 0.0)


def test_mcnemar_on_a_hand_counted_example():
    # Ten items; baseline right on 0,1,2,3,7; reference right on 2,3,4,5,6,7,8.
    baseline = {("t", i): i in {0, 1, 2, 3, 7} for i in range(10)}
    reference = {("t", i): i in {2, 3, 4, 5, 6, 7, 8} for i in range(10)}
    reference[("u", 0)] = True  # not scored by the baseline: ignored
    b, c, n = discordant_pairs(baseline, reference)
    assert (b, c, n) == (2, 4, 10)  # b: items 0, 1; c: items 4, 5, 6, 8
    # Exact two-sided: P = 2·P(X ≤ 2), X ~ Bin(6, 1/2) = 2·(1 + 6 + 15)/64 = 0.6875.
    assert mcnemar_exact(b, c) == pytest.approx(0.6875, abs=1e-12)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024, abs=1e-12)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
