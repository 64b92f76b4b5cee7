"""The artifact wire format (§5.5 step 5) and the distance validators use (§6.1); numpy only."""

from __future__ import annotations

import base64
import binascii

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


def encode_f16(vector: npt.ArrayLike) -> str:
    """IEEE binary16 (round to nearest even), little-endian, standard base64 with padding."""
    return base64.b64encode(np.asarray(vector, dtype=np.float32).astype("<f2").tobytes()).decode("ascii")


def decode_f16(vector_b64: str) -> F32:
    """The float32 values of a ``vector_b64``; ValueError when it is not base64 of whole halves."""
    try:
        raw = base64.b64decode(vector_b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"vector_b64 is not valid base64: {exc}") from exc
    if len(raw) % 2:
        raise ValueError(f"vector_b64 holds {len(raw)} bytes, not a whole number of halves")
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)


def l2(a: F32, b: F32) -> float:
    """Euclidean distance computed in float32, as the reference validator does."""
    diff = np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)
    return float(np.sqrt(np.sum(diff * diff, dtype=np.float32), dtype=np.float32))
