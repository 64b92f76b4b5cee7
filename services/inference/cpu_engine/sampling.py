"""Choosing the next token, and the logprobs reported for it, exactly as vLLM's V1 sampler does.

A validator compares logprobs, so the distribution the CPU engine reports must be vLLM's, step for step
(``vllm/v1/sample/sampler.py`` and its ops, 0.32): float32 logits; the logits processors that can change
the argmax (min-tokens masks the stop ids, logit bias adds); the repetition (prompt and output tokens),
frequency and presence penalties (output tokens); then either greedy (temperature 0) or the temperature,
min-p, and top-k / top-p masks (vLLM's ascending sort and ``cumsum <= 1 - p`` rule, keeping at least one
token). ``raw_logprobs`` are the log-softmax of the model's logits before any of it, ``processed_logprobs``
the log-softmax of what the sampler draws from (masked tokens ``-inf``).

A forced token (a validator's replay) is chosen *after* the distribution is taken, as the network's
engine does, so forcing picks the token without changing the numbers reported for it. The top
alternatives are ``torch.topk`` of the full float32 distribution (the same op vLLM uses, so ``-inf`` tie
slots are filled with the same ids), the chosen token listed first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from services.inference.validation.request import PROCESSED, RAW

#: vLLM's default ``--max-logprobs``.
MAX_TOP_LOGPROBS = 20
#: vLLM: temperatures below this are greedy; positive ones below ``MIN_TEMPERATURE`` are raised to it.
SAMPLING_EPS = 1e-5
MIN_TEMPERATURE = 1e-2
#: What a logprob is clamped to when reported (a masked token's ``-inf``).
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters, after vLLM's own normalisation (see :meth:`normalised`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: How many alternatives per token (None: no logprobs at all; 0: only the chosen token's).
    logprobs: int | None = None
    logprobs_mode: str = PROCESSED

    def normalised(self) -> SamplingParams:
        """vLLM's ``SamplingParams.__post_init__``: tiny temperatures raised, greedy disables the masks."""
        temperature = self.temperature
        if 0 < temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
        if temperature < SAMPLING_EPS:
            return replace(self, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0)
        return replace(self, temperature=temperature)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(frozen=True)
class TokenOut:
    """One output token with its logprob and the top alternatives (empty unless asked for)."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def top_k_top_p(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """vLLM's ``apply_top_k_top_p_pytorch`` on a ``[1, V]`` row (``k`` 0 and ``p`` 1.0: no mask)."""
    vocab = logits.shape[-1]
    use_k = 0 < k < vocab
    if p >= 1.0:
        if not use_k:
            return logits
        kth = logits.topk(k, dim=1).values[:, k - 1 : k]
        return logits.masked_fill_(logits < kth, float("-inf"))
    ordered, order = logits.sort(dim=-1, descending=False)
    if use_k:
        kth = ordered.gather(1, torch.tensor([[vocab - k]]))
        ordered.masked_fill_(ordered < kth, float("-inf"))
    cumulative = torch.cumsum(ordered.softmax(dim=-1), dim=-1)
    drop = cumulative <= 1 - p
    drop[:, -1] = False
    ordered.masked_fill_(drop, float("-inf"))
    return logits.scatter_(dim=-1, index=order, src=ordered)


@dataclass
class Sampler:
    """One sequence's sampler: its parameters, seeded generator and the token counts penalties need."""

    params: SamplingParams
    vocab_size: int
    prompt: list[int]
    #: Every id that stops the answer (end-of-sequence, stop ids): masked until ``min_tokens`` are out.
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator = field(default_factory=torch.Generator)
    _prompt_mask: torch.Tensor | None = None
    _counts: torch.Tensor | None = None
    produced: int = 0

    def __post_init__(self) -> None:
        if self.params.penalised:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            ids = torch.tensor([t for t in self.prompt if 0 <= t < self.vocab_size], dtype=torch.long)
            mask[ids] = True
            self._prompt_mask = mask
            self._counts = torch.zeros(self.vocab_size, dtype=torch.float32)

    def accepted(self, token: int) -> None:
        """Count ``token`` as output (penalties and min-tokens see it from the next step on)."""
        self.produced += 1
        if self._counts is not None and 0 <= token < self.vocab_size:
            self._counts[token] += 1

    def _processors(self, logits: torch.Tensor) -> torch.Tensor:
        """Min-tokens and logit bias, then the penalties (vLLM's ``apply_logits_processors``)."""
        p = self.params
        if self.produced < p.min_tokens and self.stop_ids:
            logits[0, [t for t in self.stop_ids if 0 <= t < self.vocab_size]] = float("-inf")
        if p.logit_bias:
            for token, bias in p.logit_bias:
                if 0 <= token < self.vocab_size:
                    logits[0, token] += bias
        if self._prompt_mask is not None and self._counts is not None:
            seen = self._prompt_mask | (self._counts > 0)
            penalty = torch.where(seen, torch.tensor(p.repetition_penalty), torch.tensor(1.0))
            logits[0] = torch.where(logits[0] > 0, logits[0] / penalty, logits[0] * penalty)
            logits[0] -= p.frequency_penalty * self._counts
            logits[0] -= p.presence_penalty * (self._counts > 0).float()
        return logits

    def step(self, logits: torch.Tensor, forced: int | None = None) -> TokenOut:
        """The next token for these float32 ``logits`` ``[V]`` (``forced`` overrides the pick)."""
        p = self.params
        row = logits.float().reshape(1, -1)
        raw = row.log_softmax(dim=-1) if p.logprobs is not None and p.logprobs_mode == RAW else None
        work = self._processors(row.clone())
        if p.greedy:
            token = int(work.argmax(dim=-1))
            processed = work.log_softmax(dim=-1, dtype=torch.float32)
        else:
            work.div_(p.temperature)
            if p.min_p > 0:
                probs = work.softmax(dim=-1)
                work.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * p.min_p, float("-inf"))
            work = top_k_top_p(work, p.top_k, p.top_p)
            processed = work.log_softmax(dim=-1, dtype=torch.float32)
            probs = work.softmax(dim=-1, dtype=torch.float32)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            token = int(probs.div_(noise).argmax(dim=-1))
        if forced is not None:
            token = forced
        if p.logprobs is None:
            return TokenOut(token)
        reported = raw if raw is not None else processed
        return TokenOut(token, float(reported[0, token]), _top(reported, p.logprobs))


def _top(logprobs: torch.Tensor, n: int) -> tuple[tuple[int, float], ...]:
    if n <= 0:
        return ()
    values, ids = torch.topk(logprobs, n, dim=-1)
    return tuple(zip(ids[0].tolist(), values[0].tolist(), strict=True))
