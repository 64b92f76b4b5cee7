"""Each batch row's validation wishes, kept where vLLM's V1 model runner keeps per-request state.

vLLM loads this class through the ``vllm.logits_processors`` entry point and tells it, step by step, which
request sits in which batch row (``update_state``). It never changes a logit (``apply`` returns them as
they are): a logits processor that masked all but the forced token would also change the distribution
the request's ``processed_logprobs`` report. Instead the plugin's sampler (:mod:`.sampler`) asks it which
rows force which token and which want raw logprobs, and chooses the forced token *after* the
distribution is taken, as the network's engine does.

A row's next forced token is its forced ids in order, then the request's end-of-sequence token; the step
is the length of vLLM's live output list (placeholders of in-flight tokens included, so asynchronous
scheduling counts the same). Only the V1 model runner without speculative decoding is supported: the
plugin refuses to start under Model Runner V2, with a speculative config (drafted tokens are accepted by
vLLM's rejection sampler, which never sees a forced id) or with an engine-wide logprobs mode other than
``processed_logprobs`` (the launcher sets it), rather than serve other numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from services.inference.validation.request import PROCESSED, RAW
from services.inference.vllm_plugin.request_state import RowRequest, default_mode, row_request

log = logging.getLogger("vllm.mlnode_plugin.enforced")

ENGINE_LOGPROBS_MODE = PROCESSED


@dataclass
class _Row:
    request: RowRequest
    end: int | None
    output: list[int]

    def target(self) -> int | None:
        forced = self.request.forced
        if forced is None:
            return None
        step = len(self.output)
        return forced[step] if step < len(forced) else self.end


def _end_token(params: Any) -> int | None:
    if params.eos_token_id is not None:
        return int(params.eos_token_id)
    stops = sorted(params.all_stop_token_ids)
    return int(stops[0]) if stops else None


class EnforcedDecoding(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        row_request(sampling_params.extra_args, PROCESSED)  # ValueError -> vLLM answers 400

    def __init__(self, vllm_config: Any, *_runner_args: Any) -> None:
        if getattr(vllm_config, "use_v2_model_runner", False):
            raise RuntimeError("the MLNode vLLM plugin supports the V1 model runner only: start the engine "
                               "with VLLM_USE_V2_MODEL_RUNNER=0 (the node's launcher does)")
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise RuntimeError("the MLNode vLLM plugin cannot force a validator's tokens under speculative "
                               "decoding (vLLM's rejection sampler accepts drafted tokens); start the engine "
                               "without --speculative-config")
        mode = vllm_config.model_config.logprobs_mode
        if mode != ENGINE_LOGPROBS_MODE:
            raise RuntimeError(f"the MLNode vLLM plugin needs --logprobs-mode {ENGINE_LOGPROBS_MODE} "
                               f"(got {mode}); requests choose their mode with logprobs_mode")
        self.default_mode = default_mode()
        self.rows: dict[int, _Row] = {}

    def _row(self, params: Any, _prompt: Any, output: list[int]) -> _Row | None:
        try:
            request = row_request(params.extra_args, self.default_mode)
        except ValueError:  # one request's arguments must never stop the engine loop
            log.exception("a request's validation arguments could not be used; it decodes freely")
            return None
        return None if request.ordinary else _Row(request, _end_token(params), output)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def forced_targets(self, vocab: int) -> dict[int, int]:
        """Batch row -> the token that row must produce this step."""
        targets: dict[int, int] = {}
        for row, state in self.rows.items():
            token = state.target()
            if token is None:
                continue
            if not 0 <= token < vocab:
                log.warning("forced token %d is outside the vocabulary (%d); row %d decodes freely",
                            token, vocab, row)
                continue
            targets[row] = token
        return targets

    def raw_rows(self) -> list[int]:
        return sorted(row for row, state in self.rows.items() if state.request.mode == RAW)
