"""Engine processes never outlive a stop, a SIGTERM-deaf engine, or a kill -9 of their parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.inference.launcher import EngineProcess, LaunchSpec, describe_exit
from services.inference.process_group import MARKER_VAR, PidFile, group_members
from tests.support.waiting import until, wait_until

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[3]
# An "engine" that forks a worker (like vLLM) and reports both pids on stdout.
WITH_WORKER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(f"pids {worker.pid}", flush=True)
time.sleep(120)
"""
DEAF = """
import signal, time
signal.signal(signal.SIGTERM, lambda *_: print("term", flush=True))  # heard, and ignored
print("ready", flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def log_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def spec(tmp_path: Path, script: str) -> LaunchSpec:
    return LaunchSpec((sys.executable, "-c", script), dict(os.environ), tmp_path / "engine.log")


async def worker_pid(proc: EngineProcess, log: Path) -> int:
    def pid() -> int:
        lines = log_text(log).splitlines()
        return next((int(line.split()[1]) for line in lines if line.startswith("pids ")), 0)

    await until(pid, 10, what=f"a worker pid in {log}")
    return pid()


async def test_stop_ends_the_engine_and_its_workers(tmp_path: Path) -> None:
    proc = await EngineProcess.spawn(spec(tmp_path, WITH_WORKER), marker=str(tmp_path))
    worker = await worker_pid(proc, tmp_path / "engine.log")
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # its own process group
    assert sorted(group_members(proc.pgid, str(tmp_path))) == sorted([proc.pid, worker])
    code = await proc.stop(grace_s=5)
    assert code == -signal.SIGTERM
    wait_until(lambda: not alive(worker), 5)
    assert group_members(proc.pgid, str(tmp_path)) == []


async def test_a_sigterm_deaf_engine_is_killed_after_the_grace(tmp_path: Path) -> None:
    proc = await EngineProcess.spawn(spec(tmp_path, DEAF), marker=str(tmp_path))
    log = tmp_path / "engine.log"
    await until(lambda: "ready" in log_text(log).splitlines(), 10, what="the engine ready")
    code = await asyncio.wait_for(proc.stop(grace_s=0.5), 30)
    assert code == -signal.SIGKILL
    # Asked first (it heard the SIGTERM), killed only when it did not go: the grace was given.
    assert "term" in log_text(log).splitlines()
    assert describe_exit(code) == "was killed by SIGKILL"


async def test_a_failed_launch_reports_only_its_own_log_lines(tmp_path: Path) -> None:
    (tmp_path / "engine.log").write_text("old line from an earlier launch\n")
    script = "import sys; print('loading model'); print('CUDA out of memory', file=sys.stderr); sys.exit(3)"
    proc = await EngineProcess.spawn(spec(tmp_path, script), marker=str(tmp_path))
    assert await proc.wait() == 3
    assert proc.tail() == ["loading model", "CUDA out of memory"]
    assert describe_exit(3) == "exited with status 3"
    text = log_text(tmp_path / "engine.log")
    assert text.startswith("old line") and "launching:" in text


def test_kill_9_of_the_parent_takes_the_engine_with_it(tmp_path: Path) -> None:
    parent_script = f"""
import asyncio, os, sys, time
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from services.inference.launcher import EngineProcess, LaunchSpec
async def main():
    spec = LaunchSpec((sys.executable, "-c", "import time; time.sleep(120)"), dict(os.environ),
                      Path({str(tmp_path / "child.log")!r}))
    proc = await EngineProcess.spawn(spec, marker="m")
    print("child", proc.pid, flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""
    parent = subprocess.Popen([sys.executable, "-c", parent_script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = next((text for text in parent.stdout if text.startswith("child ")), "")
        assert line, "the parent exited before it spawned its child"
        child = int(line.split()[1])
        assert alive(child)
        parent.kill()
        parent.wait()
        wait_until(lambda: not alive(child), 5)
    finally:
        parent.kill()


def test_sweep_kills_marked_leftovers_and_spares_strangers(tmp_path: Path) -> None:
    marker = str(tmp_path / "inference")
    env = {**os.environ, MARKER_VAR: marker}
    orphan = subprocess.Popen([sys.executable, "-c", WITH_WORKER], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                start_new_session=True)
    try:
        assert orphan.stdout is not None
        worker = int(orphan.stdout.readline().split()[1])
        pidfile = PidFile(tmp_path / "engines.pid", marker)
        pidfile.write([orphan.pid, stranger.pid])
        assert sorted(pidfile.read()) == sorted([orphan.pid, stranger.pid])
        assert pidfile.sweep() == 2
        orphan.wait(5)
        wait_until(lambda: not alive(worker), 5)
        assert stranger.poll() is None  # not ours: untouched
        assert not pidfile.path.exists()
        assert pidfile.sweep() == 0  # nothing recorded any more
    finally:
        for p in (orphan, stranger):
            p.kill()
            p.wait()


def test_secrets_never_leave_through_the_engine_log(tmp_path: Path) -> None:
    """An engine that echoes its arguments and environment when it fails: the log header and every tail
    the node hands out (a failed start's 503, crash logs) mask the secret values; the log is 0600 and
    the engine runs in an empty private directory."""
    script = ("import os, sys; print('args', sys.argv[1:]); print('token', os.environ['HF_TOKEN']);"
              "print('cwd', sorted(os.listdir('.'))); sys.exit(3)")
    spec = LaunchSpec((sys.executable, "-c", script, "--api-key", "sekrit-api-key", "--seed", "1"),
                      {"PATH": os.environ["PATH"], "HF_TOKEN": "hf_sekrit_token"}, tmp_path / "engine-0.log",
                      cwd=tmp_path / "engine-cwd")

    async def run() -> list[str]:
        proc = await EngineProcess.spawn(spec, "marker")
        await proc.wait()
        return proc.tail()

    tail = asyncio.run(run())
    text = "\n".join(tail)
    assert "sekrit" not in text and "[redacted]" in text and "--seed" in text
    assert "cwd []" in text
    log_text = spec.log_path.read_text()
    assert "sekrit-api-key" not in log_text.splitlines()[0]  # the node's own header line
    assert spec.log_path.stat().st_mode & 0o777 == 0o600
