"""One engine instance's PoC v2 work: its generation loop and its queue of ``/generate`` jobs.

A single task per engine drives both, in the reference's order: while the loop is on, it takes the
next ``batch_size`` nonces of its dense sequence; queued jobs run once it is off (§2.3). The loop asks
for batch k+1 before it writes batch k down, so the engine never idles while pow does bookkeeping.
Results go to the durable outbox before progress is recorded, so a crash can only repeat a batch (the
receiver de-duplicates), never lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts.pow_v2 import Generate, InitGenerate, PocStatus
from node.backoff import backoff_delay
from node.errors import Conflict, MLNodeError, Overloaded, Unavailable
from node.logging import get_logger
from services.pow.nonces import NonceSequence
from services.pow.outbox import Kind, Outbox
from services.pow.v2.engine import Computed, EngineClient, EngineRefused, Seed
from services.pow.v2.journal import V2Journal
from services.pow.v2.verdict import StatParams, judge

log = get_logger(__name__)

GENERATING, IDLE = PocStatus.GENERATING, PocStatus.IDLE
QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
#: §2.3: more queued nonces than this on one engine is a 429.
MAX_QUEUED_NONCES = 100_000
#: More queued jobs than this on one engine is a 429 too (``MLNODE_POCV2_MAX_QUEUED_JOBS``).
MAX_QUEUED_JOBS = 10_000
#: §2.4: finished jobs stay readable this long.
KEEP_RESULTS_S = 300.0
#: Transient engine failures a job with a callback survives (the engine restarting) before it fails.
JOB_RETRIES = 5
BACKOFF_CAP_S = 10.0


def encoding(k_dim: int) -> dict[str, Any]:
    return {"dtype": "f16", "k_dim": k_dim, "endian": "le"}


def seed_of(body: InitGenerate | Generate) -> Seed:
    p = body.params
    return Seed(body.block_hash, body.public_key, p.seq_len, p.k_dim, body.poc_stronger_rng)


@dataclass
class Loop:
    """A running generation loop: the init body, this engine's group, and its progress."""

    init: InitGenerate
    group_id: int
    n_groups: int
    next_x: int = 0
    processed: int = 0
    started: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def sequence(self) -> NonceSequence:
        return NonceSequence(self.init.node_id, self.init.node_count, self.group_id, self.n_groups)

    def config(self) -> dict[str, Any]:
        i = self.init
        return {"block_hash": i.block_hash, "block_height": i.block_height, "public_key": i.public_key,
                "node_id": i.node_id, "node_count": i.node_count, "group_id": self.group_id,
                "n_groups": self.n_groups, "seq_len": i.params.seq_len, "k_dim": i.params.k_dim}

    def stats(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        rate = self.processed / elapsed if elapsed > 0 else 0.0
        return {"total_processed": self.processed, "nonces_per_second": round(rate, 3)}

    def to_journal(self) -> dict[str, Any]:
        return {"init": msgspec.to_builtins(self.init), "group_id": self.group_id, "n_groups": self.n_groups,
                "next_x": self.next_x}


@dataclass
class Job:
    """One accepted ``/generate`` request on this engine."""

    id: str
    body: Generate
    state: str = QUEUED
    result: dict[str, Any] | None = None
    error: MLNodeError | None = None
    finished: float | None = None
    accepted: float = field(default_factory=time.time)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def durable(self) -> bool:
        """Kept across a pow crash: someone is owed a callback, and nobody is waiting on a socket."""
        return bool(self.body.url) and not self.body.wait

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.state}
        if self.state == COMPLETED and self.result is not None:
            out.update(self.result)
        elif self.state == FAILED and self.error is not None:
            out["error"] = self.error.message
        return out

    def to_journal(self) -> dict[str, Any]:
        return {"body": msgspec.to_builtins(self.body), "accepted": self.accepted}


@dataclass
class Counters:
    """Totals since the pow process started, for /metrics."""

    nonces_generated: int = 0
    nonces_dropped: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    validations: int = 0
    frauds: int = 0


