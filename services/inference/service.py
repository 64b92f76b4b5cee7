"""The `inference` process: launches and supervises the OpenAI-compatible engines, on the local bus.

Bus requests (the gateway maps the HTTP routes onto them):

* ``up_start`` {model, dtype, additional_args} -> {"status": "starting", ...} at once; Conflict while a
  start or an engine is live; InvalidRequest for a bad body (``up/async``).
* ``up_replace`` -> the same, but whatever serves or starts is stopped first (the blocking ``up``: the
  reference node restarts with the requested model); a start it replaces answers its waiter 409.
* ``up_wait`` -> {"status": "OK"} once serving; Unavailable with the engine's last log lines when the
  start failed; InvalidRequest when nothing is starting or running.
* ``up_status`` -> {"status": not_started|in_progress|completed|failed|cancelled, "is_starting",
  "is_running", "elapsed_seconds", "error"}.
* ``down`` -> {"status": "OK"} (idempotent); ``backends`` -> the healthy instances' base URLs.
* ``status`` / ``stop``: the common ones (status adds state, healthy, ready, model, instances).

Engines: vLLM on GPU hosts, else the CPU engine (``MLNODE_ENGINE``); see :mod:`.engine_plan`. On a CPU
host a model *name* that is not a local directory is served by a tiny deterministic stand-in under that
name (see :mod:`.tiny_models`). Health is judged by observed progress (:mod:`.liveness`, hang window
``MLNODE_ENGINE_HANG_SECONDS``, default 60 s). No engine outlives this process (:mod:`.process_group`).

At start, engines a previous incarnation left behind are killed; then, if the node's mode claim still
names INFERENCE and a request was being served, it is served again (a crash of this process costs a
reload, not the node's state); else ``MLNODE_INFERENCE_AUTOSTART`` (a model directory) is served when the
node is STOPPED, claiming INFERENCE under the node's mode lock. Both go through the engine-argument
policy (:mod:`.engine_args`) like any ``up``: a saved request it refuses is logged and forgotten.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from bus.rpc import Caller
from bus.service import Service
from contracts.checked import explain as explain_refusal
from contracts.inference import InferenceUp
from node.config import METRICS_MODES, Settings
from node.errors import ConfigError, MLNodeError
from node.identity import NodeKeys
from node.logging import get_logger
from node.mode import STOPPED
from node.process import bootstrap, fail
from services.inference.engine_plan import VLLM, choose_engine, vllm_version
from services.inference.instance import Instance
from services.inference.manager import EngineManager
from services.inference.models.cache import hub_cache_dir
from services.inference.models.handlers import ModelHandlers
from services.inference.network_metrics import Collector
from services.inference.up_request import UpRequest, parse_up_request

log = get_logger(__name__)


class InferenceService(Service):
    name = "inference"
    mode = "INFERENCE"
    explain = staticmethod(explain_refusal)

    def __init__(self, settings: Settings, keys: NodeKeys, manager: EngineManager | None = None) -> None:
        super().__init__(settings, keys)
        self.models = ModelHandlers(settings, self._served_repos)
        self.manager = manager or EngineManager(settings, self._publish_backends,
                                                cached=self.models.cache.served_path)
        self.collector = Collector(hub_cache_dir(), self._serving)
        #: Checked before anything is served: MLNODE_ENGINE=vllm without vLLM stops the process (exit 78).
        self.vllm_version = engine_version(settings, self.manager.environ)
        self.route("up_start", self._up_start, InferenceUp)
        self.route("up_replace", self._up_replace, InferenceUp)
        self.route("up_wait", self._up_wait)
        self.route("up_status", self._up_status)
        self.route("down", self._down)
        self.route("backends", self._backends)
        self.route("network_metrics", self._network_metrics)
        self.models.register(self.route)

    # -- Service ---------------------------------------------------------------------------------------
    def is_active(self) -> bool:
        return self.manager.is_active()

    async def status(self) -> dict[str, Any]:
        return {**self.manager.status(), "vllm_version": self.vllm_version}

    async def stop(self) -> dict[str, Any]:
        return await self.manager.down()

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.manager.pidfile.sweep)
        await self._resume_or_autostart()
        await self.collector.start()
        await self.models.downloads.resume()
        mode = self.settings.gonka_metrics
        if mode not in METRICS_MODES:
            log.warning("gonka_metrics_unknown", value=mode, serving="full")
        log.info("network_metrics", GONKA_METRICS=mode, served=self.settings.network_metrics,
                 hf_cache=str(self.models.cache.cache_dir))

    async def metrics(self) -> dict[str, Any]:
        return {"instances": [inst.engine_metrics() for inst in self.manager.instances],
                "downloads": self.models.downloads.metrics()}

    async def shutdown(self) -> None:
        await self.models.downloads.close()
        await self.collector.close()
        await self.manager.close()

    # -- bus handlers ----------------------------------------------------------------------------------
    async def _up_start(self, body: InferenceUp, _caller: Caller) -> dict[str, Any]:
        result = self.manager.begin(UpRequest.of(body))
        self.publish_state()
        return result

    async def _up_replace(self, body: InferenceUp, _caller: Caller) -> dict[str, Any]:
        result = await self.manager.replace(UpRequest.of(body))
        self.publish_state()
        return result

    async def _up_wait(self, _payload: Any, _caller: Caller) -> dict[str, Any]:
        try:
            return await self.manager.wait_up()
        finally:
            self.publish_state()

    async def _up_status(self, _payload: Any, _caller: Caller) -> dict[str, Any]:
        return self.manager.up_status()

    async def _down(self, _payload: Any, _caller: Caller) -> dict[str, Any]:
        result = await self.manager.down()
        self.publish_state()
        return result

    async def _backends(self, _payload: Any, _caller: Caller) -> list[str]:
        return self.manager.backends()

    def _publish_backends(self, urls: list[str]) -> None:
        self.events.publish("backends", urls)

    async def _network_metrics(self, _payload: Any, _caller: Caller) -> Any:
        return msgspec.to_builtins(await self.collector.snapshot())

    def _serving(self) -> tuple[UpRequest | None, list[Instance]]:
        manager = self.manager
        return (manager.request if manager.is_active() else None), list(manager.instances)

    def _served_repos(self) -> list[str]:
        request, _ = self._serving()
        return [request.model] if request is not None else []

    # -- start-up ------------------------------------------------------------------------------------
    async def _resume_or_autostart(self) -> None:
        loop = asyncio.get_running_loop()
        fd = await loop.run_in_executor(None, self.modes.acquire)
        try:
            if self.manager.is_active():
                return  # an up arrived while we were starting: it wins
            remembered = self.manager.remembered()
            if self.claim_names_me() and remembered is not None:
                if not self._serve(remembered, "resume"):
                    # Refused (the policy judges a replayed request again) or unreadable: not retried
                    # at every restart, and the node does not claim a mode nothing serves.
                    self.manager.forget_request()
                    self.modes.write(STOPPED)
                return
            self.manager.forget_request()  # the node moved on while we were down
            autostart = self.settings.inference_autostart
            if autostart is not None and self.modes.read() == STOPPED:
                self.modes.write(self.mode)
                if not self._serve({"model": str(autostart), "dtype": "auto", "additional_args": []},
                                   "autostart"):
                    self.modes.write(STOPPED)
        finally:
            self.modes.release(fd)

    def _serve(self, body: dict[str, Any], why: str) -> bool:
        try:
            self.manager.begin(parse_up_request(body))
        except MLNodeError as exc:
            log.error("inference_not_started", why=why, error=exc.message)
            return False
        log.info("inference_started_at_boot", why=why, model=body.get("model"))
        return True


def engine_version(settings: Settings, environ: dict[str, str]) -> str | None:
    """vLLM's version when vLLM is the engine; ConfigError when it is required and missing."""
    if settings.engine == "vllm":
        return vllm_version(environ)
    if settings.engine == "auto" and choose_engine("auto") is VLLM:
        try:
            return vllm_version(environ)
        except ConfigError:
            return None
    return None


def main() -> None:
    settings, keys = bootstrap("inference")

    async def run() -> None:
        try:
            service = InferenceService(settings, keys)
        except ConfigError as exc:
            fail("inference", exc.message)
        await service.run()

    asyncio.run(run())
