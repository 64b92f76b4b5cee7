"""The gateway's view of the services: bus clients, node-state derivation and the mode arbiter.

The gateway keeps no service state. Each worker process asks the services over the bus; the only
shared thing is the mode claim (``node.mode``), taken under a file lock so that requests racing in
different gunicorn workers cannot start two services.

Waiting for that lock blocks a thread, so claims and stops each have their own small thread pool:
fifty racing ``up``s queue in the claims' pool and never take the thread a stop needs (nor the event
loop's default pool, which every other ``to_thread`` uses).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from bus.local import LocalBus
from bus.rpc import RpcClient
from node.config import Settings
from node.errors import Conflict, MLNodeError, Unavailable
from node.identity import NodeKeys, role_keys
from node.logging import get_logger
from node.mode import ModeStore
from node.registry import MODE_OF, MODES, NAMES, SERVICE_OF, STOPPED

log = get_logger(__name__)
STATUS_TIMEOUT_S = 3.0
#: A stop answers within 2 s whatever a service is doing: the services get this long to confirm it
#: (the 409 check of a service's own stop route takes at most STOP_GUARD_S of it).
STOP_BUDGET_S = 1.3
STOP_GUARD_S = 0.5
STOP_LOCK_WAIT_S = 0.3
T = TypeVar("T")
#: Threads that wait for the mode lock on behalf of starts, and on behalf of stops (per worker process).
CLAIM_THREADS = 4
STOP_THREADS = 4


@dataclass
class Report:
    """One service's answer to ``status`` — or why there was none."""

    service: str
    reachable: bool
    status: dict[str, Any]
    error: str = ""

    @property
    def active(self) -> bool:
        return self.reachable and bool(self.status.get("active"))


def conflict_message(wanted: str, current: str) -> str:
    return (
        f"Cannot run {wanted} because MLNode is currently in {current} mode. "
        f"Please stop {current} first."
    )


