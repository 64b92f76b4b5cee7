"""Launch one engine process (vLLM or the CPU engine: the same code path) and stop it for sure.

The engine's stdout and stderr go to its own log file under ``$MLNODE_STATE_DIR/inference/`` (mode
0600). Each launch appends a marker line and remembers where its output starts, so a failed start can
answer with *that* launch's last lines: the operator sees the engine's own words (a CUDA out-of-memory, a
bad flag) instead of "exited with status 1". Secret flag values and secret environment values are
masked in the marker line and in every tail handed out (an engine echoes its arguments when it fails).
The engine runs in an empty private working directory, so a model *name* can never resolve to a
directory relative to the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.files import DIR_MODE, FILE_MODE
from node.logging import get_logger
from node.redact import redact_args, scrub, secret_values
from services.inference.process_group import MARKER_VAR, child_setup, kill_groups, signal_group

log = get_logger(__name__)

#: A log file larger than this at launch is rotated to ``<name>.1`` first.
ROTATE_BYTES = 64 * 1024 * 1024
TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class LaunchSpec:
    """What to run: the command, its environment (complete, not a delta) and its log file."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False)
    log_path: Path
    cwd: Path | None = None


class EngineProcess:
    """A running (or exited) engine: its own session and process group, led by ``pid``."""

    def __init__(
        self, spec: LaunchSpec, proc: asyncio.subprocess.Process, marker: str, log_offset: int
    ) -> None:
        self.spec = spec
        self.proc = proc
        self.marker = marker
        self.log_offset = log_offset
        self.started = time.monotonic()
        self._secrets = secret_values(spec.argv, spec.env)

    @classmethod
    async def spawn(cls, spec: LaunchSpec, marker: str) -> EngineProcess:
        """Start ``spec`` (raises OSError when the command cannot be executed)."""
        spec.log_path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if spec.cwd is not None:
            spec.cwd.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _rotate(spec.log_path)
        env = {**spec.env, MARKER_VAR: marker}
        fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        with open(fd, "ab") as out:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out.write(f"----- mlnode {stamp} launching: {shlex.join(redact_args(spec.argv))}\n".encode())
            out.flush()
            offset = out.tell()
            # Spawned from the event loop's thread, which lives as long as the process: the death
            # signal fires when the *thread* that forked the child exits.
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.cwd,
                start_new_session=True,
                preexec_fn=child_setup(os.getpid()),
            )
        log.info("engine_spawned", pid=proc.pid, log=str(spec.log_path), argv=list(spec.argv))
        return cls(spec, proc, marker, offset)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        return self.proc.pid  # a session leader leads its process group

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        return await self.proc.wait()

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last ``lines`` non-empty lines this launch wrote to its log."""
        try:
            with open(self.spec.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(self.log_offset, size - _TAIL_BYTES)
                if start > size:
                    start = 0  # the file was rotated or truncated under us
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return [f"(engine log unreadable: {exc})"]
        found = [scrub(ln.rstrip(), self._secrets) for ln in text.splitlines() if ln.strip()]
        return found[-lines:]

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM the whole group, SIGKILL it after ``grace_s``; returns the leader's exit status."""
        if self.proc.returncode is None:
            signal_group(self.pgid, signal.SIGTERM, self.marker)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                log.warning("engine_kill", pid=self.pid, reason=f"still running {grace_s:g} s after SIGTERM")
                signal_group(self.pgid, signal.SIGKILL, self.marker)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 10)
        # The leader is gone; its workers (vLLM forks some) must not outlive it.
        await asyncio.get_running_loop().run_in_executor(None, kill_groups, [self.pgid], self.marker)
        return self.proc.returncode


def _rotate(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size > ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"