class EngineWorker:
    def __init__(self, port: int, client: EngineClient, outbox: Outbox, journal: V2Journal,
                 alive: Callable[[int, str], Awaitable[bool]], *, max_jobs: int = MAX_QUEUED_JOBS) -> None:
        self.port = port
        self.max_jobs = max_jobs
        self.client = client
        self.outbox = outbox
        self.journal = journal
        self.alive = alive
        self.loop: Loop | None = None
        self.last_error: str | None = None
        self.queue: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}
        self.counters = Counters()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The next batch's engine call, already under way: (its first sequence index, the call).
        self._ahead: tuple[int, asyncio.Future[Computed]] | None = None
        self._log = log.bind(port=port)

    # -- commands -------------------------------------------------------------------------------
    async def start_loop(self, loop: Loop) -> None:
        if self.loop is not None:
            raise Conflict("Already generating")
        await asyncio.to_thread(self.journal.save_loop, self.port, loop.to_journal())
        self.loop, self.last_error = loop, None
        self._log.info("pocv2_loop_started", block_height=loop.init.block_height, group_id=loop.group_id,
                       n_groups=loop.n_groups, next_x=loop.next_x)
        self._kick()

    def submit(self, body: Generate, job_id: str | None = None, accepted: float | None = None) -> Job:
        if job_id is None and len(self.queue) >= self.max_jobs:
            raise Overloaded(f"Queue full: {len(self.queue)} jobs queued on engine {self.port} "
                             f"(MLNODE_POCV2_MAX_QUEUED_JOBS {self.max_jobs})")
        queued = sum(len(j.body.nonces) for j in self.queue)
        if queued + len(body.nonces) > MAX_QUEUED_NONCES:
            raise Overloaded(f"Queue full: {queued} nonces queued on engine {self.port}, "
                            f"{len(body.nonces)} more would exceed {MAX_QUEUED_NONCES}")
        job = Job(job_id or str(uuid.uuid4()), body)
        if accepted is not None:
            job.accepted = accepted
        if job.durable:
            self.journal.save_job(job.id, {**job.to_journal(), "port": self.port})
        self.purge()
        self.jobs[job.id] = job
        self.queue.append(job)
        self._log.info("pocv2_job_queued", request_id=job.id, nonces=len(body.nonces),
                       validation=not isinstance(body.validation, msgspec.UnsetType), wait=body.wait)
        self._kick()
        return job

    async def stop(self) -> None:
        """End the loop and drop queued and running jobs; what is already in the outbox is still sent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # the drive task never ends by itself; be loud if it did
                self._log.exception("pocv2_worker_crashed")
        self._drop_ahead()
        if self.loop is not None:
            self._log.info("pocv2_loop_stopped", processed=self.loop.processed, next_x=self.loop.next_x)
        self.loop = None
        await asyncio.to_thread(self.journal.clear_loop, self.port)
        for job in list(self.queue) + [j for j in self.jobs.values() if j.state == RUNNING]:
            self._finish(job, CANCELLED, error=Unavailable("cancelled by a stop request"))
        self.queue.clear()

    async def close(self) -> None:
        """Process shutdown: stop computing but keep the journal, so the next pow resumes."""
        task, self._task = self._task, None
        self._drop_ahead()
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):  # shutting down: nothing more to do with it
                await task

    # -- queries --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        running = sum(1 for j in self.jobs.values() if j.state == RUNNING)
        jobs = {"queued": len(self.queue), "running": running,
                "queued_nonces": sum(len(j.body.nonces) for j in self.queue)}
        loop = self.loop
        out: dict[str, Any] = {"status": IDLE if loop is None else GENERATING,
                               "config": None if loop is None else loop.config(),
                               "stats": None if loop is None else loop.stats(), "jobs": jobs}
        error = self.loop.error if self.loop is not None else self.last_error
        if error:
            out["error"] = error
        return out

    def job(self, job_id: str) -> Job | None:
        self.purge()
        return self.jobs.get(job_id)

    def purge(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self.jobs.items()):
            if job.finished is not None and now - job.finished > KEEP_RESULTS_S:
                del self.jobs[job_id]

    # -- the drive task -------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drive(), name=f"pocv2-{self.port}")
        self._wake.set()

    async def _drive(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            if self.loop is not None:
                ok = await self._generate_once(self.loop, failures)
                failures = 0 if ok else failures + 1
                continue
            if self.queue:
                await self._run_job(self.queue.popleft())
                continue
            await self._wake.wait()

    def _call(self, loop: Loop, start: int) -> asyncio.Future[Computed]:
        nonces = loop.sequence.batch(start, loop.init.batch_size)
        return asyncio.ensure_future(self.client.artifacts(self.port, seed_of(loop.init), nonces))

    def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].cancel()
            ahead[1].add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning

    async def _generate_once(self, loop: Loop, failures: int) -> bool:
        init = loop.init
        start = loop.next_x
        nonces = loop.sequence.batch(start, init.batch_size)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] != start:
            self._ahead = ahead
            self._drop_ahead()
            ahead = None
        call = ahead[1] if ahead is not None else self._call(loop, start)
        try:
            computed = await call
        except EngineRefused as exc:
            await self._end_loop(loop, exc.message)
            return False
        except MLNodeError as exc:
            loop.error = exc.message
            self._log.warning("pocv2_engine_call_failed", error=exc.message, attempt=failures + 1)
            if not await self.alive(self.port, init.params.model):
                gone = f"engine {self.port} is gone or serves another model"
                await self._end_loop(loop, f"{gone}: {exc.message}")
                return False
            await asyncio.sleep(backoff_delay(failures + 1, 0.5, BACKOFF_CAP_S))
            return False
        self._ahead = (start + len(nonces), self._call(loop, start + len(nonces)))
        artifacts = [{"nonce": n, "vector_b64": computed.vectors[n]} for n in nonces if n in computed.vectors]
        if init.url and artifacts:
            payload = {"public_key": init.public_key, "block_hash": init.block_hash,
                       "block_height": init.block_height, "node_id": init.node_id, "artifacts": artifacts,
                       "encoding": encoding(init.params.k_dim)}
            try:
                await asyncio.to_thread(self.outbox.put, "generated", init.url, payload)
            except MLNodeError as exc:  # the disk: keep the batch's place in the sequence and retry
                loop.error = exc.message
                self._log.error("pocv2_outbox_refused", error=exc.message)
                self._drop_ahead()
                await asyncio.sleep(backoff_delay(failures + 1, 0.5, BACKOFF_CAP_S))
                return False
        loop.next_x += len(nonces)
        loop.processed += len(nonces)
        loop.error = None
        self.counters.nonces_generated += len(artifacts)
        self.counters.nonces_dropped += len(nonces) - len(artifacts)
        if len(artifacts) < len(nonces):
            self._log.warning("pocv2_nonces_dropped", nonces=[n for n in nonces if n not in computed.vectors])
        try:
            await asyncio.to_thread(self.journal.save_loop, self.port, loop.to_journal())
        except MLNodeError as exc:  # progress not saved: a restart repeats a little work, nothing worse
            self._log.warning("pocv2_progress_not_saved", error=exc.message)
        return True

    async def _end_loop(self, loop: Loop, reason: str) -> None:
        self._log.error("pocv2_loop_ended", reason=reason, processed=loop.processed)
        self._drop_ahead()
        if self.loop is loop:
            self.loop, self.last_error = None, reason
            await asyncio.to_thread(self.journal.clear_loop, self.port)

    async def _run_job(self, job: Job) -> None:
        job.state = RUNNING
        body = job.body
        jlog = self._log.bind(request_id=job.id)
        try:
            vectors = await self._compute(job)
            result, kind, payload = self._result(job, vectors)
            if body.url:
                await asyncio.to_thread(self.outbox.put, kind, body.url, payload)
        except MLNodeError as exc:
            jlog.error("pocv2_job_failed", error=exc.message)
            self.counters.jobs_failed += 1
            self._finish(job, FAILED, error=exc)
            return
        self.counters.jobs_completed += 1
        if "fraud_detected" in result:
            self.counters.validations += 1
            self.counters.frauds += int(bool(result["fraud_detected"]))
            jlog.info("pocv2_validated", n_total=result["n_total"], n_mismatch=result["n_mismatch"],
                      p_value=result["p_value"], fraud_detected=result["fraud_detected"])
        else:
            jlog.info("pocv2_job_completed", artifacts=len(result["artifacts"]))
        self._finish(job, COMPLETED, result=result)

    async def _compute(self, job: Job) -> dict[int, str]:
        body = job.body
        wanted = list(dict.fromkeys(body.nonces))
        vectors: dict[int, str] = {}
        seed = seed_of(body)
        for start in range(0, len(wanted), body.batch_size):
            chunk = wanted[start:start + body.batch_size]
            failures = 0
            while True:
                try:
                    computed = await self.client.artifacts(self.port, seed, chunk)
                    break
                except EngineRefused:
                    raise
                except MLNodeError as exc:
                    failures += 1
                    if not job.durable or failures > JOB_RETRIES \
                            or not await self.alive(self.port, body.params.model):
                        raise Unavailable(exc.message) from None
                    self._log.warning("pocv2_job_retry", request_id=job.id, error=exc.message,
                                      attempt=failures)
                    await asyncio.sleep(backoff_delay(failures + 1, 0.5, BACKOFF_CAP_S))
            vectors.update(computed.vectors)
        return vectors

    def _result(self, job: Job, vectors: dict[int, str]) -> tuple[dict[str, Any], Kind, dict[str, Any]]:
        body = job.body
        head = {"request_id": job.id, "block_hash": body.block_hash, "block_height": body.block_height,
                "public_key": body.public_key, "node_id": body.node_id}
        if isinstance(body.validation, msgspec.UnsetType):
            artifacts = [{"nonce": n, "vector_b64": vectors[n]} for n in body.nonces if n in vectors]
            result = {"artifacts": artifacts, "encoding": encoding(body.params.k_dim)}
            return result, "generated", {**head, **result}
        received = {a.nonce: a.vector_b64 for a in body.validation.artifacts}
        verdict = judge(body.nonces, received, vectors, body.params.k_dim, StatParams.of(body.stat_test))
        result = verdict.to_wire()
        return result, "validated", {**head, **result}

    def _finish(self, job: Job, state: str, *, result: dict[str, Any] | None = None,
                error: MLNodeError | None = None) -> None:
        job.state, job.result, job.error, job.finished = state, result, error, time.monotonic()
        if job.durable:
            self.journal.drop_job(job.id)
        job.done.set()
