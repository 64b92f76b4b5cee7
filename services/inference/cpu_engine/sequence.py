"""One request's decoding state: accepted tokens, when the answer ends, and the text shown so far.

The rules are vLLM's (``v1/core/sched/utils.py::check_stop`` and ``v1/engine/detokenizer.py``), so both
engines end the same answer at the same token and say why:

* the end-of-sequence token (unless ``ignore_eos``) or a stop id ends it with ``stop``; that token is in
  the answer's ids and logprobs but not in its text (unless ``include_stop_str_in_output``);
* ``max_tokens`` or the context length ends it with ``length``;
* a stop string (checked once more than ``min_tokens`` tokens are out) ends it with ``stop`` and cuts the
  text there; the tokens stay.

Every accepted token is released at once with its logprobs; its text may lag behind: the tail that could
still become a stop string is held back until the next token settles it, and a token that ends inside a
multi-byte character shows its text once the character is complete. Streamed chunks therefore always
concatenate to the final text.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .model import KVCache
from .sampling import Sampler, SamplingParams, TokenOut
from .tokenizer import TextStream, Tokenizer


@dataclass
class Emission:
    """What one step released for one sequence; ``finish_reason`` set on its last emission."""

    text: str
    tokens: list[TokenOut]
    finish_reason: str | None = None
    #: vLLM's ``stop_reason``: the stop id or stop string that ended the answer (None otherwise).
    stop_reason: int | str | None = None


def find_stop(text: str, new_chars: int, stops: tuple[str, ...], keep: bool) -> tuple[str, int] | None:
    """The stop string completed earliest within the last ``new_chars`` characters, and the length the
    text is cut to (vLLM's ``check_stop_strings``)."""
    best: tuple[str, int, int] | None = None
    for stop in stops:
        index = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if index == -1:
            continue
        end = index + len(stop)
        if best is None or end < best[2]:
            best = (stop, index, end)
    if best is None:
        return None
    stop, index, end = best
    return stop, (end if keep else index)


@dataclass
class Sequence:
    """A request inside the scheduler; only the model thread mutates it (``cancelled`` aside)."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    sampler: Sampler
    max_model_len: int = sys.maxsize
    forced: tuple[int, ...] | None = None
    cache: KVCache | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    out: list[TokenOut] = field(default_factory=list)
    text: str = ""
    released_chars: int = 0
    _stream: TextStream | None = None

    def __post_init__(self) -> None:
        self._stream = self.tokenizer.stream(self.prompt, skip_special_tokens=self.params.skip_special_tokens)
        p = self.params
        stops = () if p.ignore_eos else self.tokenizer.extra_stop_ids
        self._stop_ids = frozenset((*p.stop_token_ids, *stops))
        self._eos = None if p.ignore_eos else self.tokenizer.eos_token_id
        held = p.stop and not p.include_stop_str_in_output
        self._holdback = max(len(s) for s in p.stop) - 1 if held else 0

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.out)

    def next_input(self) -> list[int]:
        """Tokens the model has not seen yet: the prompt first, then the last accepted token."""
        return [self.out[-1].id] if self.out else self.prompt

    def forced_token(self) -> int | None:
        """The id a validator's replay forces next: its ids in order, then the end-of-sequence token."""
        if self.forced is None:
            return None
        step = len(self.out)
        return self.forced[step] if step < len(self.forced) else self.tokenizer.end_id

    def accept(self, tok: TokenOut) -> Emission:
        """Take the next token; return what it releases (with the finish, if it ended the answer)."""
        self.out.append(tok)
        self.sampler.accepted(tok.id)
        finish: str | None = None
        if tok.id == self._eos:
            finish = "stop"
        elif tok.id in self._stop_ids:
            finish, self.stop_reason = "stop", tok.id
        elif self.remaining <= 0 or len(self.prompt) + len(self.out) >= self.max_model_len:
            finish = "length"
        assert self._stream is not None
        if finish == "stop" and not self.params.include_stop_str_in_output:
            new = ""  # the stop token itself shows no text
        else:
            new = self._stream.step(tok.id)
            self.text += new
        if new and len(self.out) > self.params.min_tokens and self.params.stop:
            found = find_stop(self.text, len(new), self.params.stop, self.params.include_stop_str_in_output)
            if found is not None:
                finish, self.stop_reason = "stop", found[0]
                self.text = self.text[: found[1]]
        if finish is not None:
            return self.finish(finish, [tok])
        return self._release(len(self.text) - self._holdback, [tok])

    def finish(self, reason: str, tokens: list[TokenOut] | None = None) -> Emission:
        """End the sequence: release everything still held back, with ``reason``."""
        self.finish_reason = reason
        emission = self._release(len(self.text), tokens or [])
        emission.finish_reason = reason
        emission.stop_reason = self.stop_reason
        return emission

    def _release(self, boundary: int, tokens: list[TokenOut]) -> Emission:
        start = self.released_chars
        end = max(start, boundary)
        self.released_chars = end
        return Emission(self.text[start:end], tokens)