class Services:
    """Per-worker access to the services (create inside the worker's event loop)."""

    def __init__(self, settings: Settings, keys: NodeKeys | None = None) -> None:
        self.settings = settings
        # Only the gateway's own bus key and the others' public halves (never the node's identity).
        self.keys = keys or role_keys(settings.keys_dir, "gateway")
        self.modes = ModeStore(settings.state_dir)
        self._bus: LocalBus | None = None
        self._clients: dict[str, RpcClient] = {}
        self._claims = ThreadPoolExecutor(CLAIM_THREADS, thread_name_prefix="gateway-claim")
        self._stops = ThreadPoolExecutor(STOP_THREADS, thread_name_prefix="gateway-stop")

    def client(self, service: str) -> RpcClient:
        if self._bus is None:
            self._bus = LocalBus(self.settings, self.keys, role="gateway")
        if service not in self._clients:
            self._clients[service] = self._bus.client(service)
        return self._clients[service]

    async def call(
        self, service: str, kind: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        return await self.client(service).request(
            kind, payload, timeout=timeout if timeout is not None else self.settings.bus_timeout_s
        )

    async def report(self, service: str, timeout: float = STATUS_TIMEOUT_S) -> Report:
        try:
            status = await self.call(service, "status", timeout=timeout)
        except MLNodeError as exc:
            return Report(service, False, {}, exc.message)
        return Report(service, True, status if isinstance(status, dict) else {})

    async def reports(self, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Report]:
        results = await asyncio.gather(*(self.report(s, timeout) for s in NAMES))
        return {r.service: r for r in results}

    def node_state(self, reports: dict[str, Report], claim: str | None = None) -> str:
        """The one state the client sees: the active service, else the claim of an unreachable one."""
        active = [MODE_OF[s] for s, r in reports.items() if r.active]
        if len(active) > 1:
            log.error("several_services_active", services=active)
        if active:
            return active[0]
        claim = self.modes.read() if claim is None else claim
        if claim in MODES and not reports[SERVICE_OF[claim]].reachable:
            return claim  # it is restarting and will resume its persisted job
        return STOPPED

    async def current_mode(self, exclude: str | None = None, timeout: float = STATUS_TIMEOUT_S) -> str:
        reports = await self.reports(timeout)
        if exclude is not None:
            reports = {s: r for s, r in reports.items() if s != exclude}
            claim = self.modes.read()
            if claim == MODE_OF[exclude]:
                claim = STOPPED
            return self._other_state(reports, claim)
        return self.node_state(reports)

    def _other_state(self, reports: dict[str, Report], claim: str) -> str:
        for service, report in reports.items():
            if report.active:
                return MODE_OF[service]
        if claim in MODES and SERVICE_OF[claim] in reports and not reports[SERVICE_OF[claim]].reachable:
            return claim
        return STOPPED

    async def exclusive(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn`` holding the node-wide mode lock (a file lock shared by all workers)."""
        pending = asyncio.get_running_loop().run_in_executor(self._claims, self.modes.acquire)
        try:
            fd = await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The caller went away while we waited: release the lock as soon as it is ours.
            pending.add_done_callback(lambda f: f.exception() or self.modes.release(f.result()))
            raise
        try:
            return await fn()
        finally:
            self.modes.release(fd)

    async def for_stop(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a stop under the mode lock if it is free within STOP_LOCK_WAIT_S, else without it: a
        start holding the lock (a phase flip flushing results, a slow service) must not delay a stop.
        A start that loses this race is refused by its service or sees its job stopped."""
        fd = await asyncio.get_running_loop().run_in_executor(self._stops, self.modes.try_acquire,
                                                              STOP_LOCK_WAIT_S)
        if fd is None:
            log.warning("stop_without_mode_lock", waited_s=STOP_LOCK_WAIT_S)
        try:
            return await fn()
        finally:
            if fd is not None:
                self.modes.release(fd)

    async def guard(self, service: str, timeout: float = STATUS_TIMEOUT_S) -> None:
        """Raise the contract's 409 when a service other than ``service`` holds the node."""
        other = await self.current_mode(exclude=service, timeout=timeout)
        if other != STOPPED:
            raise Conflict(conflict_message(MODE_OF[service], other))

    def release_claim(self, service: str | None = None) -> None:
        """Record STOPPED (only if the claim names ``service``, when given); never raises.

        Done before the services confirm: a service that is restarting, or too slow to answer, then does
        not resume its job when it comes back.
        """
        try:
            if service is None or self.modes.read() == MODE_OF[service]:
                self.modes.write(STOPPED)
        except MLNodeError as exc:  # ModeStore.write already fell back to removing the claim
            log.error("mode_not_recorded", reason=exc.message)

    async def stop_all(self) -> dict[str, Any]:
        """Stop every service; answers within about STOP_LOCK_WAIT_S + STOP_BUDGET_S and never raises
        (the contract's client repairs by stopping, so a stop must not fail)."""
        async def stop_everything() -> dict[str, Any]:
            self.release_claim()
            results = await asyncio.gather(
                *(self.call(s, "stop", timeout=STOP_BUDGET_S) for s in NAMES), return_exceptions=True,
            )
            pairs = zip(NAMES, results, strict=True)
            errors = {s: str(r) for s, r in pairs if isinstance(r, BaseException)}
            if errors:
                log.warning("stop_incomplete", errors=errors)
            return errors

        return await self.for_stop(stop_everything)

    async def stop_one(self, service: str, kind: str) -> Any:
        """A service's own stop route (``pow/stop``, ``inference/down``, ``train/stop``): the 409 rule,
        then the claim is released and the service told; a service that does not confirm in time is
        not a failure (its job will not resume), the service's own refusals (4xx) are passed on."""
        async def stop_it() -> Any:
            began = time.monotonic()
            await self.guard(service, timeout=STOP_GUARD_S)
            self.release_claim(service)
            left = max(0.3, STOP_BUDGET_S - (time.monotonic() - began))
            try:
                return await self.call(service, kind, timeout=left)
            except Unavailable as exc:  # unreachable or too slow (DeadlineExceeded)
                log.warning("stop_unconfirmed", service=service, reason=exc.message)
                return {"status": "OK", "detail": f"{service} has not confirmed yet: {exc.message}"}

        return await self.for_stop(stop_it)

    def close(self) -> None:
        self._claims.shutdown(wait=False, cancel_futures=True)
        self._stops.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._bus is not None:
            self._bus.close()
            self._bus = None
