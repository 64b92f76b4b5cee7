"""Capped exponential back-off: one formula for every retry loop of the node."""

from __future__ import annotations

import random


def backoff_delay(failures: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``failures`` (1-based): ``base_s * 2**(failures-1)``, at most ``cap_s``.

    With ``rng`` the delay is jittered into [d/2, d]: the lower half stays so a recovering receiver is
    not hammered, the jitter spreads the nodes of a network that all lost the same peer at once. The
    exponent is bounded, so a long outage never overflows the float.
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(max(failures - 1, 0), 62))
    return ceiling if rng is None else rng.uniform(ceiling / 2.0, ceiling)
