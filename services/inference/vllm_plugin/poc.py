"""PoC v2's engine method ``mlnode_poc_artifacts`` inside a vLLM worker (mixed into the worker extension).

The math is the engine-agnostic ``services.inference.poc.batch``; this only supplies the served model's
body (:func:`run_body`, last position, final norm applied) on the worker's own device and dtype, its
attention by default the engine's own backend (``MLNODE_POC_ATTENTION``, see ``body``), and frames the
answer so the node cannot tell vLLM from the CPU engine. vLLM turns an exception in a worker
method into a 500 that pow retries, so input pow cannot fix by retrying (bad kwargs, a model ``run_body``
cannot walk) comes back as ``{"error": ...}``, which pow treats like the CPU engine's 400. Every rank
runs the body (tensor-parallel layers need all of them); only the rank holding the final norm answers,
the others return None and pow keeps the one non-None result.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference.poc import batch
from services.inference.poc.batch import LayerHook, PocRequest
from services.inference.vllm_plugin.body import (
    ENGINE_ATTENTION,
    AttentionMode,
    attention_mode,
    holds_final_norm,
    run_body,
)

#: Sequences per model call where free device memory does not say (CPU; as the CPU engine).
CPU_BATCH = 8
#: Bounds of the memory-derived batch on CUDA.
MAX_BATCH = 256
#: Share of the free device memory one PoC call may use for activations: the engine keeps serving.
MEMORY_SHARE = 0.5


def poc_batch_size(device: torch.device, seq_len: int, hidden: int, intermediate: int, heads: int,
                   dtype: torch.dtype) -> int:
    """Sequences per model call: on CUDA from what memory is free now, elsewhere :data:`CPU_BATCH`.

    The estimate per sequence counts a handful of ``[T, H]`` activations, the MLP's ``[T, I]`` ones and
    one float32 ``[heads, T, T]`` attention score block (SDPA's math fallback), doubled for slack.
    """
    if device.type != "cuda":
        return CPU_BATCH
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    elem = torch.empty((), dtype=dtype).element_size()
    per_seq = 2 * (seq_len * (8 * hidden + 3 * intermediate) * elem + heads * seq_len * seq_len * 4)
    return max(1, min(MAX_BATCH, int(MEMORY_SHARE * (free + cached)) // max(per_seq, 1)))


def engine_batch_cap(scheduler_config: Any, seq_len: int) -> int:
    """Most sequences one engine-attention call may hold: no more requests (``max_num_seqs``) and, where
    a sequence fits, no more tokens (``max_num_batched_tokens``) than one engine step of its own, so a
    backend's builder never sees a batch larger than those its buffers are sized for."""
    seqs = int(getattr(scheduler_config, "max_num_seqs", MAX_BATCH) or MAX_BATCH)
    tokens = int(getattr(scheduler_config, "max_num_batched_tokens", 0) or 0)
    by_tokens = max(1, tokens // seq_len) if tokens else seqs
    return max(1, min(seqs, by_tokens))


class PocArtifacts:
    """``mlnode_poc_artifacts``: PoC v2 artifacts of the served model (§5), answered like the CPU engine."""

    model_runner: Any

    def mlnode_poc_artifacts(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """``{"artifacts": [...], "dropped": [...]}`` for the nonces in ``kwargs`` on the final-norm rank,
        ``{"error": why}`` there for a call pow must not retry, None on every other rank."""
        answers = holds_final_norm()
        config = self.model_runner.model_config
        hidden = int(config.get_hidden_size())
        try:
            if args:
                raise ValueError(f"{batch.METHOD} takes keyword arguments only")
            # Every rank parses the same kwargs, so every rank skips the work together.
            req = PocRequest.from_kwargs(kwargs, hidden=hidden, max_len=int(config.max_model_len))
            mode = attention_mode()
        except ValueError as exc:
            return {"error": str(exc)} if answers else None
        try:
            result = self._compute(req, hidden, mode)
        except NotImplementedError as exc:  # a model run_body cannot walk (pipeline stages, sliding window)
            return {"error": f"this engine cannot compute PoC v2: {exc}"} if answers else None
        return result if answers else None

    def _compute(self, req: PocRequest, hidden: int, mode: AttentionMode) -> dict[str, list[Any]]:
        model = self.model_runner.model
        config = self.model_runner.model_config
        vllm_config = self.model_runner.vllm_config
        text = config.hf_text_config
        dtype: torch.dtype = config.dtype
        device = next(model.parameters()).device
        heads = int(getattr(text, "num_attention_heads", 1))
        intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise NotImplementedError(f"{type(model).__name__} has no decoder layers (.model.layers)")

        def last_hidden(embeds: torch.Tensor, hook: LayerHook) -> torch.Tensor:
            return run_body(model, embeds, hook, attention=mode, vllm_config=vllm_config)[:, -1]

        # Scoped: the worker thread's autograd state is vLLM's, not ours to switch off.
        with torch.inference_mode():
            size = poc_batch_size(device, req.seq_len, hidden, intermediate, heads, dtype)
            if mode == ENGINE_ATTENTION:
                size = min(size, engine_batch_cap(vllm_config.scheduler_config, req.seq_len))
            size = _agreed(size)
            return batch.run(req, last_hidden, layers=len(layers), hidden=hidden, dtype=dtype, device=device,
                             batch_size=size)


def _agreed(batch_size: int) -> int:
    """The smallest batch size of the tensor-parallel group: ranks see different free memory, and their
    layers' collectives only line up when every rank splits the nonces the same way."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return batch_size
    size = torch.tensor([batch_size], dtype=torch.int64)
    torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN, group=group.cpu_group)
    return int(size.item())
