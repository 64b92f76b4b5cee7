"""Enforced decoding as a vLLM logits processor, for both of vLLM 0.32's model runners.

For a request that carries ``enforced_tokens`` / ``enforced_str`` (see :mod:`.enforced_args`), every
step masks all logits but the next enforced token, so that token is what any sampler picks; once the
sequence is spent it forces the request's end-of-sequence token, so the answer is exactly the enforced
tokens. The reported ``logprobs`` / ``top_logprobs`` stay the model's own: vLLM computes them from the
logits *before* logits processors run (its default ``logprobs_mode=raw_logprobs``).

vLLM loads it through the ``vllm.logits_processors`` entry point. That one entry point is read by the
V1 model runner (which wants ``vllm.v1.sample.logits_processor.LogitsProcessor``) and by Model Runner V2
(which wants its own interface and is the default where Triton exists), so the class implements both;
``__init__`` and ``apply`` tell them apart by their arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.tokenizers import cached_tokenizer_from_config
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from services.inference.vllm_plugin.enforced_args import parse_enforced

log = logging.getLogger("mlnode.vllm_plugin.enforced")


@dataclass
class _Forced:
    """One request's enforced ids, the end token after them, and (V1) vLLM's live list of its output."""

    tokens: tuple[int, ...]
    end: int
    output: list[int] | None = None

    def target(self, step: int) -> int:
        return self.tokens[step] if 0 <= step < len(self.tokens) else self.end


class EnforcedDecoding(V2LogitsProcessor, V1LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        parse_enforced(sampling_params.extra_args)  # ValueError -> vLLM answers 400

    def __init__(self, vllm_config: Any, *runner_args: Any) -> None:
        # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, req_states).
        self._model_config = vllm_config.model_config
        self._tokenizer: Any = None
        self._prompt_len: Any = runner_args[0].prompt_len if len(runner_args) == 1 else None
        self._rows: dict[int, _Forced] = {}  # V1: batch row; V2: request slot

    # -- per request -------------------------------------------------------------------------------
    def _tokenizer_or_fail(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = cached_tokenizer_from_config(self._model_config)
            if self._tokenizer is None:
                raise ValueError("enforced_str needs the model's tokenizer (skip_tokenizer_init is set)")
        return self._tokenizer

    def _end_token(self, params: Any) -> int:
        if params.eos_token_id is not None:
            return int(params.eos_token_id)
        stops = sorted(params.all_stop_token_ids)
        return int(stops[0]) if stops else int(self._tokenizer_or_fail().eos_token_id)

    def _forced(self, params: Any, output: list[int] | None = None) -> _Forced | None:
        try:
            wanted = parse_enforced(params.extra_args)
            if wanted is None:
                return None
            tokens = wanted.tokens
            if tokens is None:
                tokens = tuple(self._tokenizer_or_fail().encode(wanted.text or "", add_special_tokens=False))
            return _Forced(tokens, self._end_token(params), output)
        except Exception:  # one request's arguments must never stop the engine loop
            log.exception("enforced decoding disabled for a request: its arguments could not be used")
            return None

    # -- V1 model runner ---------------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        return False  # it picks the token, greedy or not

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, lambda p, _prompt, out: self._forced(p, out))

    # -- Model Runner V2 ---------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        forced = self._forced(sampling_params)
        if forced is None:
            self._rows.pop(req_idx, None)
            return False
        self._rows[req_idx] = forced
        return True

    # -- both --------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self._rows:
            return logits
        if ctx is None:  # V1: row i is batch index i; the step is the output length so far
            picks = [(row, f.target(len(f.output or ()))) for row, f in self._rows.items()]
        else:
            if not any(int(slot) in self._rows for slot in ctx.idx_mapping_np):
                return logits
            # V2: rows map to request slots; the sampled token lands at position pos + 1.
            slots = ctx.expanded_idx_mapping.tolist()
            positions = ctx.pos.tolist()
            picks = []
            for row, (slot, pos) in enumerate(zip(slots, positions, strict=True)):
                forced = self._rows.get(slot)
                if forced is not None:
                    picks.append((row, forced.target(pos + 1 - int(self._prompt_len.np[slot]))))
        return _force(logits, picks)


def _force(logits: torch.Tensor, picks: list[tuple[int, int]]) -> torch.Tensor:
    """Leave one finite logit per picked row: its target (out-of-vocabulary targets are logged, skipped)."""
    vocab = logits.shape[-1]
    rows = [r for r, t in picks if t < vocab]
    targets = [t for _r, t in picks if t < vocab]
    for _r, t in picks:
        if t >= vocab:
            log.warning("enforced token %d is outside the vocabulary (%d); row left unforced", t, vocab)
    if rows:
        row_idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        target_idx = torch.tensor(targets, dtype=torch.long, device=logits.device)
        logits[row_idx] = float("-inf")
        logits[row_idx, target_idx] = 0.0
    return logits
