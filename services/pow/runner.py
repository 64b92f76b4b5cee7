"""A loaded PoC round: the compute groups, their generate loops and the validation queue.

One worker thread per compute group (a GPU, a block of GPUs, or the CPU). A worker validates queued
batches first (validators wait on them), otherwise generates while the phase is GENERATING. Each
generated batch's valid nonces go to the outbox *before* the group's progress is journaled, so a crash
can only repeat work (the receiver sees the same nonce with the same distance), never skip it.

Stopping is immediate: :meth:`Runner.cancel` sets the stop signal (the model build and the batch in
progress unwind at their next layer) and waits only for a result being committed at that moment.
Every commit (outbox, journal) happens under one lock after re-checking the signal, so once ``cancel``
returns the round writes nothing more: what was committed before is delivered, nothing after exists.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from contracts.pow import PowState
from node.backoff import backoff_delay
from node.errors import InvalidRequest, Overloaded, Unavailable
from node.logging import get_logger
from services.pow.cancel import Cancelled
from services.pow.compute import ComputeGroup, discover_groups
from services.pow.journal import Journal
from services.pow.nonces import NonceSequence, nonce_sequence
from services.pow.outbox import Outbox
from services.pow.round import ProofBatch, RoundSpec, batch_for
from services.pow.validation import validated_batch

log = get_logger(__name__)

IDLE, GENERATING, VALIDATING = PowState.IDLE, PowState.GENERATING, PowState.VALIDATING
PHASES = (IDLE, GENERATING, VALIDATING)
#: How long :meth:`Runner.cancel` waits for a commit in progress (an fsync, normally milliseconds).
COMMIT_WAIT_S = 1.0
#: How long a new round waits for the previous round's threads to let go of the device.
RETIRE_WAIT_S = 120.0


@dataclass
class Counters:
    started_at: float = field(default_factory=time.time)
    nonces_computed: int = 0
    valid_found: int = 0
    batches_validated: int = 0
    nonces_validated: int = 0
    fraud_detected: int = 0
    window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, computed: int, valid: int) -> None:
        self.nonces_computed += computed
        self.valid_found += valid
        self.window.append((time.monotonic(), self.nonces_computed))

    def rate(self) -> float:
        if len(self.window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class Runner:
    """Everything one round needs; :meth:`stop` leaves nothing running."""

    def __init__(
        self,
        spec: RoundSpec,
        phase: str,
        outbox: Outbox,
        journal: Journal,
        device: str,
        *,
        progress: dict[str, int] | None = None,
        on_change: Callable[[], None] = lambda: None,
        after: Runner | None = None,
    ) -> None:
        self.spec = spec
        self.outbox = outbox
        self.journal = journal
        self.device = device
        self.on_change = on_change
        self.counters = Counters()
        self.groups: list[ComputeGroup] = []
        self.error = ""  # fatal: the round cannot go on
        self.storage_error = ""  # transient: results are held until the disk accepts them
        self._phase = phase
        self._progress: dict[str, int] = dict(progress or {})
        self._stop = threading.Event()
        self._commit = threading.Lock()  # held while a result is written; see the module docstring
        self._after = after  # a stopped round whose threads may still be unwinding
        self._interrupt = threading.Event()
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, ProofBatch]] = deque()
        self._loaded = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loader = threading.Thread(target=self._load, name="pow-loader", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        for name, doc in self.journal.pending():
            try:
                self._queue.append((name, batch_for(doc, self.spec)))
            except Exception:
                log.error("journal_batch_unusable", name=name)
                self.journal.done(name)
        self._save()
        self._loader.start()

    def _load(self) -> None:
        after, self._after = self._after, None
        if after is not None:  # never two models on one device: wait until the old round let go
            after.join(RETIRE_WAIT_S)
        t0 = time.perf_counter()
        try:
            groups = discover_groups(self.spec.block_hash, self.spec.params, self.device, cancel=self._stop)
        except Cancelled:
            log.info("pow_model_build_cancelled", block_height=self.spec.block_height)
            return
        except Exception as exc:
            self.error = f"model build failed: {type(exc).__name__}: {exc}"[:500]
            log.exception("pow_model_build_failed")
            self.on_change()
            return
        if self._stop.is_set():
            return
        self.groups = groups
        log.info("pow_model_built", seconds=round(time.perf_counter() - t0, 2), groups=len(groups),
                 block_height=self.spec.block_height)
        self._loaded.set()
        for gid, group in enumerate(groups):
            thread = threading.Thread(target=self._work, args=(gid, group), name=f"pow-group-{gid}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        self.on_change()

    def cancel(self) -> None:
        """Stop the round without waiting for its compute: after this returns it commits nothing."""
        self._stop.set()
        self._interrupt.set()
        with self._cond:
            self._cond.notify_all()
        if self._commit.acquire(timeout=COMMIT_WAIT_S):
            self._commit.release()
        else:
            log.warning("pow_commit_still_running", block_height=self.spec.block_height)

    def join(self, timeout: float) -> None:
        """Wait (bounded) until the round's threads have ended and its model is released."""
        deadline = time.monotonic() + timeout
        for thread in [self._loader, *self._threads]:
            if thread.is_alive() and thread is not threading.current_thread() and thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self.groups = []

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel and wait for the threads (process shutdown)."""
        self.cancel()
        self.join(timeout)

    # -- state --------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    @property
    def phase(self) -> str:
        return self._phase

    def status(self) -> str:
        if self.error:
            return PowState.STOPPED
        if not self.loaded:
            return PowState.LOADING
        with self._cond:
            busy_validating = bool(self._queue)
        if self._phase == GENERATING and busy_validating:
            return PowState.MIXED
        return self._phase

    def set_phase(self, phase: str) -> None:
        with self._cond:
            self._phase = phase
            self._interrupt.set()
            self._cond.notify_all()
        with self._commit:
            if not self._stop.is_set():
                self._save()

    def submit(self, batch: ProofBatch, *, max_batches: int | None = None,
               max_nonces: int | None = None) -> None:
        """Queue ``batch`` for validation (journaled first); Overloaded (429) when the queue already holds
        ``max_batches`` batches or would hold more than ``max_nonces`` nonces."""
        with self._commit:
            if self._stop.is_set():
                raise InvalidRequest("PoW is not running")
            with self._cond:
                queued = len(self._queue)
                nonces = sum(len(b.nonces) for _name, b in self._queue)
            if (max_batches is not None and queued >= max_batches) or (
                    max_nonces is not None and nonces + len(batch.nonces) > max_nonces):
                raise Overloaded(f"validation queue full: {queued} batches with {nonces} nonces wait "
                                 f"(MLNODE_POW_MAX_QUEUED_BATCHES {max_batches}, "
                                 f"MLNODE_POW_MAX_QUEUED_NONCES {max_nonces})")
            name = self.journal.enqueue(msgspec.to_builtins(batch))  # durable before the client hears 200
        with self._cond:
            self._queue.append((name, batch))
            self._interrupt.set()
            self._cond.notify_all()

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _save(self) -> None:
        self.journal.save_round({"init": self.spec.raw, "phase": self._phase, "progress": self._progress,
                                 "n_groups": len(self.groups) or None})

    # -- the worker ---------------------------------------------------------------------------
    def _work(self, gid: int, group: ComputeGroup) -> None:
        try:
            while not self._stop.is_set():
                job = self._next_job()
                if job is not None:
                    self._validate(group, *job)
                elif self._phase == GENERATING:
                    self._generate(gid, group)
                else:
                    with self._cond:
                        if not self._queue and self._phase != GENERATING and not self._stop.is_set():
                            self._cond.wait(1.0)
        except Cancelled:
            log.info("pow_group_cancelled", group=gid, block_height=self.spec.block_height)
        except Exception as exc:
            self.error = f"compute group {gid} failed: {type(exc).__name__}: {exc}"[:500]
            log.exception("pow_group_failed", group=gid)
            self.on_change()

    def _next_job(self) -> tuple[str, ProofBatch] | None:
        with self._cond:
            job = self._queue.popleft() if self._queue else None
            if not self._queue:
                self._interrupt.clear()
            return job

    def _validate(self, group: ComputeGroup, name: str, batch: ProofBatch) -> None:
        recomputed = (group.distances(batch.public_key, batch.nonces, cancel=self._stop) if batch.nonces
                      else np.zeros(0))
        result = validated_batch(
            public_key=batch.public_key, block_hash=batch.block_hash, block_height=batch.block_height,
            nonces=batch.nonces, received_dist=batch.dist, recomputed_dist=[float(d) for d in recomputed],
            node_id=batch.node_id, r_target=self.spec.r_target, fraud_threshold=self.spec.fraud_threshold,
        )
        with self._commit:
            if self._stop.is_set():
                raise Cancelled
            self._store("validated", result)
            self.journal.done(name)
        self.counters.batches_validated += 1
        self.counters.nonces_validated += len(batch.nonces)
        if result["fraud_detected"]:
            self.counters.fraud_detected += 1
        log.info("pow_batch_validated", nonces=len(batch.nonces), n_invalid=result["n_invalid"],
                 fraud_detected=result["fraud_detected"], block_height=self.spec.block_height)

    def _generate(self, gid: int, group: ComputeGroup) -> None:
        spec = self.spec
        sequence = NonceSequence(spec.node_id, spec.node_count, gid, len(self.groups))
        nonces = nonce_sequence(spec.node_id, spec.node_count, gid, len(self.groups),
                                self._progress.get(str(gid), 0))
        stop = _Either(self._stop, self._interrupt)
        batches = group.generate(spec.public_key, _until(nonces, stop), stop, cancel=self._stop)
        for batch_nonces, dists in batches:
            if not batch_nonces:
                continue
            mask = dists < spec.r_target  # NaN compares False: never valid
            valid = [int(n) for n, ok in zip(batch_nonces, mask, strict=True) if ok]
            with self._commit:
                if self._stop.is_set():
                    raise Cancelled  # finished after the stop: not part of the round any more
                if valid:
                    self._store("generated", {
                        "public_key": spec.public_key, "block_hash": spec.block_hash,
                        "block_height": spec.block_height, "nonces": valid,
                        "dist": [float(d) for d, ok in zip(dists, mask, strict=True) if ok],
                        "node_id": spec.node_id,
                    })
                self._progress[str(gid)] = sequence.index(max(batch_nonces)) + 1
                self._save()
            self.counters.add(len(batch_nonces), len(valid))
            if stop.is_set():
                break


    def _store(self, kind: str, batch: dict[str, Any]) -> None:
        """Put a result in the outbox; when the disk refuses (full, read-only), hold it and retry.

        The results are worth money: holding the compute thread until the disk accepts them is better
        than dropping them, and the status shows why the round stalls.
        """
        failures = 0
        while True:
            try:
                self.outbox.put(kind, self.spec.url, batch)  # type: ignore[arg-type]
                self.storage_error = ""
                return
            except Unavailable as exc:
                self.storage_error = exc.message[:500]
                failures += 1
                delay = backoff_delay(failures, 0.5, 10.0)
                log.error("pow_outbox_refused", kind=kind, reason=exc.message, retry_in_s=delay)
                if self._stop.wait(delay):
                    raise Cancelled from None


class _Either:
    """Looks like a threading.Event that is set when either of two events is."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


def _until(nonces: Iterator[int], stop: Any) -> Iterator[int]:
    for nonce in nonces:
        if stop.is_set():
            return
        yield nonce
