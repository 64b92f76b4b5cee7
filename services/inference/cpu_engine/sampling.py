"""Choosing the next token, and the logprobs reported for it.

Two rules make replays exact:

* Reported logprobs are the *raw* model distribution (log-softmax of the logits, before temperature,
  top-p or masks), so a forced replay of the same tokens reports the same numbers however the original
  was sampled.
* Sampling only ever produces text that is valid UTF-8 and ends on a character boundary: bytes that
  would break a character (or start one the remaining budget cannot finish) are masked out, and special
  tokens other than end-of-sequence are never sampled. So the response text re-encodes to exactly the
  generated tokens, which is what a validator's ``enforced_str`` replay relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizer import ByteTokenizer

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenOut:
    """One output token with its raw logprob and the top alternatives (empty unless asked for)."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def utf8_length(lead: int) -> int:
    """Bytes in the character that ``lead`` starts; 0 for bytes that cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def utf8_pending(pending: bytes, byte: int | None) -> bytes:
    """The unfinished character after appending ``byte`` (None: a special token, changes nothing)."""
    if byte is None:
        return pending
    if not pending or byte & 0xC0 != 0x80:
        return bytes([byte]) if utf8_length(byte) > 1 else b""
    pending += bytes([byte])
    return b"" if len(pending) >= utf8_length(pending[0]) else pending


def _continuation_range(pending: bytes) -> tuple[int, int]:
    if len(pending) == 1:
        first = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
        return first.get(pending[0], (0x80, 0xBF))
    return (0x80, 0xBF)


class TokenMasks:
    """Additive logit masks (0 allowed, -inf banned) for each UTF-8 state, built once per tokenizer."""

    def __init__(self, tokenizer: ByteTokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_ids = sorted(tokenizer.eos_ids)
        self._byte_ids = tokenizer.byte_ids
        self._cache: dict[tuple[str, int, int], torch.Tensor] = {}

    def _build(self, byte_ranges: list[tuple[int, int]], allow_eos: bool) -> torch.Tensor:
        mask = torch.full((self.vocab_size,), float("-inf"))
        for lo, hi in byte_ranges:
            for b in range(lo, hi + 1):
                mask[self._byte_ids[b]] = 0.0
        if allow_eos:
            for tid in self.eos_ids:
                mask[tid] = 0.0
        return mask

    def for_state(self, pending: bytes, remaining: int) -> torch.Tensor:
        """The mask for the next token, given the unfinished character and the tokens left."""
        if pending:
            lo, hi = _continuation_range(pending)
            key = ("cont", lo, hi)
            if key not in self._cache:
                self._cache[key] = self._build([(lo, hi)], allow_eos=False)
            return self._cache[key]
        fit = max(1, min(remaining, 4))
        key = ("start", fit, 0)
        if key not in self._cache:
            ranges = [(0x00, 0x7F)]
            if fit >= 2:
                ranges.append((0xC2, 0xDF))
            if fit >= 3:
                ranges.append((0xE0, 0xEF))
            if fit >= 4:
                ranges.append((0xF0, 0xF4))
            self._cache[key] = self._build(ranges, allow_eos=True)
        return self._cache[key]


def describe(logits: torch.Tensor, token: int, params: SamplingParams) -> TokenOut:
    """The raw logprob of ``token`` and the top alternatives, if the request asked for logprobs."""
    if not params.logprobs:
        return TokenOut(token)
    logprobs = torch.log_softmax(logits, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs:
        values, ids = torch.topk(logprobs, params.top_logprobs)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenOut(token, float(logprobs[token]), top)


def choose(logits: torch.Tensor, mask: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Greedy when temperature is 0, else top-p sampling from the seeded per-request generator."""
    masked = logits + mask
    if params.temperature <= 1e-5:
        return int(torch.argmax(masked))
    probs = torch.softmax(masked / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        pick = int(torch.multinomial(sorted_probs, 1, generator=gen))
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=gen))
