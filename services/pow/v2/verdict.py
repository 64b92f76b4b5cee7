"""Validation of a prover's artifacts against our own (pow-v2.md §6): distances, test, fraud decision.

Pure functions over base64 strings, so the decision can be checked against the golden vectors without
an engine. Malformed or non-finite received vectors count as mismatches; a received vector that is
empty, or a nonce we could not compute ourselves, is skipped but still counts in ``n_total`` (§6.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from msgspec import UNSET, UnsetType

from contracts.pow_v2 import (
    DEFAULT_DIST_THRESHOLD,
    DEFAULT_FRAUD_THRESHOLD,
    DEFAULT_P_MISMATCH,
    StatTest,
)
from services.inference.poc.codec import F32, decode_f16, l2
from services.pow.v2.stats import binom_upper_tail


@dataclass(frozen=True)
class StatParams:
    """The effective test parameters: what was sent, else the §6.4 engine defaults."""

    dist_threshold: float = DEFAULT_DIST_THRESHOLD
    p_mismatch: float = DEFAULT_P_MISMATCH
    fraud_threshold: float = DEFAULT_FRAUD_THRESHOLD

    @classmethod
    def of(cls, sent: StatTest | UnsetType) -> StatParams:
        if isinstance(sent, UnsetType):
            return cls()
        return cls(
            DEFAULT_DIST_THRESHOLD if sent.dist_threshold is UNSET else float(sent.dist_threshold),
            DEFAULT_P_MISMATCH if sent.p_mismatch is UNSET else float(sent.p_mismatch),
            DEFAULT_FRAUD_THRESHOLD if sent.fraud_threshold is UNSET else float(sent.fraud_threshold),
        )


@dataclass(frozen=True)
class Verdict:
    n_total: int
    n_mismatch: int
    mismatch_nonces: list[int]
    p_value: float
    fraud_detected: bool

    def to_wire(self) -> dict[str, Any]:
        return {"n_total": self.n_total, "n_mismatch": self.n_mismatch,
                "mismatch_nonces": list(self.mismatch_nonces), "p_value": self.p_value,
                "fraud_detected": self.fraud_detected}


def decode(vector_b64: str, k_dim: int) -> F32 | None:
    """The fingerprint as float32, or None when it is not exactly ``k_dim`` finite halves."""
    try:
        values = decode_f16(vector_b64)
    except ValueError:
        return None
    return values if len(values) == k_dim and bool(np.isfinite(values).all()) else None


def mismatches(nonces: list[int], received: Mapping[int, str], own: Mapping[int, str], k_dim: int,
               dist_threshold: float) -> list[int]:
    """The mismatching nonces, in request order (a nonce listed twice is judged twice)."""
    found = []
    for nonce in nonces:
        theirs = received.get(nonce, "")
        mine = own.get(nonce)
        if not theirs or mine is None:
            continue  # skipped: nothing claimed, or nothing of ours to compare with
        ours = decode(mine, k_dim)
        if ours is None:
            continue  # our engine's answer is unusable: never blame the prover for it
        claimed = decode(theirs, k_dim)
        if claimed is None or l2(ours, claimed) > dist_threshold:
            found.append(nonce)
    return found


def judge(nonces: list[int], received: Mapping[int, str], own: Mapping[int, str], k_dim: int,
          params: StatParams) -> Verdict:
    bad = mismatches(nonces, received, own, k_dim, params.dist_threshold)
    n_total = len(nonces)
    p_value = binom_upper_tail(len(bad), n_total, params.p_mismatch)
    return Verdict(n_total, len(bad), bad, p_value, p_value < params.fraud_threshold)
