"""The per-request arguments of enforced decoding, checked where vLLM validates a request.

The Network Node replays an answer with ``enforced_str`` (its text) or ``enforced_tokens`` (its ids) to
read the model's own logprobs along it. The gateway copies both fields into ``vllm_xargs``, which vLLM
hands to logits processors as ``SamplingParams.extra_args``. Checking them here (in the API server,
before the request reaches the engine) turns a bad value into a 400 instead of a failure inside the
engine loop. As in the built-in CPU engine, ``enforced_tokens`` wins when both are given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ENFORCED_STR = "enforced_str"
ENFORCED_TOKENS = "enforced_tokens"
FIELDS = (ENFORCED_STR, ENFORCED_TOKENS)
#: Longer than any answer a request may ask for; a bound keeps a hostile body from pinning memory.
MAX_ENFORCED_TOKENS = 1 << 17
MAX_ENFORCED_CHARS = 1 << 22


@dataclass(frozen=True)
class Enforced:
    """What to force: exact token ids, or a text the engine tokenizes (exactly one is set)."""

    tokens: tuple[int, ...] | None = None
    text: str | None = None


def parse_enforced(extra_args: Mapping[str, object] | None) -> Enforced | None:
    """The enforced output a request asks for (None: ordinary decoding); ValueError names a bad field."""
    if not extra_args:
        return None
    tokens = extra_args.get(ENFORCED_TOKENS)
    if tokens is not None:
        if not isinstance(tokens, list | tuple):
            raise ValueError(f"{ENFORCED_TOKENS} must be a list of token ids")
        if len(tokens) > MAX_ENFORCED_TOKENS:
            raise ValueError(f"{ENFORCED_TOKENS} has {len(tokens)} ids; at most {MAX_ENFORCED_TOKENS}")
        for tok in tokens:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"{ENFORCED_TOKENS} must hold non-negative integers, got {tok!r}")
        return Enforced(tokens=tuple(tokens))
    text = extra_args.get(ENFORCED_STR)
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{ENFORCED_STR} must be a string")
    if len(text) > MAX_ENFORCED_CHARS:
        raise ValueError(f"{ENFORCED_STR} is longer than {MAX_ENFORCED_CHARS} characters")
    return Enforced(text=text)
