"""The background senders that drain the :class:`~services.pow.outbox.Outbox` to the callback URLs.

Plain threads with their own HTTP clients, not asyncio tasks: a receiver that hangs for 30 s, or a
slow fsync, then never stalls the pow service's event loop or its compute thread, and the service can
call :meth:`Delivery.flush` from either. One dispatcher thread decides which urls are due and gives each
its own sender thread (at most ``max_senders`` at once), so a slow or silent receiver delays only its
own url's results. Every connection goes through the callback policy (:mod:`.callback_policy`).

Rules: per url, strictly one unit at a time in queue order (a later batch never overtakes an earlier
one); only 2xx counts as delivered; a 4xx other than 408/429 moves the unit to the outbox's ``dead``
table; everything else is retried forever with capped, jittered exponential backoff. Batches are sent
once per ``period_s`` (default 5 s, like the reference) so that nonces found in between merge into one
POST. Only one sender may drain a given outbox file: a second one, in this process or another, is
refused by an exclusive lock on ``<outbox>.sender.lock``; the kernel releases it if the process dies.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from node.backoff import backoff_delay
from node.errors import Conflict, Unavailable
from node.files import lock_file
from node.logging import get_logger
from services.pow.callback_http import CallbackSender, Outcome, safe_url
from services.pow.callback_policy import CallbackPolicy
from services.pow.outbox import Outbox, Unit

log = get_logger(__name__)
#: Urls delivered at the same time, one sender thread each.
MAX_SENDERS = 16


class Delivery:
    """Background delivery of everything in an :class:`Outbox`; see the module docstring."""

    def __init__(
        self,
        outbox: Outbox,
        policy: CallbackPolicy,
        *,
        period_s: float = 5.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        total_timeout_s: float = 30.0,
        max_senders: int = MAX_SENDERS,
    ) -> None:
        self.outbox = outbox
        self.policy = policy
        self.period_s = period_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_senders = max_senders
        self._http_args: dict[str, Any] = {
            "connect_timeout_s": connect_timeout_s,
            "total_timeout_s": total_timeout_s,
        }
        self._rng = random.Random()
        self._cond = threading.Condition()
        self._stop = False
        self._force = False
        self._flushers = 0
        self._progress = 0  # bumped after every unit outcome; flush() waits on it
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        # Per url: consecutive failures and when the head may be tried again (monotonic clock).
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._senders: dict[str, threading.Thread] = {}  # url -> the thread draining it now
        self._deferred = False  # a due url waits for a free sender
        self._poked = False  # a sender finished while one was deferred

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the sender thread; leftovers from an earlier run are sent at once."""
        if self.running:
            return
        self._lock_fd = self._take_sender_lock()
        with self._cond:
            self._stop = False
        thread = threading.Thread(target=self._run, name="pow-outbox-delivery", daemon=True)
        self._thread = thread
        thread.start()
        log.info("outbox_delivery_started", path=str(self.outbox.path), period_s=self.period_s)

    def stop(self, timeout: float = 35.0) -> bool:
        """Ask the sender to end after its current request; True when it has. Pending stays on disk."""
        thread = self._thread
        if thread is None:
            return True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("outbox_delivery_stop_slow", timeout_s=timeout)
            return False
        self._thread = None
        log.info("outbox_delivery_stopped", pending=self.outbox.pending_count())
        return True

    def _take_sender_lock(self) -> int:
        lock_path = Path(f"{self.outbox.path}.sender.lock")
        try:
            fd = lock_file(lock_path, timeout=0)
        except OSError as exc:
            raise Unavailable(f"outbox sender lock {lock_path} cannot be opened: {exc.strerror}") from exc
        if fd is None:
            raise Conflict(f"another sender already delivers outbox {self.outbox.path}")
        return fd

    def _release_sender_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # --- flush ---------------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Send everything put so far now (ignoring backoff once); True when all of it was delivered.

        False when ``timeout`` passed first, or when some of it was dead-lettered instead. Whatever is
        left stays queued and keeps being retried.
        """
        if not self.running:
            raise Unavailable("outbox delivery is not running; call start() before flush()")
        deadline = time.monotonic() + timeout
        mark = self.outbox.last_id()
        dead_before = self.outbox.dead_ids(mark)
        with self._cond:
            self._flushers += 1
            self._force = True
            self._cond.notify_all()
        try:
            while True:
                with self._cond:
                    seen = self._progress
                if self.outbox.pending_through(mark) == 0:
                    return self.outbox.dead_ids(mark) == dead_before
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.running:
                    return False
                with self._cond:
                    if self._progress == seen:
                        self._cond.wait(remaining)
        finally:
            with self._cond:
                self._flushers -= 1
                if self._flushers == 0:
                    self._force = False  # a forced pass serves waiting flushers only: none left

    def stats(self) -> dict[str, Any]:
        """The outbox counters plus the sender's own state."""
        now = time.monotonic()
        with self._cond:
            backing_off = sum(1 for at in self._retry_at.values() if at > now)
        return {**self.outbox.stats(), "running": self.running, "urls_backing_off": backing_off}

    # --- the dispatcher and the sender threads -------------------------------------------------

    def _run(self) -> None:
        next_cycle = time.monotonic()  # leftovers from a previous run go out at once
        hold_until = 0.0  # after an outbox error: nothing but a flush before this
        trouble = 0
        try:
            while True:
                with self._cond:
                    wake = max(hold_until, min([next_cycle, *self._retry_at.values()]))
                    while (not self._stop and not self._force and not self._poked
                           and time.monotonic() < wake):
                        self._cond.wait(wake - time.monotonic())
                    if self._stop:
                        return
                    force, self._force = self._force, False
                    poked, self._poked = self._poked, False
                now = time.monotonic()
                cycle = now >= next_cycle
                if cycle:
                    next_cycle = now + self.period_s
                try:
                    self._pass(force=force, cycle=cycle or poked)
                    trouble = 0
                except Exception as exc:  # the outbox's disk, most likely: keep the thread alive
                    trouble += 1
                    delay = backoff_delay(trouble, self.backoff_base_s, self.backoff_cap_s, self._rng)
                    log.error("outbox_delivery_error", error=str(exc), retry_in_s=round(delay, 3),
                              exc_type=type(exc).__name__)
                    hold_until = time.monotonic() + delay
                    self._note_progress()
        finally:
            with self._cond:
                senders = list(self._senders.values())
            for thread in senders:  # each ends after its current request
                thread.join()
            self._release_sender_lock()

    def _pass(self, *, force: bool, cycle: bool) -> None:
        """Give every due url without a sender its own: all of them on a forced pass, on a cycle those not
        backing off, otherwise only those whose retry time has come."""
        urls = self.outbox.pending_urls()
        with self._cond:
            for idle in set(self._retry_at) - set(urls) - set(self._senders):
                self._retry_at.pop(idle)
                self._failures.pop(idle, None)
            self._deferred = False
            for url in urls:
                if self._stop:
                    return
                if url in self._senders:
                    continue
                now = time.monotonic()
                retry_at = self._retry_at.get(url)
                if not (force or (retry_at is None and cycle) or (retry_at is not None and retry_at <= now)):
                    continue
                if len(self._senders) >= self.max_senders:
                    self._deferred = True  # picked up when a sender finishes
                    return
                thread = threading.Thread(target=self._send_url, args=(url,), daemon=True,
                                          name=f"pow-outbox-sender-{len(self._senders)}")
                self._senders[url] = thread
                thread.start()

    def _send_url(self, url: str) -> None:
        """One url's sender thread: drain it, then hand the url back to the dispatcher."""
        sender = CallbackSender(self.policy, **self._http_args)
        try:
            self._drain(sender, url)
        except Exception as exc:  # the outbox's disk: this url waits, the others go on
            log.error("outbox_delivery_error", url=safe_url(url), error=str(exc), exc_type=type(exc).__name__)
            with self._cond:
                failures = self._failures.get(url, 0) + 1
                self._failures[url] = failures
                delay = backoff_delay(failures, self.backoff_base_s, self.backoff_cap_s, self._rng)
                self._retry_at[url] = time.monotonic() + delay
            self._note_progress()
        finally:
            sender.close()
            with self._cond:
                self._senders.pop(url, None)
                if self._deferred:
                    self._poked = True
                self._cond.notify_all()

    def _drain(self, sender: CallbackSender, url: str) -> None:
        """Send ``url``'s units in order until its queue is empty or one fails."""
        while not self._stopping():
            unit = self.outbox.next_unit(url)
            if unit is None:
                self._forget(url)
                return
            log.debug("outbox_send", batch_id=unit.id, kind=unit.kind, url=safe_url(url),
                      members=unit.members, nonces=unit.nonces, bytes=len(unit.body),
                      attempt=unit.attempts + 1)
            result = sender.post(unit.target, unit.body)
            if result.outcome is Outcome.DELIVERED:
                self.outbox.mark_delivered(unit)
                self._forget(url)
                log.debug("outbox_delivered", batch_id=unit.id, kind=unit.kind, members=unit.members)
            elif result.outcome is Outcome.DEAD:
                self.outbox.dead_letter(unit, result.status, result.reason)
                log.error("outbox_batch_dead", batch_id=unit.id, kind=unit.kind, url=safe_url(url),
                          status=result.status, reason=result.reason, members=unit.members,
                          nonces=unit.nonces, hint="kept in the outbox's dead table")
            else:
                self._schedule_retry(unit, url, result.reason, result.retry_after_s)
                self._note_progress()
                return
            self._note_progress()

    def _schedule_retry(self, unit: Unit, url: str, reason: str, retry_after_s: float | None) -> None:
        attempts = self.outbox.record_failure(unit, reason)
        with self._cond:
            failures = self._failures.get(url, 0) + 1
            self._failures[url] = failures
            delay = backoff_delay(failures, self.backoff_base_s, self.backoff_cap_s, self._rng)
            if retry_after_s is not None:
                delay = max(delay, min(retry_after_s, self.backoff_cap_s))
            self._retry_at[url] = time.monotonic() + delay
        log.warning("outbox_send_failed", batch_id=unit.id, kind=unit.kind, url=safe_url(url),
                    attempt=attempts, reason=reason, retry_in_s=round(delay, 3))

    def _forget(self, url: str) -> None:
        with self._cond:
            self._failures.pop(url, None)
            self._retry_at.pop(url, None)

    def _note_progress(self) -> None:
        with self._cond:
            self._progress += 1
            self._cond.notify_all()

    def _stopping(self) -> bool:
        with self._cond:
            return self._stop
