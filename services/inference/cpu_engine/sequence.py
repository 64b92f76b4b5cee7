"""One request's decoding state: accepted tokens, stop handling, and what may be shown yet.

Text is released to the client only when it cannot change any more: the tail that could still become a
stop string (which is cut from the output) or that is half of a multi-byte character is held back until
the next token settles it. So streamed chunks always concatenate to the final text, and every chunk is
valid UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import KVCache
from .sampling import SamplingParams, TokenOut, utf8_pending
from .tokenizer import ByteTokenizer


@dataclass
class Emission:
    """What one step released for one sequence; ``finish_reason`` set on its last emission."""

    text: str
    tokens: list[TokenOut]
    finish_reason: str | None = None


@dataclass
class Sequence:
    """A request inside the scheduler; only the model thread mutates it (``cancelled`` aside)."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    tokenizer: ByteTokenizer
    forced: list[int] | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    cache: KVCache | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    out: list[TokenOut] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    ends: list[int] = field(default_factory=list)
    pending_utf8: bytes = b""
    released_tokens: int = 0
    released_bytes: int = 0

    def __post_init__(self) -> None:
        # Forced tokens are replayed verbatim: stop strings do not apply to them.
        self.stops = [s.encode("utf-8") for s in self.params.stop if s] if self.forced is None else []

    @property
    def max_new(self) -> int:
        return len(self.forced) if self.forced is not None else self.params.max_tokens

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.out)

    def next_input(self) -> list[int]:
        """Tokens the model has not seen yet: the prompt first, then the last accepted token."""
        return [self.out[-1].id] if self.out else self.prompt

    def forced_token(self) -> int | None:
        return self.forced[len(self.out)] if self.forced is not None else None

    def accept(self, tok: TokenOut) -> Emission | None:
        """Take the next token; return what became visible (and the finish), or None if nothing did."""
        if self.forced is None and tok.id in self.tokenizer.eos_ids:
            return self.finish("stop")
        raw = self.tokenizer.token_bytes(tok.id)
        self.out.append(tok)
        self.text += raw
        self.ends.append(len(self.text))
        self.pending_utf8 = utf8_pending(self.pending_utf8, self.tokenizer.byte_of(tok.id))
        if self.forced is None:
            for stop in self.stops:
                if self.text.endswith(stop):
                    self._drop_tail(len(self.text) - len(stop))
                    return self.finish("stop")
        if self.remaining <= 0:
            return self.finish("stop" if self.forced is not None else "length")
        return self._release(len(self.text) - self._holdback())

    def _holdback(self) -> int:
        hold = len(self.pending_utf8)
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def _drop_tail(self, keep_bytes: int) -> None:
        while self.out and self.ends[-1] > keep_bytes:
            self.out.pop()
            self.ends.pop()
        del self.text[keep_bytes:]

    def finish(self, reason: str) -> Emission:
        """End the sequence: release everything still held back, with ``reason``."""
        self.finish_reason = reason
        emission = self._release(len(self.text))
        emission = emission or Emission("", [])
        emission.finish_reason = reason
        return emission

    def _release(self, boundary: int) -> Emission | None:
        start_tok, start_byte = self.released_tokens, self.released_bytes
        n = start_tok
        while n < len(self.out) and self.ends[n] <= boundary:
            n += 1
        if n == start_tok:
            return None
        end_byte = self.ends[n - 1]
        self.released_tokens, self.released_bytes = n, end_byte
        text = bytes(self.text[start_byte:end_byte]).decode("utf-8", errors="replace")
        return Emission(text, self.out[start_tok:n])
