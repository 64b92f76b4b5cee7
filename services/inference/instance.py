"""One engine instance under supervision: launch, wait until it serves, watch it, restart it.

The instance's first launch decides the ``up``: if the engine exits or never answers ``/health`` 200
within its start timeout, the start fails with the engine's last log lines. Once it has served, a
crash (the process exits) or a hang (see :mod:`services.inference.liveness`) is logged, reported in
``status`` and answered by a restart on the same port, at most ``max_restarts`` times in a row; after
that the instance is reported failed. Serving without trouble for ``STABLE_S`` forgives past restarts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.backoff import backoff_delay
from node.errors import Unavailable
from node.logging import get_logger
from services.inference.engine_plan import EngineKind, InstancePlan
from services.inference.launcher import EngineProcess, LaunchSpec, describe_exit
from services.inference.liveness import Liveness, Timing
from services.inference.probe import Prober

log = get_logger(__name__)

STABLE_S = 600.0
HUNG_GRACE_S = 2.0
MAX_TAIL_CHARS = 3000


def join_tail(lines: list[str]) -> str:
    """Log lines as one line (the error message travels as one line to the client)."""
    text = " | ".join(lines)
    return text if len(text) <= MAX_TAIL_CHARS else "..." + text[-MAX_TAIL_CHARS:]


class Instance:
    def __init__(self, plan: InstancePlan, kind: EngineKind, *, log_path: Path, marker: str, timing: Timing,
                 prober: Prober, max_restarts: int, on_change: Callable[[], None]) -> None:
        self.plan = plan
        self.kind = kind
        # An empty private working directory: nothing relative to the node is within the engine's reach.
        self.spec = LaunchSpec(plan.argv, plan.env, log_path, cwd=log_path.parent / "engine-cwd")
        self.marker = marker
        self.timing = timing
        self.prober = prober
        self.max_restarts = max_restarts
        self.on_change = on_change
        self.state = "starting"
        self.restarts = 0
        self.error = ""
        self.last_exit: dict[str, Any] | None = None
        self.process: EngineProcess | None = None
        self.liveness: Liveness | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.plan.url

    def healthy(self, now: float | None = None) -> bool:
        if self.state != "serving" or self.liveness is None:
            return False
        if self.process is None or self.process.returncode is not None:
            return False
        return self.liveness.healthy(time.monotonic() if now is None else now)

    def status(self) -> dict[str, Any]:
        proc = self.process
        return {
            "index": self.plan.index,
            "url": self.url,
            "port": self.plan.port,
            "gpus": list(self.plan.gpus),
            "pid": proc.pid if proc is not None and proc.returncode is None else None,
            "state": self.state,
            "healthy": self.healthy(),
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "error": self.error or None,
            "log": str(self.spec.log_path),
        }

    def engine_metrics(self) -> dict[str, Any]:
        """The instance's last scraped engine counters, for the node's ``/metrics``."""
        counters = self.liveness.last_metrics if self.liveness is not None else {}
        return {"index": self.plan.index, "metrics": dict(counters)}

    def metrics_text(self) -> tuple[str, float]:
        """The engine's last ``/metrics`` text and when it was read; empty while it does not serve."""
        if self.liveness is None or not self.healthy():
            return "", 0.0
        return self.liveness.last_text, self.liveness.last_text_at

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._supervise(), name=f"engine-{self.plan.index}")

    async def stop(self) -> None:
        """Stop supervising and stop the engine (its whole process group)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:
                log.exception("engine_supervisor_failed", index=self.plan.index)
        if self.process is not None:
            await self.process.stop(self.kind.stop_grace_s)
        if not self.ready.done():
            self.ready.cancel()
        self.state = "stopped"
        self.on_change()

    # -- supervision ----------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug here must show up as a failed instance, not vanish
            log.exception("engine_supervisor_failed", index=self.plan.index)
            self.error = f"engine {self.plan.index} supervisor failed: {type(exc).__name__}: {exc}"
            self._set_state("failed")
            if not self.ready.done():
                self.ready.set_exception(Unavailable(self.error))

    async def _run(self) -> None:
        first = True
        while True:
            outcome = await self._launch()
            if outcome is None:
                if first:
                    self.ready.set_result(None)
                    first = False
                served_from = time.monotonic()
                self._set_state("serving")
                reason, hung = await self._watch()
                if time.monotonic() - served_from >= STABLE_S:
                    self.restarts = 0
            else:
                reason, hung = outcome, False
            if self.process is not None:
                # A hung engine will not shut down gracefully: do not wait long for it.
                grace = min(self.kind.stop_grace_s, HUNG_GRACE_S) if hung else self.kind.stop_grace_s
                code = await self.process.stop(grace)
                if self.last_exit is not None and self.last_exit["code"] is None:
                    self.last_exit["code"] = code
            if first:
                self.error = reason
                self._set_state("failed")
                self.ready.set_exception(Unavailable(reason))
                return
            if self.restarts >= self.max_restarts:
                self.error = f"{reason}; gave up after {self.restarts} restarts"
                log.error("engine_failed", index=self.plan.index, reason=self.error)
                self._set_state("failed")
                return
            self.restarts += 1
            self._set_state("restarting")
            log.warning("engine_restarting", index=self.plan.index, attempt=self.restarts,
                        of=self.max_restarts, reason=reason)
            await asyncio.sleep(backoff_delay(self.restarts, 1.0, 30.0))

    async def _launch(self) -> str | None:
        """Spawn and wait for ``/health`` 200: None when serving, else why not (with the log tail)."""
        name = f"engine {self.plan.index} (port {self.plan.port})"
        self.liveness = None
        try:
            self.process = await EngineProcess.spawn(self.spec, self.marker)
        except OSError as exc:
            return f"{name} could not be launched: {exc}"
        self.on_change()
        proc = self.process
        exited = asyncio.ensure_future(proc.wait())
        deadline = time.monotonic() + self.kind.start_timeout_s
        interval = 0.2
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=interval)
                if done:
                    code = proc.returncode
                    self.last_exit = {"code": code, "reason": "exited during start", "at": time.time()}
                    tail = join_tail(proc.tail())
                    return f"{name} {describe_exit(code)} before serving; last log lines: {tail}"
                if await self.prober.health(self.url):
                    self.liveness = Liveness(self.timing, time.monotonic())
                    log.info("engine_serving", index=self.plan.index, port=self.plan.port, pid=proc.pid,
                             start_s=round(time.monotonic() - proc.started, 3))
                    return None
                if time.monotonic() >= deadline:
                    tail = join_tail(proc.tail())
                    return (f"{name} did not answer /health within {self.kind.start_timeout_s:g} s; "
                            f"last log lines: {tail}")
                interval = min(interval * 1.5, 2.0)
        finally:
            exited.cancel()

    async def _watch(self) -> tuple[str, bool]:
        """Poll until the engine crashes or hangs; returns what happened, in words, and whether it hung."""
        proc = self.process
        assert proc is not None and self.liveness is not None
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=self.timing.poll_s)
                if done:
                    code = proc.returncode
                    tail = proc.tail(8)
                    self.last_exit = {"code": code, "reason": "crashed", "at": time.time()}
                    log.error("engine_crashed", index=self.plan.index, pid=proc.pid, exit=describe_exit(code),
                              tail=tail)
                    self.on_change()
                    return f"engine {self.plan.index} {describe_exit(code)}: {join_tail(tail)}", False
                obs = await self.prober.observe(self.url)
                now = time.monotonic()
                self.liveness.observe(obs, now)
                if proc.returncode is None and self.liveness.hung(now):
                    reason = self.liveness.reason
                    self.last_exit = {"code": None, "reason": f"hung: {reason}", "at": time.time()}
                    log.error("engine_hung", index=self.plan.index, pid=proc.pid, reason=reason)
                    self.liveness = None
                    self.on_change()
                    return f"engine {self.plan.index} hung ({reason})", True
                self.on_change()
        finally:
            exited.cancel()

    def _set_state(self, state: str) -> None:
        self.state = state
        self.on_change()
