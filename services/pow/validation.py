"""Fraud check of a recomputed proof batch (spec section 8), without scipy.

An honest node still reports an invalid nonce now and then (hardware numerics near ``r_target``); the
network tolerates a rate of 5e-4 and calls a batch fraud when the binomial tail of its invalid count is
below ``fraud_threshold``. The tail is summed from exact binomial terms so it matches scipy's
``binomtest(..., alternative="greater")`` to ~1e-13 relative, down to p-values far below 1e-7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from node.errors import InvalidRequest

HONEST_INVALID_RATE = 5e-4
# Reported in place of a NaN/inf recomputed distance: JSON has no NaN, and twice the largest distance
# between unit vectors is invalid under any sensible r_target.
NON_FINITE_DIST = 4.0


def _log_pmf(i: int, n: int, p: float) -> float:
    # math.log of an exact big-int coefficient is correctly rounded; lgamma only for huge n.
    if n <= 20_000:
        log_coef = math.log(math.comb(n, i))
    else:
        log_coef = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
    return log_coef + i * math.log(p) + (n - i) * math.log1p(-p)


def binomtest_greater(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the p-value of scipy's ``binomtest(k, n, p, "greater")``."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k} n={n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k == 0 or p == 1.0:
        return 1.0
    if p == 0.0:
        return 0.0
    # Sum from the term nearest the mode outwards with the ratio recurrence: all terms are positive
    # and shrinking, so nothing cancels and the first (largest) term cannot underflow needlessly.
    odds = p / (1.0 - p)
    if k > n * p:
        term = math.exp(_log_pmf(k, n, p))
        total = term
        for i in range(k, n):
            term *= (n - i) / (i + 1) * odds
            total += term
            if term <= total * 1e-17:
                break
        return min(1.0, total)
    term = math.exp(_log_pmf(k - 1, n, p))
    lower = term
    for i in range(k - 1, 0, -1):
        term *= i / (n - i + 1) / odds
        lower += term
        if term <= lower * 1e-17:
            break
    return max(0.0, 1.0 - lower)


def count_invalid(recomputed: Sequence[float], claimed: Sequence[float], r_target: float) -> int:
    """Nonces whose recomputed distance exceeds ``r_target`` (or is NaN), or whose claim is not valid."""
    invalid = 0
    for mine, theirs in zip(recomputed, claimed, strict=True):
        bad_mine = not mine <= r_target  # NaN compares false: invalid
        bad_claim = not theirs < r_target
        invalid += bad_mine or bad_claim
    return invalid


def validated_batch(*, public_key: str, block_hash: str, block_height: int, nonces: Sequence[int],
                    received_dist: Sequence[float], recomputed_dist: Sequence[float], node_id: int,
                    r_target: float, fraud_threshold: float,
                    honest_invalid_rate: float = HONEST_INVALID_RATE) -> dict[str, Any]:
    """The ValidatedBatch POSTed to ``{url}/validated``, field names and order as in spec section 8."""
    if len(received_dist) != len(nonces):
        raise InvalidRequest(f"dist has {len(received_dist)} values but nonces has {len(nonces)}")
    if len(recomputed_dist) != len(nonces):
        raise ValueError(f"{len(recomputed_dist)} recomputed distances for {len(nonces)} nonces")
    n_invalid = count_invalid(recomputed_dist, received_dist, r_target)
    p_value = binomtest_greater(n_invalid, len(nonces), honest_invalid_rate) if nonces else 1.0
    return {
        "public_key": public_key,
        "block_hash": block_hash,
        "block_height": block_height,
        "nonces": [int(n) for n in nonces],
        "dist": [float(d) if math.isfinite(d) else NON_FINITE_DIST for d in recomputed_dist],
        "node_id": node_id,
        "received_dist": [float(d) for d in received_dist],
        "r_target": r_target,
        "fraud_threshold": fraud_threshold,
        "n_invalid": n_invalid,
        "probability_honest": p_value,
        "fraud_detected": p_value < fraud_threshold,
    }
