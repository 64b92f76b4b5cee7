"""vLLM's V1 ``Sampler.forward`` with the two things the network needs, composed from vLLM's own steps.

The network's engine (``gonka-ai/vllm``) samples as usual, then overwrites the sampled ids of forced rows,
*then* gathers the logprobs, so a validator's forced token is reported under the request's own
distribution (spec §3.3); and it reports raw or processed logprobs per request. Stock vLLM has neither,
so this replacement runs vLLM's own pieces -- ``compute_logprobs``, ``apply_logits_processors``,
``sample``, ``gather_logprobs`` -- in vLLM 0.32's order, and adds between them:

* raw logprobs for the rows that ask for ``raw_logprobs`` (the engine itself runs ``processed_logprobs``),
  taken from the logits before any processing, as vLLM does in that mode;
* the forced ids, written over the sampled ones before the logprobs are gathered.

A batch with neither (and speculative decoding's bonus-token calls) goes to vLLM's original method
unchanged. The row state comes from :class:`~.enforced.EnforcedDecoding`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm.v1.outputs import LogprobsTensors, SamplerOutput

from services.inference.vllm_plugin.enforced import EnforcedDecoding

Forward = Callable[..., SamplerOutput]


def _rows(sampling_metadata: Any) -> EnforcedDecoding | None:
    for processor in sampling_metadata.logitsprocs.non_argmax_invariant:
        if isinstance(processor, EnforcedDecoding):
            return processor
    return None


def network_forward(original: Forward) -> Forward:
    """The replacement for ``Sampler.forward`` (``original`` serves every batch it has nothing to add to)."""

    def forward(self: Any, logits: torch.Tensor, sampling_metadata: Any, predict_bonus_token: bool = False,
                logprobs_mode_override: Any = None) -> SamplerOutput:
        state = _rows(sampling_metadata)
        if state is None or not state.rows or predict_bonus_token or logprobs_mode_override is not None:
            return original(self, logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
        forced = state.forced_targets(logits.shape[-1])
        raw_rows = state.raw_rows()
        num_logprobs = sampling_metadata.max_num_logprobs
        token_ids = sampling_metadata.logprob_token_ids
        wants_logprobs = num_logprobs is not None or bool(token_ids)
        raw = self.compute_logprobs(logits) if wants_logprobs and raw_rows else None
        logits = self.apply_logits_processors(logits.to(torch.float32), sampling_metadata,
                                              predict_bonus_token)
        sampled, processed = self.sample(logits, sampling_metadata)
        sampled = sampled.long().clone()
        if forced:
            rows = torch.tensor(list(forced), dtype=torch.long, device=sampled.device)
            sampled[rows] = torch.tensor(list(forced.values()), dtype=torch.long, device=sampled.device)
        reported = processed
        if raw is not None:
            reported = raw if reported is None else reported
            rows = torch.tensor(raw_rows, dtype=torch.long, device=reported.device)
            reported[rows] = raw[rows]
        logprobs: LogprobsTensors | None = None
        if token_ids:
            assert reported is not None
            logprobs = self.gather_specific_token_logprobs(reported, token_ids, sampled)
        elif num_logprobs == -1:
            logprobs = LogprobsTensors(torch.empty(0), reported, torch.empty(0))
        elif num_logprobs is not None:
            assert reported is not None
            logprobs = self.gather_logprobs(reported, num_logprobs, token_ids=sampled)
        return SamplerOutput(sampled_token_ids=sampled.to(torch.int32).unsqueeze(-1),
                             logprobs_tensors=logprobs)

    forward.__doc__ = __doc__
    forward.__wrapped__ = original  # type: ignore[attr-defined]
    return forward
