"""The statistics `qdiablo compare` reports, so a reader can tell a real gap from noise.

- Wilson score interval for one accuracy (k correct of n): unlike the normal approximation it
  stays inside [0, 1] and is sensible at 0/n, which is where small models sit.
- Exact McNemar test for two methods scored on the same items: only the discordant pairs carry
  information (b: the baseline right and the reference wrong; c: the reverse), and under the null
  b ~ Binomial(b + c, 1/2); the two-sided p-value comes from `scipy.stats.binomtest`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from scipy.stats import binomtest, norm


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion k/n (scipy's); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mean_interval(
    counts: Sequence[tuple[int, int]], confidence: float = 0.95
) -> tuple[float, float]:
    """An interval for the unweighted mean of several accuracies (the 4-task score), from each
    task's (k, n): the raw mean ± z·SE, with each task's variance taken at the Agresti–Coull
    adjusted p̃ = (k + z²/2)/(n + z²), so that 0/n tasks do not collapse it to a point; clipped
    to [0, 1]."""
    counts = [(k, n) for k, n in counts if n > 0]
    if not counts:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    m = len(counts)
    mean = sum(k / n for k, n in counts) / m
    var = 0.0
    for k, n in counts:
        p = (k + z * z / 2) / (n + z * z)
        var += p * (1 - p) / (n + z * z)
    half = z * math.sqrt(var) / m
    return max(0.0, mean - half), min(1.0, mean + half)


def discordant_pairs(
    baseline: Mapping[Any, bool], reference: Mapping[Any, bool]
) -> tuple[int, int, int]:
    """(b, c, n) over the items both were scored on: b = baseline right and reference wrong,
    c = baseline wrong and reference right, n = items in common."""
    common = baseline.keys() & reference.keys()
    b = sum(1 for i in common if baseline[i] and not reference[i])
    c = sum(1 for i in common if reference[i] and not baseline[i])
    return b, c, len(common)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 with none)."""
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
