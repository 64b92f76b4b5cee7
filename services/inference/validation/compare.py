"""The validator's comparison of two answers, exactly as the Network Node computes it (spec §4).

``original`` is the executor's ``choices[0].logprobs.content`` (a streamed answer: every chunk's content
concatenated), ``validation`` the validator's, position by position. An answer whose tokens are not
decimal ids is refused before any comparison, as the validator does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: An answer passes when its similarity is above this.
PASS_THRESHOLD = 0.99
#: The distance is averaged over at least this many positions, so short answers weigh less.
MIN_POSITIONS = 100

DECODED_TEXT = "Logprobs contain decoded text instead of numeric token IDs"
DIFFERENT_LENGTH = "different length"
DIFFERENT_TOKENS = "different tokens"

Content = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Comparison:
    similarity: float
    #: Why the similarity is 0 without a distance (None when it was computed).
    reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.similarity > PASS_THRESHOLD


def _numeric(token: Any) -> bool:
    return isinstance(token, str) and token.isascii() and token.isdigit()


def numeric_tokens(content: Content) -> bool:
    """Whether every token and top token of an answer is a decimal token id."""
    return all(
        _numeric(entry.get("token"))
        and all(_numeric(top.get("token")) for top in entry.get("top_logprobs") or ())
        for entry in content
    )


def _position_terms(original: Mapping[str, Any], validation: Mapping[str, Any]) -> Iterable[float]:
    known = {str(top["token"]): float(top["logprob"]) for top in original.get("top_logprobs") or ()}
    values = sorted(known.values())
    if values:
        m1 = values[0]
        m2 = values[1] if len(values) > 1 else m1 - 100.0
        absent = m1 - (m2 - m1)
    else:
        absent = math.nan
    for top in validation.get("top_logprobs") or ():
        v = float(top["logprob"])
        o = known.get(str(top["token"]), absent)
        yield abs(v - o) / (1e-6 + abs(v) + abs(o)) / 2


def compare(original: Content, validation: Content) -> Comparison:
    """The similarity of ``validation`` to ``original`` (1.0 identical, 0.0 refused)."""
    if not numeric_tokens(original):
        return Comparison(0.0, DECODED_TEXT)
    if len(validation) < len(original):
        return Comparison(0.0, DIFFERENT_LENGTH)
    if any(o.get("token") != v.get("token") for o, v in zip(original, validation, strict=False)):
        return Comparison(0.0, DIFFERENT_TOKENS)
    if not original:
        return Comparison(1.0)
    n_top = len(original[0].get("top_logprobs") or ())
    total = 0.0
    for o, v in zip(original, validation, strict=False):
        for term in _position_terms(o, v):
            if not math.isnan(term):
                total += term
    denominator = max(MIN_POSITIONS, len(original)) * n_top
    distance = total / denominator if denominator else math.nan
    if not math.isfinite(distance):
        return Comparison(0.0, "distance is not finite")
    return Comparison(max(0.0, 1.0 - distance))


def answer_content(answer: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content`` of a chat answer, or of every chunk of a streamed one, joined."""
    chunks = [answer] if isinstance(answer, Mapping) else list(answer)
    content: list[dict[str, Any]] = []
    for chunk in chunks:
        choices = chunk.get("choices") or []
        if not choices:
            continue
        logprobs = choices[0].get("logprobs") or {}
        content.extend(logprobs.get("content") or [])
    return content
