"""The common shape of a service process on the local bus.

A service answers ``ping``, ``status`` and ``stop`` plus its own request types, and publishes a
``state`` event whenever its state changes, so the gateway can derive the node state from what the
services report instead of keeping a copy of its own. A service's name and mode are the ones
:mod:`node.registry` lists, and its ``metrics`` answer carries the samples the registry declares for
it, read from its own status: the gateway shows them without knowing any service's fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import astuple
from typing import Any

from bus.codec import plain_reason
from bus.local import LocalBus
from bus.rpc import Caller, Handler
from node.config import Settings
from node.identity import NodeKeys
from node.logging import get_logger
from node.mode import ModeStore
from node.registry import BY_NAME, samples

log = get_logger(__name__)


class Service:
    """Base class: subclasses set ``name``/``mode`` and implement :meth:`status` and :meth:`stop`."""

    name: str = ""
    #: The node state this service stands for while active ("POW", "INFERENCE", "TRAIN").
    mode: str = ""
    #: How a refused request body is worded; services pass the contracts' (the gateway's) wording.
    explain = staticmethod(plain_reason)

    def __init__(self, settings: Settings, keys: NodeKeys) -> None:
        program = BY_NAME.get(self.name)
        if program is None or program.mode != self.mode:
            raise RuntimeError(f"service {self.name!r} ({self.mode!r}) is not in node.registry")
        self.program = program
        self.settings = settings
        self.keys = keys
        self.started_at = time.time()
        self.modes = ModeStore(settings.state_dir)
        self.bus = LocalBus(settings, keys, role=self.name)
        # bound once startup() has resumed persisted work
        self.server = self.bus.server(bind=False, explain=self.explain)
        self.events = self.bus.publisher()
        self.route("ping", self._ping)
        self.route("status", self._status)
        self.route("stop", self._stop)
        self.route("metrics", self._metrics)
        self._shutdown = asyncio.Event()

    def route(self, kind: str, handler: Handler, body: Any = Any) -> None:
        """Serve ``kind``; ``body`` is the contract the handler receives its payload as."""
        self.server.route(kind, handler, body)

    def claim_names_me(self) -> bool:
        """True when the node's mode claim still names this service: the one test before a restarted
        service resumes persisted work (the node may have moved on while it was down)."""
        return self.modes.read() == self.mode

    # -- what subclasses provide ----------------------------------------------------------------
    def is_active(self) -> bool:
        """True while this service holds the node (its job is loading, running or serving)."""
        return False

    async def status(self) -> dict[str, Any]:
        """Service-specific status fields, merged into the common ``status`` reply."""
        return {}

    async def stop(self) -> dict[str, Any]:
        """Stop whatever job runs; idempotent."""
        return {}

    async def metrics(self) -> dict[str, Any]:
        """Service-specific counters and gauges for ``/metrics`` (numbers only; default: none)."""
        return {}

    async def startup(self) -> None:
        """Runs once after the sockets are bound (resume persisted work here)."""

    async def shutdown(self) -> None:
        """Runs on SIGTERM/SIGINT before the process exits; default: stop the job."""
        await self.stop()

    # -- common handlers ----------------------------------------------------------------------
    async def _ping(self, _payload: Any, _caller: Caller) -> dict[str, Any]:
        return {"service": self.name, "uptime_s": round(time.time() - self.started_at, 3)}

    async def _status(self, _payload: Any, _caller: Caller) -> dict[str, Any]:
        detail = await self.status()
        return {"service": self.name, "mode": self.mode, "active": self.is_active(), **detail}

    async def _metrics(self, _payload: Any, _caller: Caller) -> dict[str, Any]:
        """Everything a scrape shows of this service, in one answer; ``samples`` are
        ``[name, kind, help, labels, value]`` rows."""
        status = await self._status(None, _caller)
        values = await self.metrics()
        return {
            "service": self.name,
            "time": time.time(),
            "started_at": self.started_at,
            "active": status["active"],
            "bus": {
                "auth_failures": dict(self.bus.auth.failures),
                "auth_successes": dict(self.bus.auth.successes),
                "dropped_frames": self.server.dropped,
            },
            "samples": [astuple(x) for x in samples(self.program, {"status": status, "values": values})],
        }

    async def _stop(self, _payload: Any, _caller: Caller) -> dict[str, Any]:
        result = await self.stop()
        self.publish_state()
        return {"service": self.name, "active": self.is_active(), **result}

    def publish_state(self, **extra: Any) -> None:
        self.events.publish("state", {"service": self.name, "active": self.is_active(), **extra})

    # -- process lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._shutdown.set)
        # Resume persisted work before answering anyone: until then the service is unreachable and the
        # gateway reports the node's claim, never a transient "not active" that is not the truth.
        await self.startup()
        self.server.bind()
        serving = loop.create_task(self.server.serve())
        log.info("service_started", endpoint=self.server.endpoint)
        try:
            self.publish_state()
            await self._shutdown.wait()
            log.info("service_stopping")
            try:
                await asyncio.wait_for(self.shutdown(), 30)
            except TimeoutError:
                log.error("service_shutdown_timeout")
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            self.server.close()
            self.events.close()
            self.bus.close()
            log.info("service_stopped")
