"""Model downloads in the background: at most three at once, each attempt a child process.

A download is a task keyed ``"{hf_repo}:{hf_commit or 'latest'}"``. Each attempt runs
:mod:`.fetch` in its own process group (it dies with the ``inference`` process, and a stop kills all of
it). An attempt that fails is retried with back-off, three attempts in all; one that makes no progress —
the repo's files in the cache stop growing and the child reports no hashing — for
``MLNODE_DOWNLOAD_STALL_SECONDS`` is killed and retried. A missing repo or revision ends the task at
once with the hub's reason. huggingface_hub resumes the files an attempt left incomplete, so a retry
(or a restart of ``inference``, which takes the unfinished tasks up again from ``tasks.json``) costs
only what was not yet fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.models import MAX_DOWNLOADS, ModelRef, Progress
from node.backoff import backoff_delay
from node.errors import Conflict, Overloaded
from node.files import atomic_write_json
from node.logging import get_logger
from services.inference.models.cache import ModelCache
from services.inference.process_group import MARKER_VAR, child_setup, kill_groups, signal_group

log = get_logger(__name__)

ATTEMPTS = 3
POLL_S = 1.0
#: Seconds between attempts: the first retry waits this long, then twice as long.
RETRY_BASE_S = 2.0
RETRY_CAP_S = 60.0  # far above the last of ATTEMPTS retries at the default base: a bound, not a change
LOG_EVERY_S = 30.0
_REPO = Path(__file__).resolve().parents[3]


@dataclass
class Task:
    ref: ModelRef
    started: float = field(default_factory=time.time)
    began: float = field(default_factory=time.monotonic)
    state: str = "downloading"  # downloading, done, failed, cancelled
    attempt: int = 1
    error: str | None = None
    commit: str | None = None
    downloaded_bytes: int = 0
    verified_bytes: int = 0
    pgid: int | None = None
    runner: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return self.ref.task_id

    def progress(self) -> Progress:
        return Progress(start_time=self.started, elapsed_seconds=round(time.monotonic() - self.began, 3),
                        downloaded_bytes=self.downloaded_bytes, attempt=self.attempt)


class Downloads:
    def __init__(self, cache: ModelCache, directory: Path, *, stall_s: float,
                 environ: dict[str, str] | None = None, on_change: Callable[[], None] | None = None,
                 retry_base_s: float = RETRY_BASE_S) -> None:
        self.cache = cache
        self.directory = directory
        self.stall_s = stall_s
        self.retry_base_s = retry_base_s
        self.marker = str(directory)
        self.environ = dict(os.environ if environ is None else environ)
        self.on_change = on_change or (lambda: None)
        self.tasks: dict[str, Task] = {}
        #: The last outcome of each key (a failure's reason shows in ``status`` until the next try).
        self.finished: dict[str, Task] = {}
        self.completed_total = 0
        self.failed_total = 0

    # -- queries ---------------------------------------------------------------------------------
    def active(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.state == "downloading"]

    def running(self, ref: ModelRef) -> Task | None:
        task = self.tasks.get(ref.task_id)
        return task if task is not None and task.state == "downloading" else None

    def last_error(self, ref: ModelRef) -> str | None:
        task = self.finished.get(ref.task_id)
        return task.error if task is not None and task.state == "failed" else None

    def metrics(self) -> dict[str, Any]:
        return {"active": len(self.active()), "completed_total": self.completed_total,
                "failed_total": self.failed_total,
                "tasks": {t.key: {"downloaded_bytes": t.downloaded_bytes, "attempt": t.attempt,
                                  "elapsed_seconds": round(time.monotonic() - t.began, 3)}
                          for t in self.active()}}

    # -- commands --------------------------------------------------------------------------------
    def start(self, ref: ModelRef) -> Task:
        """Begin downloading ``ref``; Conflict when it already is, Overloaded at the limit."""
        if self.running(ref) is not None:
            raise Conflict(f"Model {ref.task_id} is already downloading")
        if len(self.active()) >= MAX_DOWNLOADS:
            raise Overloaded(f"Maximum concurrent downloads ({MAX_DOWNLOADS}) reached")
        task = Task(ref)
        self.tasks[task.key] = task
        self.finished.pop(task.key, None)
        task.runner = asyncio.get_running_loop().create_task(self._run(task), name=f"download {task.key}")
        self._save()
        log.info("model_download_started", task_id=task.key)
        self.on_change()
        return task

    async def cancel(self, ref: ModelRef) -> bool:
        """Stop a running download (its child killed); False when none runs."""
        task = self.running(ref)
        if task is None:
            return False
        task.state = "cancelled"
        if task.runner is not None:
            task.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task.runner
        log.info("model_download_cancelled", task_id=task.key)
        return True

    async def resume(self) -> None:
        """Take up the downloads an earlier ``inference`` process left unfinished."""
        try:
            saved = json.loads((self.directory / "tasks.json").read_text())
            refs = [ModelRef(hf_repo=str(t["hf_repo"]), hf_commit=t.get("hf_commit")) for t in saved["tasks"]]
        except (OSError, ValueError, KeyError, TypeError):
            return
        for ref in refs[:MAX_DOWNLOADS]:
            if self.running(ref) is None:
                log.info("model_download_resumed", task_id=ref.task_id)
                self.start(ref)

    async def close(self) -> None:
        """Stop every download (process exit): they stay in ``tasks.json`` for the next start."""
        for task in self.active():
            if task.runner is not None:
                task.runner.cancel()
        for task in list(self.tasks.values()):
            if task.runner is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task.runner

    # -- one task --------------------------------------------------------------------------------
    async def _run(self, task: Task) -> None:
        try:
            while True:
                outcome, error, final = await self._attempt(task)
                if outcome:
                    self._finish(task, "done", None)
                    return
                if final or task.attempt >= ATTEMPTS:
                    self._finish(task, "failed", error)
                    return
                delay = backoff_delay(task.attempt, self.retry_base_s, RETRY_CAP_S)
                log.warning("model_download_retry", task_id=task.key, attempt=task.attempt, error=error,
                            retry_in_s=delay)
                await asyncio.sleep(delay)
                task.attempt += 1
                self.on_change()
        except asyncio.CancelledError:
            if task.state == "cancelled":
                self.tasks.pop(task.key, None)
                self._save()
                self.on_change()
            raise

    def _finish(self, task: Task, state: str, error: str | None) -> None:
        task.state, task.error = state, error
        self.tasks.pop(task.key, None)
        self.finished[task.key] = task
        if state == "done":
            self.completed_total += 1
            log.info("model_download_finished", task_id=task.key, commit=task.commit,
                     bytes=task.downloaded_bytes, seconds=round(time.monotonic() - task.began, 3))
        else:
            self.failed_total += 1
            log.error("model_download_failed", task_id=task.key, attempts=task.attempt, error=error)
        self._save()
        self.on_change()

    async def _attempt(self, task: Task) -> tuple[bool, str | None, bool]:
        """One child process: (succeeded, why not, whether retrying is pointless)."""
        spec = {"hf_repo": task.ref.hf_repo, "hf_commit": task.ref.hf_commit,
                "records": str(self.cache.records)}
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {**self.environ, MARKER_VAR: self.marker, "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.directory / "fetch.log", "ab") as errors:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.inference.models.fetch", json.dumps(spec),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=errors, env=env,
                cwd=_REPO, start_new_session=True, preexec_fn=child_setup(os.getpid()))
        task.pgid = proc.pid
        last: dict[str, Any] = {}
        reader = asyncio.get_running_loop().create_task(self._read(proc, task, last))
        try:
            stalled = await self._watch(proc, task)
        except asyncio.CancelledError:
            await self._kill(proc)
            raise
        finally:
            if proc.returncode is None:
                await self._kill(proc)
                # A killed attempt cannot clean up: its partial file (huggingface_hub names each one
                # after its process, so none is ever resumed by another) would stay in the cache.
                await asyncio.to_thread(_discard_partial, self.cache.repo_dir(task.ref.hf_repo))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(reader, 5)
            task.pgid = None
        if stalled:
            return False, f"no progress for {self.stall_s:g} s (stalled download killed)", False
        if proc.returncode == 0 and last.get("event") == "done":
            task.commit = last.get("commit")
            return True, None, False
        error = str(last.get("error") or f"the download process exited with status {proc.returncode}")
        return False, error, proc.returncode == 2 or bool(last.get("final"))

    async def _read(self, proc: asyncio.subprocess.Process, task: Task, last: dict[str, Any]) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                if event.get("event") == "heartbeat":
                    task.verified_bytes = int(event.get("verified_bytes") or 0)
                else:
                    last.clear()
                    last.update(event)

    async def _watch(self, proc: asyncio.subprocess.Process, task: Task) -> bool:
        """Until the child exits (False) or stalls (True); keeps ``downloaded_bytes`` current."""
        seen = (-1, -1)
        moved = time.monotonic()
        logged = time.monotonic()
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=POLL_S)
                task.downloaded_bytes = await asyncio.to_thread(_size, self.cache.repo_dir(task.ref.hf_repo))
                if done:
                    return False
                now = time.monotonic()
                mark = (task.downloaded_bytes, task.verified_bytes)
                if mark != seen:
                    seen, moved = mark, now
                elif now - moved >= self.stall_s:
                    log.warning("model_download_stalled", task_id=task.key, attempt=task.attempt,
                                bytes=task.downloaded_bytes, stall_s=self.stall_s)
                    return True
                if now - logged >= LOG_EVERY_S:
                    logged = now
                    log.info("model_download_progress", task_id=task.key, bytes=task.downloaded_bytes,
                             verified_bytes=task.verified_bytes, attempt=task.attempt)
        finally:
            exited.cancel()

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        signal_group(proc.pid, signal.SIGTERM, self.marker)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 3)
        await asyncio.to_thread(kill_groups, [proc.pid], self.marker)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)

    def _save(self) -> None:
        doc = {"tasks": [{"hf_repo": t.ref.hf_repo, "hf_commit": t.ref.hf_commit} for t in self.active()]}
        try:
            atomic_write_json(self.directory / "tasks.json", doc)
        except Exception as exc:  # a full disk costs the resume after a restart, never the download
            log.warning("model_downloads_not_saved", error=str(exc))


def _discard_partial(folder: Path) -> None:
    for path in (folder / "blobs").glob("*.incomplete"):
        with contextlib.suppress(OSError):
            path.unlink()


def _size(folder: Path) -> int:
    """Bytes of a repo's blobs in the cache, the ones still being written included."""
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder / "blobs"):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total
