"""The network's per-request fields, read the same way by both engines.

A request may carry, besides the OpenAI fields:

* ``logprobs_mode``: ``raw_logprobs`` or ``processed_logprobs`` (vLLM's meaning of each); absent means the
  engine's default, or -- on a validation request -- the mode guessed from ``top_tokens`` (spec §3.4).
* ``enforced_tokens``: the answer a validator replays. The network sends the object form
  ``{"tokens": [{"token": "<id>", "top_tokens": ["<id>", ...]}, ...]}``; the older list of ids keeps
  working. A token string that is not a number is tokenized and its first id taken, as the network's
  engine does (spec §3.1).
* ``enforced_str``: the answer as text, tokenized by the engine (``enforced_tokens`` wins over it).

Refusing a well-formed validation request would let any answer pass (a 400 counts as "passed"), so only
what can never be served is refused: ids that are negative or outside the vocabulary, entries of the
wrong type, an unknown mode. Each refusal is a :class:`FieldError` naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RAW = "raw_logprobs"
PROCESSED = "processed_logprobs"
MODES = (RAW, PROCESSED)
#: The network's engine reports processed logprobs unless told otherwise.
DEFAULT_MODE = PROCESSED
#: Longer than any answer a request may ask for; a bound keeps a hostile body from pinning memory.
MAX_ENFORCED_TOKENS = 1 << 17
MAX_ENFORCED_CHARS = 1 << 22
MAX_TOP_TOKENS = 1 << 10
#: The mode guess (spec §3.4): among at least this many top ids ...
GUESS_MIN_IDS = 10
#: ... more than this share below :data:`GUESS_LOW_ID` means the answer was processed (masked slots of a
#: processed answer are padded with the lowest ids at -9999).
GUESS_SHARE = 0.10
GUESS_LOW_ID = 4

ENFORCED_TOKENS = "enforced_tokens"
ENFORCED_STR = "enforced_str"
LOGPROBS_MODE = "logprobs_mode"
FIELDS = (ENFORCED_TOKENS, ENFORCED_STR, LOGPROBS_MODE)

_INTEGER = re.compile(r"\s*[+-]?\d+\s*")

Tokenize = Callable[[str], Sequence[int]]


class FieldError(ValueError):
    """A value no engine could serve; ``param`` is the field's path in the body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Resolved:
    """What a request asks of the sampler: the ids to force (None: free decoding) and the mode."""

    forced: tuple[int, ...] | None
    mode: str


def parse_mode(value: Any) -> str | None:
    """``logprobs_mode`` as sent (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in MODES:
        raise FieldError(LOGPROBS_MODE, f"must be one of {', '.join(MODES)}, got {value!r}")
    return value


def guess_mode(top_ids: Sequence[int]) -> str:
    """The network engine's guess when a validation request names no mode (spec §3.4)."""
    low = sum(1 for t in top_ids if t < GUESS_LOW_ID)
    if len(top_ids) >= GUESS_MIN_IDS and low > GUESS_SHARE * len(top_ids):
        return PROCESSED
    return RAW


class _Reader:
    """Token entries to ids: numbers as they are, other strings through the engine's tokenizer."""

    def __init__(self, tokenize: Tokenize, vocab_size: int) -> None:
        self.tokenize = tokenize
        self.vocab_size = vocab_size

    def id_of(self, value: Any, param: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise FieldError(param, f"must be a token id (an integer or its decimal string), got {value!r}")
        if isinstance(value, str):
            if _INTEGER.fullmatch(value):
                value = int(value)
            else:
                ids = list(self.tokenize(value))
                if not ids:
                    raise FieldError(param, f"the text {value!r} tokenizes to no token")
                value = int(ids[0])
        if not 0 <= value < self.vocab_size:
            raise FieldError(param, f"token id {value} is outside the vocabulary [0, {self.vocab_size})")
        return value


def _list(value: Any, param: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise FieldError(param, f"must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise FieldError(param, f"has {len(value)} entries; at most {limit}")
    return value


def parse_enforced_tokens(value: Any, reader: _Reader) -> tuple[tuple[int, ...], list[int]]:
    """The forced ids and every top id the entries list (the latter only feeds the mode guess)."""
    if isinstance(value, dict):
        entries = _list(value.get("tokens"), f"{ENFORCED_TOKENS}.tokens", MAX_ENFORCED_TOKENS)
        forced: list[int] = []
        tops: list[int] = []
        for i, entry in enumerate(entries):
            where = f"{ENFORCED_TOKENS}.tokens[{i}]"
            if not isinstance(entry, dict) or "token" not in entry:
                raise FieldError(where, "must be an object with a 'token'")
            forced.append(reader.id_of(entry["token"], f"{where}.token"))
            listed = entry.get("top_tokens")
            if listed is not None:
                for j, top in enumerate(_list(listed, f"{where}.top_tokens", MAX_TOP_TOKENS)):
                    tops.append(reader.id_of(top, f"{where}.top_tokens[{j}]"))
        return tuple(forced), tops
    entries = _list(value, ENFORCED_TOKENS, MAX_ENFORCED_TOKENS)
    return tuple(reader.id_of(t, f"{ENFORCED_TOKENS}[{i}]") for i, t in enumerate(entries)), []


def resolve(fields: Mapping[str, Any], *, tokenize: Tokenize, vocab_size: int,
            default_mode: str = DEFAULT_MODE) -> Resolved:
    """The forced ids and the logprobs mode a request's network fields ask for."""
    mode = parse_mode(fields.get(LOGPROBS_MODE))
    reader = _Reader(tokenize, vocab_size)
    forced: tuple[int, ...] | None = None
    tokens = fields.get(ENFORCED_TOKENS)
    if tokens is not None:
        forced, tops = parse_enforced_tokens(tokens, reader)
        if mode is None:
            mode = guess_mode(tops)
    else:
        text = fields.get(ENFORCED_STR)
        if text is not None:
            if not isinstance(text, str):
                raise FieldError(ENFORCED_STR, f"must be a string, got {type(text).__name__}")
            if len(text) > MAX_ENFORCED_CHARS:
                raise FieldError(ENFORCED_STR, f"is longer than {MAX_ENFORCED_CHARS} characters")
            forced = tuple(int(t) for t in tokenize(text))
            for t in forced:
                if not 0 <= t < vocab_size:
                    raise FieldError(ENFORCED_STR, f"tokenizes to id {t}, outside [0, {vocab_size})")
    return Resolved(forced, mode or default_mode)
