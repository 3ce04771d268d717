"""Uncertainty for benchmark cells: Wilson intervals for accuracies, paired sign tests between methods.

A cell's accuracy is the mean of per-sample scores in [0, 1] (RULER's string_match_all: a share of the answers
found, 0 or 1 for single-answer tasks). Its 95% interval is Wilson's score interval with n samples and the mean
as the proportion, which stays inside [0, 1] and is sensible at 0 and 1 where the normal approximation is not;
for multi-answer tasks, whose scores are fractions, it treats the mean as a proportion (an approximation).

Two methods run on the same samples are compared pairwise: the two-sided exact sign test counts the samples one
scored higher than the other (ties dropped). For 0/1 scores this is McNemar's exact test. A difference with
p >= 0.05 is reported as inside the noise of the sample size.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054
NOISE_P = 0.05


def wilson(mean: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The score interval for a proportion ``mean`` observed over ``n`` samples (``(0, 1)`` when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of a mean (for perplexities): mean ± z·s/√n."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean - z * spread, mean + z * spread


def sign_test(a: list[float], b: list[float]) -> float:
    """Two-sided exact sign test p-value that paired scores ``a`` and ``b`` come from the same distribution."""
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    trials = wins + losses
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(min(wins, losses) + 1)) / 2**trials
    return min(1.0, 2 * tail)
