"""PoC v2 over every engine of the node: the five routes of pow-v2.md §2 as pow's bus requests.

The engines' set and the served model come from the inference service over the bus at each request
("healthy backends, sorted by port"); each engine port has one :class:`EngineWorker`. Loops and
accepted callback jobs are journalled, so a restarted pow resumes them — unless the node has left
INFERENCE meanwhile.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from contracts.checked import convert
from contracts.pow_v2 import NO_BACKENDS as NO_ENGINES
from contracts.pow_v2 import Generate, InitGenerate, JobQuery, aggregate, check_scheme
from node.errors import Conflict, InvalidRequest, MLNodeError, NotFound, Unavailable, UpstreamFailed
from node.logging import get_logger
from services.pow.outbox import Outbox
from services.pow.v2.engine import EngineClient
from services.pow.v2.journal import V2Journal
from services.pow.v2.worker import COMPLETED, GENERATING, MAX_QUEUED_JOBS, EngineWorker, Loop

log = get_logger(__name__)

NO_BACKENDS = "No vLLM backends available"
STATUS_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Engines:
    """The inference service's view: healthy ports (sorted), every instance port, the served names."""

    healthy: list[int]
    known: frozenset[int]
    served: tuple[str, ...]
    reachable: bool = True


def _port(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None


class PocRounds:
    def __init__(self, outbox: Outbox, directory: Path, inference: Any,
                 client: EngineClient | None = None, *, max_queued_jobs: int = MAX_QUEUED_JOBS) -> None:
        self.outbox = outbox
        self.max_queued_jobs = max_queued_jobs
        self.journal = V2Journal(directory)
        self.inference = inference
        self.client = client or EngineClient()
        self.workers: dict[int, EngineWorker] = {}
        self._next_backend = 0
        self._lock = asyncio.Lock()

    # -- engines ----------------------------------------------------------------------------------
    async def engines(self) -> Engines:
        try:
            status = await self.inference.request("status", timeout=STATUS_TIMEOUT_S)
        except MLNodeError as exc:
            log.warning("pocv2_inference_unreachable", error=exc.message)
            return Engines([], frozenset(), (), reachable=False)
        if not isinstance(status, dict):
            return Engines([], frozenset(), ())
        healthy = sorted({p for p in (_port(u) for u in status.get("backends") or [] if isinstance(u, str))
                          if p is not None})
        known = frozenset(i["port"] for i in status.get("instances") or []
                          if isinstance(i, dict) and isinstance(i.get("port"), int))
        served = status.get("served_models") or ([status["model"]] if status.get("model") else [])
        return Engines(healthy, known, tuple(str(s) for s in served))

    async def _alive(self, port: int, model: str) -> bool:
        """Is the engine on ``port`` still ours (perhaps restarting) and serving ``model``? An
        unreachable inference service (restarting) counts as yes; a replaced model as no."""
        engines = await self.engines()
        if not engines.reachable:
            return True
        return port in engines.known and (not engines.served or model in engines.served)

    def worker(self, port: int) -> EngineWorker:
        if port not in self.workers:
            self.workers[port] = EngineWorker(port, self.client, self.outbox, self.journal, self._alive,
                                              max_jobs=self.max_queued_jobs)
        return self.workers[port]

    async def _serving(self, model: str) -> list[int]:
        engines = await self.engines()
        if not engines.healthy:
            raise Unavailable(NO_BACKENDS)
        if model not in engines.served:
            serving = ", ".join(engines.served) or "none"
            raise Conflict(f"model {model!r} is not served here (serving: {serving})")
        return engines.healthy

    # -- the routes -------------------------------------------------------------------------------
    async def init_generate(self, init: InitGenerate) -> dict[str, Any]:
        check_scheme(init.params)
        async with self._lock:  # two racing inits must not both pass "not generating yet"
            ports = await self._serving(init.params.model)
            results: list[dict[str, Any]] = []
            errors: list[dict[str, Any]] = []
            for group_id, port in enumerate(ports):
                try:
                    await self.worker(port).start_loop(Loop(init, group_id, len(ports)))
                    results.append({"port": port, "status": "OK"})
                except MLNodeError as exc:
                    errors.append({"port": port, "error": exc.message})
        log.info("pocv2_init_generate", block_height=init.block_height, node_id=init.node_id,
                 node_count=init.node_count, ports=ports, accepted=len(results))
        if not results:
            raise UpstreamFailed("every backend failed", detail={"errors": errors})
        return {"status": "OK", "backends": len(results), "n_groups": len(ports), "results": results,
                "errors": errors or None}

    async def generate(self, body: Generate) -> dict[str, Any]:
        """Queue (or, with ``wait``, run) one job; the contract has checked the nonce sets and base64."""
        check_scheme(body.params)
        ports = await self._serving(body.params.model)
        port = ports[self._next_backend % len(ports)]
        self._next_backend += 1
        job = self.worker(port).submit(body)
        if not body.wait:
            return {"status": "queued", "request_id": f"{port}:{job.id}", "queued_count": len(body.nonces)}
        await job.done.wait()
        if job.state == COMPLETED and job.result is not None:
            return {"status": "completed", "request_id": job.id, **job.result}
        raise job.error or Unavailable(f"job {job.id} ended {job.state}")

    async def job_status(self, query: JobQuery) -> dict[str, Any]:
        composite = query.request_id
        if ":" not in composite:
            raise InvalidRequest("request_id must be 'port:uuid'")
        port_text, job_id = composite.split(":", 1)
        if not port_text.isdigit():
            raise InvalidRequest("request_id must be 'port:uuid' with an integer port")
        worker = self.workers.get(int(port_text))
        job = worker.job(job_id) if worker is not None else None
        if job is None:
            raise NotFound(f"unknown or expired request_id {composite!r}")
        return {"request_id": composite, **job.view()}

    async def status(self) -> dict[str, Any]:
        engines = await self.engines()
        if not engines.healthy:
            return {"status": NO_ENGINES, "backends": []}
        backends = [{"port": port, **self.worker(port).status()} for port in engines.healthy]
        return {"status": aggregate([b["status"] for b in backends]), "backends": backends}

    async def stop(self) -> dict[str, Any]:
        engines = await self.engines()
        await self.stop_all()
        if not engines.healthy:
            return {"status": "OK", "message": "No backends to stop"}
        return {"status": "OK", "results": [{"port": p, "status": "stopped"} for p in engines.healthy],
                "errors": None}

    # -- lifecycle and reports --------------------------------------------------------------------
    async def stop_all(self) -> None:
        async with self._lock:
            await asyncio.gather(*(w.stop() for w in self.workers.values()))
            await asyncio.to_thread(self.journal.clear)

    async def resume(self, in_inference: bool) -> None:
        """After a restart: continue journalled loops and jobs, or forget them if the node moved on."""
        if not in_inference:
            await asyncio.to_thread(self.journal.clear)
            return
        for port, doc in (await asyncio.to_thread(self.journal.loop_docs)).items():
            try:
                init = convert(doc.get("init"), InitGenerate)
                loop = Loop(init, int(doc["group_id"]), int(doc["n_groups"]),
                            next_x=int(doc.get("next_x", 0)))
                await self.worker(port).start_loop(loop)
                log.info("pocv2_loop_resumed", port=port, next_x=loop.next_x)
            except (MLNodeError, KeyError, TypeError, ValueError) as exc:
                log.error("pocv2_loop_unrecoverable", port=port, error=str(exc))
                self.journal.clear_loop(port)
        for job_id, doc in await asyncio.to_thread(self.journal.job_docs):
            recorded = doc.get("port")
            try:
                body = convert(doc.get("body"), Generate)
                if not isinstance(recorded, int):
                    raise InvalidRequest("no port recorded")
                accepted = doc.get("accepted")
                self.worker(recorded).submit(body, job_id, accepted if isinstance(accepted, float) else None)
                log.info("pocv2_job_resumed", port=recorded, request_id=job_id)
            except MLNodeError as exc:
                log.error("pocv2_job_unrecoverable", request_id=job_id, error=exc.message)
                self.journal.drop_job(job_id)

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers.values()))
        await self.client.close()

    def summary(self) -> dict[str, str]:
        """Per engine port, IDLE or GENERATING: what the gateway aggregates for /api/v1/state."""
        return {str(port): w.status()["status"] for port, w in sorted(self.workers.items())}

    def metrics(self) -> dict[str, Any]:
        engines = {}
        for port, w in sorted(self.workers.items()):
            status = w.status()
            stats = status["stats"] or {}
            c = w.counters
            engines[str(port)] = {
                "generating": int(status["status"] == GENERATING),
                "nonces_per_second": stats.get("nonces_per_second", 0.0),
                "nonces_generated_total": c.nonces_generated, "nonces_dropped_total": c.nonces_dropped,
                "jobs_completed_total": c.jobs_completed, "jobs_failed_total": c.jobs_failed,
                "validations_total": c.validations, "fraud_detected_total": c.frauds,
                "jobs_queued": status["jobs"]["queued"], "queued_nonces": status["jobs"]["queued_nonces"],
            }
        return {"engines": engines}
