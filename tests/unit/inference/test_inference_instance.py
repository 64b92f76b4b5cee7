"""Supervision of one instance against a real (tiny) HTTP engine process: crash, hang, stall, busy."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.errors import Unavailable
from services.inference.engine_plan import EngineKind, InstancePlan
from services.inference.instance import Instance
from services.inference.liveness import Timing
from services.inference.manager import EngineManager
from services.inference.probe import Prober
from tests.support.ports import free_port
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

# A stand-in engine: /health and /metrics like the real ones, misbehaving on demand. The mode comes
# from the file "<control>.<pid>" so a test can break one process and not its replacement.
FAKE_ENGINE = r"""
import os, sys, time, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, control = int(sys.argv[1]), sys.argv[2]
if "--fail-start" in sys.argv:
    print("loading weights", flush=True)
    print("RuntimeError: boom, CUDA out of memory", file=sys.stderr, flush=True)
    sys.exit(2)
steps = [0]
def mode():
    try:
        return open(f"{control}.{os.getpid()}").read().strip()
    except OSError:
        return "ok"
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        m = mode()
        if m == "hang":  # the scenario: an engine that stops answering
            time.sleep(3600)
        if m == "crash":
            os._exit(7)
        if self.path == "/health":
            if m == "busy":
                time.sleep(3600)
            self.reply(200, "{}")
        elif self.path == "/metrics":
            if m in ("ok", "busy"):
                steps[0] += 1
            running = {"ok": 0, "busy": 5, "stall": 2}[m]
            text = f"mlnode_engine_iterations_total {steps[0]}\nvllm:num_requests_running {running}\n"
            self.reply(200, text)
        else:
            self.reply(404, "")
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""
TIMING = Timing(hang_s=1.5, poll_s=0.15, probe_timeout_s=0.4)
KIND = EngineKind("fake", stagger_s=0, start_timeout_s=20, stop_grace_s=2)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.control = tmp / "ctl"
        self.changes = 0
        self.prober = Prober(TIMING.probe_timeout_s)

    def instance(self, *extra: str, max_restarts: int = 3) -> Instance:
        port = free_port()
        argv = (sys.executable, "-c", FAKE_ENGINE, str(port), str(self.control), *extra)
        plan = InstancePlan(0, port, (), argv, dict(os.environ))
        return Instance(plan, KIND, log_path=self.tmp / "engine-0.log", marker=str(self.tmp), timing=TIMING,
                        prober=self.prober, max_restarts=max_restarts, on_change=self._changed)

    def _changed(self) -> None:
        self.changes += 1

    def set_mode(self, pid: int, mode: str) -> None:
        Path(f"{self.control}.{pid}").write_text(mode)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    await h.prober.close()


async def serving(inst: Instance) -> int:
    inst.start()
    await asyncio.wait_for(asyncio.shield(inst.ready), 20)
    assert inst.state == "serving" and inst.healthy() and inst.process is not None
    return inst.process.pid


async def test_a_crashed_engine_is_detected_reported_and_restarted(harness: Harness) -> None:
    inst = harness.instance()
    try:
        first = await serving(inst)
        os.kill(first, signal.SIGKILL)
        await until(lambda: inst.state == "restarting" or inst.restarts == 1, 5)
        assert inst.last_exit is not None and inst.last_exit["code"] == -signal.SIGKILL
        assert inst.last_exit["reason"] == "crashed"
        await until(lambda: inst.healthy() and inst.process is not None and inst.process.pid != first, 20)
        assert inst.status()["restarts"] == 1 and inst.status()["pid"] != first
    finally:
        await inst.stop()
    assert inst.status()["pid"] is None and inst.state == "stopped"


async def test_a_hung_engine_is_restarted_within_the_window(harness: Harness) -> None:
    inst = harness.instance()
    try:
        first = await serving(inst)
        harness.set_mode(first, "hang")
        # Restarted by the hang detector (the reason says so); the window's arithmetic is
        # test_inference_liveness's, on a fake clock.
        await until(lambda: inst.restarts == 1, 10)
        assert inst.last_exit is not None and inst.last_exit["reason"].startswith("hung: no answer")
        await until(lambda: inst.healthy() and inst.process is not None and inst.process.pid != first, 20)
    finally:
        await inst.stop()


async def test_a_stalled_engine_with_running_requests_is_restarted(harness: Harness) -> None:
    inst = harness.instance()
    try:
        first = await serving(inst)
        harness.set_mode(first, "stall")
        await until(lambda: inst.restarts == 1, 10)
        assert inst.last_exit is not None and "requests running but no progress" in inst.last_exit["reason"]
    finally:
        await inst.stop()


async def test_a_busy_engine_that_makes_progress_is_left_alone(harness: Harness) -> None:
    inst = harness.instance()
    try:
        first = await serving(inst)
        busy_from = time.monotonic()
        harness.set_mode(first, "busy")  # /health never answers, counters keep moving
        # Judged alive by its progress alone for two whole hang windows (observations, not a sleep).
        def alive_through_two_windows() -> bool:
            return inst.liveness is not None and inst.liveness.last_alive - busy_from >= 2 * TIMING.hang_s

        await until(alive_through_two_windows, 20, what="two hang windows of observed progress")
        assert inst.restarts == 0 and inst.state == "serving" and inst.healthy()
        assert inst.process is not None and inst.process.pid == first
    finally:
        await inst.stop()


async def test_restarts_are_bounded_then_the_instance_is_failed(harness: Harness) -> None:
    inst = harness.instance(max_restarts=1)
    try:
        first = await serving(inst)
        harness.set_mode(first, "crash")
        await until(lambda: inst.restarts == 1 and inst.healthy(), 20)
        assert inst.process is not None
        harness.set_mode(inst.process.pid, "crash")
        await until(lambda: inst.state == "failed", 10)
        assert "gave up after 1 restarts" in inst.error and not inst.healthy()
    finally:
        await inst.stop()


async def test_a_failed_start_answers_with_the_engines_last_log_lines(harness: Harness) -> None:
    inst = harness.instance("--fail-start")
    inst.start()
    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(inst.ready, 20)
    message = info.value.message
    assert "exited with status 2 before serving" in message
    assert "loading weights | RuntimeError: boom, CUDA out of memory" in message
    assert "\n" not in message and inst.state == "failed" and inst.restarts == 0
    await inst.stop()


async def test_manager_without_a_start(tmp_path: Path) -> None:
    from node import config

    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path), "MLNODE_ENGINE": "cpu"})
    published: list[list[str]] = []
    manager = EngineManager(settings, published.append, environ={})
    assert manager.up_status() == {"status": "not_started", "is_starting": False, "is_running": False,
                                   "elapsed_seconds": 0.0, "error": None, "model": None}
    assert manager.status()["state"] == "STOPPED" and not manager.is_active()
    with pytest.raises(Exception, match="no inference start is in progress"):
        await manager.wait_up()
    assert await manager.down() == {"status": "OK"}
    assert await manager.down() == {"status": "OK"}
    assert manager.backends() == [] and published == []
    await manager.close()
