"""``POST /collective_rpc`` of the CPU engine: vLLM's dev-mode route shape, PoC v2 as its only method.

The body is vLLM's (``{"method", "args", "kwargs", "timeout"}``) and the answer is ``{"results": [R]}``
with one worker, so the node's client cannot tell the engines apart. The work runs on its own thread
(one PoC call at a time) beside the chat scheduler's thread: both only read the weights, torch releases
the GIL inside its kernels, and the event loop stays free -- ``/health`` and chat keep answering while a
PoC batch runs, each getting a share of the cores.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from services.inference.poc import batch
from services.inference.poc.batch import LayerHook, PocRequest

from .model import LlamaModel

BATCH_SIZE = 8


class PocWorker:
    """Runs ``mlnode_poc_artifacts`` for one loaded model on a dedicated thread."""

    def __init__(self, model: LlamaModel, max_model_len: int) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-engine-poc")
        self.nonces_done = 0

    def parse(self, body: Any) -> PocRequest:
        """The checked request of an RPC body; ValueError (a 400) for anything else."""
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        if body.get("method") != batch.METHOD:
            raise ValueError(f"unknown method {body.get('method')!r}; this engine offers {batch.METHOD!r}")
        if body.get("args"):
            raise ValueError(f"{batch.METHOD} takes keyword arguments only")
        return PocRequest.from_kwargs(
            body.get("kwargs", {}), hidden=self.model.cfg.hidden_size, max_len=self.max_model_len
        )

    def _last_hidden(self, embeds: torch.Tensor, hook: LayerHook) -> torch.Tensor:
        return self.model.body(embeds, hook)[:, -1]

    def compute(self, req: PocRequest) -> dict[str, list[Any]]:
        # Scoped, not torch.set_grad_enabled(False): the caller's thread (a test's main thread) keeps its
        # autograd state.
        with torch.inference_mode():
            return batch.run(
                req,
                self._last_hidden,
                layers=self.model.cfg.num_hidden_layers,
                hidden=self.model.cfg.hidden_size,
                dtype=self.model.dtype,
                device=torch.device("cpu"),
                batch_size=BATCH_SIZE,
                progress=self._count,
            )

    def _count(self, nonces: int) -> None:
        self.nonces_done += nonces

    async def answer(self, req: PocRequest) -> dict[str, Any]:
        """vLLM's answer shape: one result per worker; this engine has one worker."""
        result = await asyncio.get_running_loop().run_in_executor(self._pool, self.compute, req)
        return {"results": [result]}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
