"""The engine's HTTP face: a minimal ASGI app (run by uvicorn) with vLLM's OpenAI-compatible routes.

A bare ASGI app rather than a framework because the hot path is SSE: each token is one ``send`` and a
client disconnect must be seen at once (a watcher task on ``receive``) to cancel the sequence and free
its batch slot. Handlers only parse, submit and forward; the model runs on the scheduler's thread and
its emissions come back to the event loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from node.errors import InvalidRequest
from node.logging import get_logger
from services.inference.validation.request import DEFAULT_MODE

from .checkpoint import LoadedModel
from .metrics import render_metrics
from .openai_requests import EngineContext, chat_prompt, completion_prompt, parse
from .openai_responses import ResponseBuilder
from .poc_rpc import PocWorker
from .scheduler import Scheduler
from .sequence import Emission

log = get_logger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 16 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


@dataclass(frozen=True)
class EngineSettings:
    model: str
    served_names: tuple[str, ...]
    max_num_seqs: int = 64
    seed: int = 0
    #: The logprobs a request that names no ``logprobs_mode`` gets (vLLM's ``--logprobs-mode``).
    logprobs_mode: str = DEFAULT_MODE


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": _dumps(obj)})


async def _send_error(send: Send, status: int, message: str, kind: str, param: Any = None) -> None:
    await _send_json(
        send, status, {"error": {"message": message, "type": kind, "param": param, "code": status}}
    )


class EngineApp:
    """The ASGI application; ``attach`` (from the loader thread) makes it ready."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.loaded: LoadedModel | None = None
        self.context: EngineContext | None = None
        self.scheduler: Scheduler | None = None
        self.poc: PocWorker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[int, asyncio.Queue[Emission | None]] = {}
        self._ids = itertools.count(1)
        self.started = time.time()

    @property
    def served_name(self) -> str:
        return self.settings.served_names[0]

    def attach(self, loaded: LoadedModel) -> None:
        """Start the model thread for ``loaded``; from here on ``/health`` answers 200."""
        scheduler = Scheduler(
            loaded, self._deliver, max_num_seqs=self.settings.max_num_seqs, seed=self.settings.seed
        )
        scheduler.start()
        self.scheduler = scheduler
        self.poc = PocWorker(loaded.model, loaded.max_model_len)
        self.context = EngineContext(loaded.tokenizer, loaded.max_model_len, loaded.config.vocab_size,
                                     self.settings.logprobs_mode)
        self.loaded = loaded

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.poc is not None:
            self.poc.shutdown()

    # -- model thread -> event loop ------------------------------------------------------------------

    def _deliver(self, batch: list[tuple[int, Emission]]) -> None:
        loop = self.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, batch)
        except RuntimeError:  # the loop closed under us: the server is shutting down
            return

    def _dispatch(self, batch: list[tuple[int, Emission]]) -> None:
        for seq_id, emission in batch:
            queue = self._queues.get(seq_id)
            if queue is not None:
                queue.put_nowait(emission)

    # -- ASGI ----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self.loop = asyncio.get_running_loop()
        try:
            await self._route(scope["method"], scope["path"], receive, send)
        except InvalidRequest as exc:  # vLLM's shape: {"error": {message, type, param, code}}
            await _send_error(send, 400, exc.message, str(exc.details.get("type", "BadRequestError")),
                              exc.details.get("param"))
        except _Disconnected:
            return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, method: str, path: str, receive: Receive, send: Send) -> None:
        routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/health": ("GET", self._health),
            "/v1/models": ("GET", self._models),
            "/metrics": ("GET", self._metrics),
            "/version": ("GET", self._version),
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat),
            "/tokenize": ("POST", self._tokenize),
            "/collective_rpc": ("POST", self._collective_rpc),
        }
        route = routes.get(path.rstrip("/") or "/")
        if route is None:
            await _send_error(send, 404, f"no route {path}", "not_found_error")
            return
        allowed, handler = route
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            await _send_error(send, 405, f"{path} accepts {allowed} only", "invalid_request_error")
            return
        if allowed == "GET":
            await handler(send)
            return
        body = await self._read_json(receive)
        if self.loaded is None or self.scheduler is None:
            await _send_error(send, 503, "the model is still loading", "service_unavailable")
            return
        await handler(body, receive, send)

    async def _read_json(self, receive: Receive) -> Any:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise InvalidRequest(f"request body exceeds {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest("request body is not valid JSON") from exc

    # -- GET routes ----------------------------------------------------------------------------------

    async def _health(self, send: Send) -> None:
        if self.loaded is None:
            await _send_error(send, 503, "the model is still loading", "service_unavailable")
            return
        await send({"type": "http.response.start", "status": 200, "headers": _JSON})
        await send({"type": "http.response.body", "body": b"{}"})

    async def _models(self, send: Send) -> None:
        if self.loaded is None:
            await _send_error(send, 503, "the model is still loading", "service_unavailable")
            return
        data = [
            {
                "id": name,
                "object": "model",
                "created": int(self.started),
                "owned_by": "mlnode",
                "root": self.settings.model,
                "parent": None,
                "max_model_len": self.loaded.max_model_len,
            }
            for name in self.settings.served_names
        ]
        await _send_json(send, 200, {"object": "list", "data": data})

    async def _metrics(self, send: Send) -> None:
        s = self.scheduler
        text = render_metrics(
            self.served_name,
            running=s.num_running if s else 0,
            waiting=s.num_waiting if s else 0,
            prompt_tokens=s.prompt_tokens if s else 0,
            generation_tokens=s.generation_tokens if s else 0,
            finished=dict(s.finished) if s else {},
            iterations=s.iterations if s else 0,
            poc_nonces=self.poc.nonces_done if self.poc else 0,
        )
        headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": text.encode("utf-8")})

    async def _version(self, send: Send) -> None:
        await _send_json(send, 200, {"version": "mlnode-cpu-engine"})

    # -- POST routes ---------------------------------------------------------------------------------

    async def _tokenize(self, body: Any, _receive: Receive, send: Send) -> None:
        assert self.loaded is not None and self.context is not None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        ctx = self.context
        tokens = chat_prompt(body, ctx) if body.get("messages") is not None else completion_prompt(body, ctx)
        await _send_json(
            send, 200, {"count": len(tokens), "max_model_len": self.loaded.max_model_len, "tokens": tokens}
        )

    async def _collective_rpc(self, body: Any, _receive: Receive, send: Send) -> None:
        """vLLM's dev-mode RPC route; the only method is PoC v2's ``mlnode_poc_artifacts``."""
        assert self.poc is not None
        try:
            req = self.poc.parse(body)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        await _send_json(send, 200, await self.poc.answer(req))

    async def _completions(self, body: Any, receive: Receive, send: Send) -> None:
        await self._generate(body, receive, send, chat=False)

    async def _chat(self, body: Any, receive: Receive, send: Send) -> None:
        await self._generate(body, receive, send, chat=True)

    async def _generate(self, body: Any, receive: Receive, send: Send, *, chat: bool) -> None:
        scheduler, ctx = self.scheduler, self.context
        assert scheduler is not None and ctx is not None
        req = parse(body, ctx, chat=chat)
        builder = ResponseBuilder(req, self.served_name)
        seq_id = next(self._ids)
        queue: asyncio.Queue[Emission | None] = asyncio.Queue()
        self._queues[seq_id] = queue
        scheduler.submit(seq_id, req.prompt, req.params, req.forced)
        watcher = asyncio.create_task(self._watch_disconnect(receive, queue))
        done = False
        try:
            if req.stream:
                done = await self._stream(builder, queue, send)
            else:
                done = await self._whole(builder, queue, send)
        finally:
            watcher.cancel()
            self._queues.pop(seq_id, None)
            if not done:
                scheduler.cancel(seq_id)
                log.info("request_cancelled", seq_id=seq_id, reason="client disconnected")

    async def _watch_disconnect(self, receive: Receive, queue: asyncio.Queue[Emission | None]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    async def _whole(
        self, builder: ResponseBuilder, queue: asyncio.Queue[Emission | None], send: Send
    ) -> bool:
        emissions: list[Emission] = []
        while not emissions or emissions[-1].finish_reason is None:
            emission = await queue.get()
            if emission is None:
                return False
            emissions.append(emission)
        if emissions[-1].finish_reason == "error":
            await _send_error(send, 500, "generation failed inside the engine", "internal_error")
        else:
            await _send_json(send, 200, builder.full(emissions))
        return True

    async def _stream(
        self, builder: ResponseBuilder, queue: asyncio.Queue[Emission | None], send: Send
    ) -> bool:
        async def event(obj: Any) -> None:
            await send(
                {"type": "http.response.body", "body": b"data: " + _dumps(obj) + b"\n\n", "more_body": True}
            )

        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        if builder.req.chat:
            await event(builder.role_chunk())
        produced = 0
        while True:
            emission = await queue.get()
            if emission is None:
                return False
            if emission.finish_reason == "error":
                await event(
                    {"error": {"message": "generation failed inside the engine", "type": "internal_error"}}
                )
                break
            produced += len(emission.tokens)
            await event(builder.chunk(emission))
            if emission.finish_reason is not None:
                break
        if builder.req.include_usage:
            await event(builder.usage_chunk(produced))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return True

