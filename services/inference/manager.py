"""The engine manager: one ``up`` at a time, its instances, its status, and the healthy backend set.

Phases: ``idle`` -> ``starting`` -> ``running`` (or ``failed`` / ``cancelled``) -> ``idle`` after
``down``. A start runs in the background so that ``up/async`` answers at once and the blocking ``up``
can wait for it separately (and give up before the client's 15-minute timeout while the start goes
on). Whenever the set of healthy instances changes, ``publish`` is called with their base URLs: the
service turns that into the ``backends`` bus event the gateway's proxy follows.

``down`` answers at once: the instances are detached and torn down in the background (SIGTERM, grace,
SIGKILL), and the next start waits for that teardown before it launches anything, so two engines never
share a port or a GPU. ``replace`` (the blocking ``up`` while serving) is a ``down`` then a ``begin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from node import gpu
from node.config import Settings
from node.errors import Conflict, InvalidRequest, MLNodeError, Unavailable
from node.files import atomic_write_json
from node.logging import get_logger
from services.inference.engine_args import EnginePolicy
from services.inference.engine_plan import VLLM, EngineKind, InstancePlan, choose_engine, plan_cpu, plan_vllm
from services.inference.instance import Instance
from services.inference.liveness import Timing
from services.inference.probe import Prober
from services.inference.process_group import PidFile
from services.inference.tiny_models import requested_positions, tiny_model
from services.inference.up_request import UpRequest
from services.inference.vllm_cmd import last_flag_value

log = get_logger(__name__)

MAX_RESTARTS = 3
CANCELLED_BY_DOWN = "the inference start was cancelled by a down or stop request"
CANCELLED_BY_UP = "the inference start was replaced by a later inference/up"

UP_STATUS = {"idle": "not_started", "starting": "in_progress", "running": "completed", "failed": "failed",
             "cancelled": "cancelled", "stopping": "in_progress"}
STATE = {"idle": "STOPPED", "starting": "STARTING", "running": "RUNNING", "failed": "FAILED",
         "cancelled": "STOPPED", "stopping": "STOPPING"}


class EngineManager:
    def __init__(self, settings: Settings, publish: Callable[[list[str]], None], *,
                 timing: Timing | None = None, max_restarts: int = MAX_RESTARTS,
                 environ: Mapping[str, str] | None = None,
                 cached: Callable[[str, str | None], Path | None] | None = None) -> None:
        self.settings = settings
        self.publish = publish
        #: (hub repo, revision) -> the snapshot of a complete cached download, else None.
        self.cached = cached or (lambda _repo, _revision: None)
        self.environ = dict(os.environ if environ is None else environ)
        self.timing = timing or Timing.for_window(settings.engine_hang_s)
        #: Judges every request before it is saved, planned or started (ConfigError for bad settings).
        self.policy = EnginePolicy.from_settings(settings)
        self.max_restarts = max_restarts
        self.dir = settings.service_dir("inference")
        self.marker = str(self.dir)
        self.pidfile = PidFile(self.dir / "engines.pid", self.marker)
        self.request_file = self.dir / "serving.json"
        self.phase = "idle"
        self.request: UpRequest | None = None
        self.kind: EngineKind | None = None
        self.instances: list[Instance] = []
        self.error: str | None = None
        self.began: float | None = None
        self.ended: float | None = None
        self._prober = Prober(self.timing.probe_timeout_s)
        self._start_task: asyncio.Task[None] | None = None
        self._outcome: asyncio.Future[None] | None = None
        self._published: list[str] | None = None
        self._down_lock = asyncio.Lock()
        self._retiring: list[Instance] = []  # detached by a down, still being torn down
        self._teardown: asyncio.Task[None] | None = None
        self._cancel_reason = CANCELLED_BY_DOWN

    # -- queries ---------------------------------------------------------------------------------------
    def is_active(self) -> bool:
        return self.phase in ("starting", "running")

    def backends(self) -> list[str]:
        now = time.monotonic()
        return [i.url for i in self.instances if i.healthy(now)]

    def up_status(self) -> dict[str, Any]:
        elapsed = 0.0
        if self.began is not None:
            elapsed = (self.ended if self.ended is not None else time.monotonic()) - self.began
        return {
            "status": UP_STATUS[self.phase],
            "is_starting": self.phase == "starting",
            "is_running": self.phase == "running",
            "elapsed_seconds": round(elapsed, 3),
            "error": self.error,
            "model": self.request.model if self.request else None,
        }

    def status(self) -> dict[str, Any]:
        backends = self.backends()
        serving = self.phase == "running" and bool(backends)
        return {
            "state": STATE[self.phase],
            "healthy": serving,
            "ready": serving,
            "model": self.request.model if self.request and self.is_active() else None,
            "served_models": list(self.request.served_names) if self.request and self.is_active() else [],
            "engine": self.kind.name if self.kind else None,
            "backends": backends,
            "instances": [i.status() for i in self.instances],
            "error": self.error,
            "up": self.up_status(),
        }

    # -- commands --------------------------------------------------------------------------------------
    def begin(self, req: UpRequest) -> dict[str, Any]:
        """Start serving ``req`` in the background; Conflict while a start or an engine is live;
        InvalidRequest naming the field or flag the engine-argument policy refuses."""
        req = self.policy.vet(req)
        if self.phase in ("starting", "running", "stopping"):
            current = self.request.model if self.request else "?"
            raise Conflict(f"inference is already {self.phase} (model {current!r}); "
                           "POST /api/v1/inference/down first")
        kind = choose_engine(self.settings.engine)
        plans = None
        if kind is VLLM:  # planned now so that bad parallel sizes are a 400, not a failed start
            plans = plan_vllm(req, self.settings.inference_port, self.environ, len(gpu.devices()),
                              self.settings.logprobs_mode, self.settings.engine_env)
            if self._from_cache(req) is not None:
                # Complete in the node's cache: vLLM loads it from there without asking the hub.
                plans = [dataclasses.replace(p, env={**p.env, "HF_HUB_OFFLINE": "1"}) for p in plans]
        self.phase = "starting"
        self.request, self.kind, self.error = req, kind, None
        self.instances = []
        self.began, self.ended = time.monotonic(), None
        self._cancel_reason = CANCELLED_BY_DOWN
        self._outcome = asyncio.get_running_loop().create_future()
        self._remember(req)
        self._start_task = asyncio.get_running_loop().create_task(self._start(req, kind, plans))
        log.info("inference_starting", model=req.model, engine=kind.name, dtype=req.dtype,
                 additional_args=list(req.additional_args))
        return {"status": "starting", "model": req.model, "engine": kind.name}

    async def replace(self, req: UpRequest) -> dict[str, Any]:
        """The blocking ``up``: whatever serves or starts is stopped, then ``req`` is started (a request the
        policy refuses stops nothing)."""
        req = self.policy.vet(req)
        if self.phase in ("starting", "running", "stopping"):
            log.info("inference_replacing", model=self.request.model if self.request else None,
                     new_model=req.model)
            self._cancel_reason = CANCELLED_BY_UP
            await self.down()
        return self.begin(req)

    async def wait_up(self) -> dict[str, Any]:
        """Until the start in progress ends: {"status": "OK"}, or Unavailable with the reason."""
        if self.phase == "running":
            return {"status": "OK"}
        if self.phase == "failed":
            raise Unavailable(self.error or "inference start failed")
        if self.phase == "cancelled":
            raise self._cancelled()
        if self.phase != "starting" or self._outcome is None:
            raise InvalidRequest("no inference start is in progress; POST /api/v1/inference/up/async first")
        try:
            await asyncio.shield(self._outcome)
        except Conflict:  # replaced by a later up
            raise
        except MLNodeError as exc:
            raise Unavailable(exc.message) from None
        return {"status": "OK"}

    def _cancelled(self) -> MLNodeError:
        if self._cancel_reason == CANCELLED_BY_UP:
            return Conflict(CANCELLED_BY_UP)
        return Unavailable(CANCELLED_BY_DOWN)

    async def down(self, *, forget: bool = True) -> dict[str, Any]:
        """Stop the start in progress and every engine; idempotent. ``forget=False`` (process shutdown)
        keeps the request on disk, so that the next ``inference`` process serves it again."""
        async with self._down_lock:  # a second down waits for the first, then finds nothing to do
            return await self._down(forget)

    async def _down(self, forget: bool) -> dict[str, Any]:
        was = self.phase
        if was in ("idle", "cancelled", "failed") and not self.instances:
            if forget:
                self.forget_request()
            if was == "failed":
                self.phase, self.request, self.error, self.began, self.ended = "idle", None, None, None, None
            return {"status": "OK"}
        self.phase = "stopping"
        task = self._start_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._retire_instances()
        if forget:
            self.forget_request()
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_exception(self._cancelled())  # its waiter learns why
            self._outcome.exception()  # retrieved: nobody may be waiting
        self.phase = "cancelled" if was == "starting" else "idle"
        if self.phase == "idle":
            self.request, self.error, self.began, self.ended = None, None, None, None
        else:
            self.ended = time.monotonic()
        log.info("inference_down", was=was)
        return {"status": "OK"}

    async def close(self) -> None:
        await self.down(forget=False)
        await self.settled()
        await self._prober.close()

    async def settled(self) -> None:
        """Until every engine a ``down`` detached is gone."""
        while self._teardown is not None and not self._teardown.done():
            await asyncio.shield(self._teardown)

    # -- internals -------------------------------------------------------------------------------------
    async def _start(self, req: UpRequest, kind: EngineKind, plans: list[InstancePlan] | None) -> None:
        assert self._outcome is not None
        try:
            await self.settled()  # the previous engines free their ports and GPUs first
            if plans is None:
                stand_in = None
                # Only an absolute path is ever read from disk: a repo id that happens to name a directory
                # relative to this process is still a name.
                if not (self.policy.is_local(req.model) and Path(req.model).is_dir()):
                    stand_in = await asyncio.to_thread(self._from_cache, req)
                    if stand_in is not None:
                        log.info("inference_model_from_cache", model=req.model, path=str(stand_in))
                    else:
                        positions = requested_positions(req.additional_args)
                        stand_in = await tiny_model(req.model, self.dir / "models", positions)
                plans = plan_cpu(req, stand_in, self.settings.inference_port, self.environ,
                                 self.settings.logprobs_mode, self.settings.engine_env)
            self.instances = [self._instance(p, kind) for p in plans]
            for n, inst in enumerate(self.instances):
                if n and kind.stagger_s:
                    await asyncio.sleep(kind.stagger_s)
                inst.start()
            await asyncio.gather(*(i.ready for i in self.instances))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, MLNodeError) else f"{type(exc).__name__}: {exc}"
            self.error = message
            log.error("inference_start_failed", model=req.model, error=message)
            await self._stop_instances()
            self.forget_request()
            self.phase, self.ended = "failed", time.monotonic()
            self._outcome.set_exception(Unavailable(message))
            self._outcome.exception()  # retrieved: nobody may be waiting
            return
        self.phase, self.ended = "running", time.monotonic()
        log.info("inference_serving", model=req.model, engine=kind.name,
                 instances=[i.url for i in self.instances], start_s=round(self.ended - (self.began or 0), 3))
        self._outcome.set_result(None)
        self._changed()

    def _from_cache(self, req: UpRequest) -> Path | None:
        """The cached snapshot of the hub model ``req`` names (``--revision`` when given), if complete."""
        if Path(req.model).is_dir():
            return None
        return self.cached(req.model, last_flag_value(list(req.additional_args), ("--revision",)))

    def _instance(self, plan: InstancePlan, kind: EngineKind) -> Instance:
        return Instance(plan, kind, log_path=self.dir / f"engine-{plan.index}.log", marker=self.marker,
                        timing=self.timing, prober=self._prober, max_restarts=self.max_restarts,
                        on_change=self._changed)

    async def _stop_instances(self) -> None:
        if self.instances:
            await asyncio.gather(*(i.stop() for i in self.instances), return_exceptions=True)
        self.instances = []
        self._changed()

    def _retire_instances(self) -> None:
        """Detach the instances (no longer served or reported) and stop them in the background."""
        instances, self.instances = self.instances, []
        if instances:
            self._retiring.extend(instances)
            previous = self._teardown

            async def teardown() -> None:
                if previous is not None:
                    await asyncio.gather(previous, return_exceptions=True)
                await asyncio.gather(*(i.stop() for i in instances), return_exceptions=True)
                self._retiring = [i for i in self._retiring if i not in instances]
                self._changed()
                log.info("inference_engines_stopped", count=len(instances))

            self._teardown = asyncio.get_running_loop().create_task(teardown())
        self._changed()

    def _changed(self) -> None:
        """Called on every instance event: keep the pid file and the published backends current."""
        live = [i.process.pgid for i in [*self.instances, *self._retiring]
                if i.process is not None and i.process.returncode is None]
        try:
            if live:
                self.pidfile.write(live)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.pidfile.path.unlink()
        except OSError as exc:
            log.warning("pidfile_write_failed", error=str(exc))
        if self.phase == "running" and self.instances and all(i.state == "failed" for i in self.instances):
            self.phase = "failed"
            errors = [i.error for i in self.instances if i.error]
            self.error = "; ".join(errors) or "every engine instance failed"
            log.error("inference_failed", error=self.error)
            self.forget_request()
        backends = self.backends()
        if backends != self._published:
            self._published = backends
            log.info("backends_changed", backends=backends)
            self.publish(backends)

    def _remember(self, req: UpRequest) -> None:
        """Persist the request so that an ``inference`` restart (after a crash) resumes serving it."""
        try:
            atomic_write_json(self.request_file, req.to_wire())
        except Unavailable as exc:
            log.warning("request_not_persisted", error=exc.message)

    def forget_request(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.request_file.unlink()

    def remembered(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.request_file.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
