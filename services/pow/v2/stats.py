"""The validator's one-sided binomial test (pow-v2.md §6.2), without SciPy.

``P[X >= k]`` for ``X ~ Binomial(n, p)`` is summed term by term in log space: each term comes from
``lgamma`` (no factorial overflow for any n) and the sum is a log-sum-exp, so tiny tails such as
2.5e-13 keep full relative precision and tails near 1 are not swamped by rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _log_term(n: int, i: int, log_p: float, log_q: float) -> float:
    """log C(n, i) + i log p + (n - i) log(1 - p)."""
    return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q


def binom_upper_tail(k: int, n: int, p: float) -> float:
    """``P[X >= k]``; 1.0 when ``k <= 0`` or ``n == 0`` (as SciPy's ``binomtest(..., "greater")``)."""
    if n < 0 or not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0 or n == 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    if k <= n * p:
        # The upper tail holds most of the mass: 1 - lower tail loses nothing that matters here, and
        # the lower tail (i < k) is the shorter sum.
        return max(0.0, min(1.0, 1.0 - _sum_exp(_log_term(n, i, log_p, log_q) for i in range(k))))
    return min(1.0, _sum_exp(_log_term(n, i, log_p, log_q) for i in range(k, n + 1)))


def _sum_exp(logs: Iterable[float]) -> float:
    values = list(logs)
    if not values:
        return 0.0
    top = max(values)
    if top == -math.inf:
        return 0.0
    return math.exp(top) * math.fsum(math.exp(v - top) for v in values)
