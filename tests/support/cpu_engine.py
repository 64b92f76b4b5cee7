"""The built-in CPU engine as a real subprocess on a free port, driven over HTTP like the launcher does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.node import REPO
from tests.support.ports import free_port
from tests.support.waiting import wait_until


class Engine:
    """``python -m services.inference.cpu_engine`` serving ``model`` as ``served_name``."""

    def __init__(self, model: Path, log: Path, *extra: str, served_name: str = "tiny",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "services.inference.cpu_engine", "--model", str(model)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", served_name, *extra]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"engine exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def wait_healthy(self, timeout: float = 120.0) -> None:
        wait_until(self._healthy, timeout, 0.05, message=f"engine not healthy within {timeout} s")

    def stop(self, *, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
