"""The worker extension the node loads into every vLLM worker (``--worker-extension-cls``).

vLLM mixes this class into its worker, so its methods run in each worker process, next to the loaded
model (``self.model_runner.model``), and are reachable through ``POST /collective_rpc`` on the engine's
loopback port (dev mode; the gateway's proxy never lets that path through). Feature mixins (PoC v2) are
added to the bases here.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference.vllm_plugin.body import (
    attention_backend_name,
    attention_mode,
    holds_final_norm,
    parse_attention_mode,
    run_body,
)
from services.inference.vllm_plugin.poc import PocArtifacts


class BodyDiagnostics:
    """Proves :func:`run_body` computes what the engine serves, on the engine's own weights."""

    model_runner: Any

    def mlnode_body_info(self) -> dict[str, Any] | None:
        """Shape facts of the served body and how :func:`run_body` computes its attention
        (``attention``: ``engine`` or ``sdpa``, from ``MLNODE_POC_ATTENTION``; ``attention_backend``: the
        engine's backend), on the final-norm rank; None elsewhere."""
        if not holds_final_norm():
            return None
        model = self.model_runner.model
        weight = next(model.parameters())
        try:
            attention: str = attention_mode()
        except ValueError as exc:
            attention = f"invalid: {exc}"
        return {"layers": len(model.model.layers), "hidden_size": int(model.model.norm.weight.shape[-1]),
                "dtype": str(weight.dtype).removeprefix("torch."), "device": str(weight.device),
                "attention": attention, "attention_backend": attention_backend_name(model)}

    def mlnode_body_logprobs(self, token_ids: list[int], top: int = 5, hooked: bool = False,
                             attention: str | None = None) -> dict[str, Any] | None:
        """Next-token logprobs after ``token_ids`` computed through :func:`run_body` (``hooked``: with an
        identity layer hook, which takes the unfused residual path; ``attention``: ``engine`` or ``sdpa``,
        default ``MLNODE_POC_ATTENTION``); compare with the engine's answer."""
        if not isinstance(token_ids, list) or not token_ids or not all(isinstance(t, int) for t in token_ids):
            return {"error": "token_ids must be a non-empty list of integers"}
        try:
            mode = attention_mode() if attention is None else parse_attention_mode(str(attention),
                                                                                   "attention")
        except ValueError as exc:
            return {"error": str(exc)}
        model = self.model_runner.model
        device = next(model.parameters()).device
        with torch.inference_mode():
            embeds = model.embed_input_ids(torch.tensor(token_ids, device=device))
        hook = (lambda _index, x: x.clone()) if hooked else None
        hidden = run_body(model, embeds.unsqueeze(0), hook, attention=mode,
                          vllm_config=self.model_runner.vllm_config)
        if not holds_final_norm():
            return None
        with torch.inference_mode():
            logits = model.compute_logits(hidden[0, -1:].contiguous())
            logprobs = torch.log_softmax(logits.float(), dim=-1)[0]
            values, ids = torch.topk(logprobs, top)
        return {"top": [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]}


class MLNodeWorkerExtension(BodyDiagnostics, PocArtifacts):
    """Everything the node adds to a vLLM worker."""
