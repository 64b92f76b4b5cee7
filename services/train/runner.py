"""One training run in its own thread: inner steps, outer all-reduce, checkpoints, rejoin after a drop.

The service's event loop owns the peer sockets, so this thread never touches them: every group call is
a coroutine handed to that loop and waited on here, in short slices, so that ``stop`` is honoured
within about one inner step even while an all-reduce waits for a silent peer.

Joining a run already under way (a restart, a second ``train/start``, or a rank left out of a step)
always goes the same way: fetch the outer weights and momentum a peer publishes after each outer step,
load them, announce :meth:`~services.train.collective.group.PeerGroup.rejoin` for the next step,
carry on. Outer weights are then the same bits on every rank, whatever happened to the inner loop of
the one that rejoined.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from torch import Tensor

from node.errors import MLNodeError, Unavailable
from node.logging import get_logger
from services.train.checkpoint import checkpoint_due, resume, save_checkpoint
from services.train.collective.group import Excluded, PeerGroup
from services.train.collective.state import Snapshot
from services.train.config import TrainPlan
from services.train.diloco import Contributors, DiLoCoWorker, Progress, Reduce, SyncState, solo_reduce
from services.train.model import enable_determinism

log = get_logger(__name__)
T = TypeVar("T")

STARTING, RUNNING, FINISHED, STOPPED, FAILED = "STARTING", "RUNNING", "FINISHED", "STOPPED", "FAILED"
_POLL_S = 0.05


class StopRequested(Exception):
    """Raised inside the run thread when ``stop`` interrupts a wait on the peers."""


def weights_digest(tensors: Sequence[Tensor]) -> str:
    """sha256 over the float32 bytes of ``tensors`` in order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class Runner:
    """Drives one :class:`DiLoCoWorker`; ``group`` is None for a one-node run."""

    def __init__(
        self,
        plan: TrainPlan,
        *,
        loop: asyncio.AbstractEventLoop,
        group: PeerGroup | None,
        resume: bool,
        on_change: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.loop = loop
        self.group = group
        self.resume_requested = resume
        self.on_change = on_change
        self.state = STARTING
        self.error: str | None = None
        self.progress: Progress | None = None
        self.loss_first: float | None = None
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        self.weights_digest: str | None = None
        self.rejoins = 0
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="train-run", daemon=True)

    # -- control (any thread) -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """True until the run ends (finished, stopped or failed)."""
        return self.state in (STARTING, RUNNING)

    def status(self) -> dict[str, Any]:
        progress = self.progress.to_dict() if self.progress is not None else {}
        return {
            "state": self.state,
            "task_id": self.plan.env.task_id,
            "rank": self.plan.env.rank,
            "world_size": self.plan.env.world_size,
            "outer_step": progress.get("outer_step", 0),
            "outer_rounds": self.plan.outer_rounds,
            "inner_step": progress.get("inner_step", 0),
            "total_steps": self.plan.optim.total_steps,
            "inner_steps_per_round": self.plan.diloco.inner_steps,
            "loss": progress.get("loss_last"),
            "loss_ema": progress.get("loss_ema"),
            "loss_first": self.loss_first,
            "lr": progress.get("lr"),
            "tokens_seen": progress.get("tokens_seen", 0),
            "contributors": progress.get("contributors", []),
            "finished": self.state == FINISHED,
            "weights_digest": self.weights_digest,
            "resumed_from": self.resumed_from,
            "last_checkpoint": self.last_checkpoint,
            "rejoins": self.rejoins,
            "waiting_for_quorum": self.group is not None and self.group.waiting_for_quorum,
            "peers_dropped": self.group.dropped() if self.group is not None else [],
            "error": self.error,
            "elapsed_s": round(time.time() - self.started_at, 3),
        }

    # -- the run thread -------------------------------------------------------------------------
    def _main(self) -> None:
        worker: DiLoCoWorker | None = None
        try:
            enable_determinism()
            worker = DiLoCoWorker(self.plan)
            if self.resume_requested:
                path = resume(worker)
                self.resumed_from = str(path) if path is not None else None
            self._snapshot(worker)
            if self.group is not None:
                self._join_running(worker)
            self.state = RUNNING
            self.on_change()
            reduce: Reduce = (
                self._group_reduce
                if self.group is not None
                else functools.partial(solo_reduce, compression=self.plan.diloco.compression)
            )
            while not worker.finished and not self._stop.is_set():
                worker.run_inner(should_stop=self._stop.is_set, on_step=lambda p: self._stepped(worker, p))
                if self._stop.is_set():
                    break
                if worker.outer_due:
                    self._outer(worker, reduce)
            self._checkpoint(worker)
            self.state = FINISHED if worker.finished else STOPPED
            log.info("train_run_ended", state=self.state, inner_step=worker.inner_steps_done,
                     outer_step=worker.outer_steps_done, weights_digest=self.weights_digest)
        except StopRequested:
            if worker is not None:
                self._checkpoint(worker)
            self.state = STOPPED
        except MLNodeError as exc:
            self._fail(exc.message)
        except Exception as exc:  # the thread must report, never die silently
            log.exception("train_run_crashed")
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.on_change()

    def _fail(self, message: str) -> None:
        self.error = message
        self.state = FAILED
        log.error("train_run_failed", error=message)

    def _stepped(self, worker: DiLoCoWorker, progress: Progress) -> None:
        self.progress = progress
        if self.loss_first is None:
            self.loss_first = progress.loss_last
        if checkpoint_due(worker) and not worker.outer_due:
            self._checkpoint(worker)

    def _outer(self, worker: DiLoCoWorker, reduce: Reduce) -> None:
        step = worker.outer_steps_done
        try:
            worker.outer_step(reduce)
        except Excluded as exc:
            log.warning("train_excluded", outer_step=step, reason=exc.message)
            self._resync(worker, beyond=step)
            return
        self._after_outer(worker)
        if checkpoint_due(worker):
            self._checkpoint(worker)

    def _after_outer(self, worker: DiLoCoWorker) -> None:
        self.progress = worker.progress()
        self.weights_digest = weights_digest(worker.outer_params)
        self._snapshot(worker)
        self.on_change()

    def _checkpoint(self, worker: DiLoCoWorker) -> None:
        if worker.inner_steps_done == 0 or self.state == FAILED:
            return
        try:
            self.last_checkpoint = str(save_checkpoint(worker))
        except MLNodeError as exc:
            log.error("checkpoint_failed", error=exc.message)

    # -- peers ---------------------------------------------------------------------------------
    def _group_reduce(self, pseudo_grads: list[Tensor], contributors: Contributors) -> list[Tensor]:
        group = self._require_group()
        out = self._await(lambda: group.all_reduce(contributors.outer_step, pseudo_grads))
        contributors.ranks = list(out.ranks)
        return out.tensors

    def _snapshot(self, worker: DiLoCoWorker) -> None:
        """Publish the round-start state a rejoining peer fetches (on the loop: it owns the group)."""
        if self.group is None:
            return
        state = worker.export_sync_state()
        group = self.group
        self.loop.call_soon_threadsafe(
            group.serve_state, state.outer_step, state.inner_step, state.names, state.tensors
        )

    def _join_running(self, worker: DiLoCoWorker) -> bool:
        """At start (a restart, a second ``train_start``): if a peer we hear is past our step, take its
        state and rejoin; returns True when a peer's state was loaded. Later on, the group itself tells
        a late or excluded rank (:class:`Excluded`), and :meth:`_resync` takes over."""
        group = self._require_group()
        floor = worker.outer_steps_done + 1
        heard = self._heard_ranks(wait_s=min(group.timeout, 2.0))
        layouts = worker.sync_layouts()
        for rank in heard:

            def fetch(r: int = rank) -> Coroutine[Any, Any, Snapshot]:
                return group.fetch_state(layouts, rank=r, timeout=group.timeout)

            try:
                snapshot = self._await(fetch)
            except Unavailable as exc:
                log.info("train_start_sync_skipped", peer=rank, reason=exc.message)
                continue
            theirs = snapshot.outer_step
            loaded = theirs >= floor
            if loaded:
                self._load(worker, snapshot)
                self._after_outer(worker)
            log.info("train_synced", peer=rank, their_step=theirs, outer_step=worker.outer_steps_done,
                     loaded=loaded)
            return loaded
        return False

    def _heard_ranks(self, wait_s: float) -> list[int]:
        group = self._require_group()

        async def heard() -> list[int]:
            now = time.monotonic()
            return sorted(
                r for r, key in group.ranks().items()
                if (seen := group.link.last_heard(key)) is not None and now - seen < group.timeout
            )

        deadline = time.monotonic() + wait_s
        ranks: list[int] = []
        while not self._stop.is_set():
            ranks = self._await(heard)
            if len(ranks) >= len(group.ranks()) or time.monotonic() > deadline:
                break
            time.sleep(_POLL_S * 2)
        return ranks

    def _resync(self, worker: DiLoCoWorker, *, beyond: int) -> None:
        """After being left out of step ``beyond``: load a peer's state of a later step, then rejoin."""
        group = self._require_group()
        deadline = time.monotonic() + group.join_timeout + 4 * group.timeout
        last = "no peer answered"
        layouts = worker.sync_layouts()
        while not self._stop.is_set():
            try:
                snapshot = self._await(lambda: group.fetch_state(layouts, timeout=group.timeout))
                if snapshot.outer_step > beyond:
                    self._load(worker, snapshot)
                    self._after_outer(worker)
                    return
                last = f"peers are still at outer step {snapshot.outer_step}"
            except Unavailable as exc:
                last = exc.message
            if time.monotonic() > deadline:
                raise Unavailable(f"could not rejoin after outer step {beyond}: {last}")
            time.sleep(_POLL_S * 4)
        raise StopRequested

    def _load(self, worker: DiLoCoWorker, snapshot: Snapshot) -> None:
        group = self._require_group()
        worker.load_sync_state(
            SyncState(snapshot.outer_step, snapshot.inner_step, list(snapshot.names), snapshot.tensors)
        )
        self._await(lambda: group.rejoin(worker.outer_steps_done))
        self.rejoins += 1
        self.progress = worker.progress()
        self.weights_digest = weights_digest(worker.outer_params)
        log.info("train_rejoined", outer_step=worker.outer_steps_done, inner_step=worker.inner_steps_done)

    def _await(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the loop and wait for it, giving up (and cancelling it) on stop."""

        async def run() -> T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    future.cancel()
                    raise StopRequested from None

    def _require_group(self) -> PeerGroup:
        if self.group is None:
            raise Unavailable("this run has no peer group")
        return self.group
