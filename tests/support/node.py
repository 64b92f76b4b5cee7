"""Start the real node (supervisord + four programs) in a temp state dir on free ports.

Requests go through :mod:`http.client` so the bytes are exactly what we say: no Content-Type header
unless a test adds one — like the Network Node, which never sends it.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from tests.support.ports import free_ports
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
MLNODE = [sys.executable, "-m", "services.cli"]


#: Ports a node claims after INFERENCE_PORT (its engines'; the callback policy refuses all of them).
ENGINE_PORT_SPAN = 65


def node_ports() -> tuple[int, int]:
    """The API and inference ports of a test node, below the kernel's ephemeral range with the engine span
    after the inference port free: a receiver or peer bound to port 0 can never land among a node's own
    ports (which the callback policy refuses), and two nodes never overlap (the ports stay claimed)."""
    api = free_ports(1, span=2 + ENGINE_PORT_SPAN)[0]
    return api, api + 1


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> Response:
    """One HTTP request; dict/list bodies are JSON-encoded but sent WITHOUT a Content-Type header."""
    if isinstance(body, dict | list):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


class Node:
    """A node under test. ``start()`` runs `mlnode up`; ``stop()`` runs `mlnode down`."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.state_dir = root / "state"
        api, inference = node_ports()
        self.api_port, self.inference_port = api, inference
        self.env = dict(os.environ)
        self.env.update(
            MLNODE_STATE_DIR=str(self.state_dir),
            MLNODE_API_HOST="127.0.0.1",
            MLNODE_API_PORT=str(api),
            INFERENCE_PORT=str(inference),
            MLNODE_PEER_HOST="127.0.0.1",
            MLNODE_LOG_LEVEL="info",
            MLNODE_POW_DEVICE="cpu",
            MLNODE_ENGINE="cpu",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            # The model cache: a private hub cache, and no hub but a local one a test names (nothing
            # a test does may reach the real hub).
            HF_HOME=str(root / "hf"),
            HF_ENDPOINT="http://127.0.0.1:9",
            # The tests' callback receivers listen on loopback, which a node refuses unless told.
            MLNODE_CALLBACK_ALLOW_LOOPBACK="true",
            # Models the tests make live in pytest's temporary directories; the golden ones in shared/.
            MLNODE_MODEL_ROOTS=f"{root.parent},{REPO.parent / 'shared'}",
        )
        self.env.pop("MLNODE_INFERENCE_AUTOSTART", None)
        self.env.update(env)

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MLNODE, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def start(self) -> Node:
        proc = self.cli("up", "--wait", "90", check=False)
        if proc.returncode != 0:
            raise AssertionError(f"mlnode up failed:\n{proc.stdout}\n{proc.stderr}\n{self.logs()}")
        self.wait_services()
        self.wait_running()
        return self

    def wait_running(self, timeout: float = 30) -> None:
        """Until supervisord reports every program RUNNING (past startsecs)."""
        def all_running() -> bool:
            states = self.program_states()
            return len(states) == 4 and set(states.values()) == {"RUNNING"}

        wait_until(all_running, timeout, 0.1, message=f"programs not RUNNING: {self.ctl('status')}")

    def supervisor(self) -> Any:
        """supervisord's XML-RPC interface over the node's private unix socket, from this process: what
        ``mlnode ctl status`` reads, without starting two Python processes for every look."""
        url = f"unix://{self.state_dir / 'run' / 'supervisor.sock'}"
        return xmlrpc.client.ServerProxy("http://127.0.0.1", SupervisorTransport(None, None, url)).supervisor

    def program_states(self) -> dict[str, str]:
        """Each program's supervisord state name (``RUNNING``, ``BACKOFF``, ...); empty while supervisord
        does not answer."""
        try:
            return {info["name"]: info["statename"] for info in self.supervisor().getAllProcessInfo()}
        except (OSError, xmlrpc.client.Error):
            return {}

    def stop(self) -> None:
        self.cli("down", check=False)

    def ctl(self, *args: str) -> str:
        return self.cli("ctl", *args, check=False).stdout

    def pid(self, program: str) -> int:
        """The program's pid as supervisord reports it; 0 when it is not running."""
        try:
            return int(self.supervisor().getProcessInfo(program)["pid"])
        except (OSError, xmlrpc.client.Error):
            return 0

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        return request(self.api_port, method, path, body, **self._auth(kw))

    def inference(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        return request(self.inference_port, method, path, body, **self._auth(kw))

    def _auth(self, kw: dict[str, Any]) -> dict[str, Any]:
        """With MLNODE_API_TOKEN set, requests carry it unless the test passes its own headers."""
        token = self.env.get("MLNODE_API_TOKEN")
        if token and "headers" not in kw:
            kw = {**kw, "headers": {"Authorization": f"Bearer {token}"}}
        return kw

    def wait_services(self, timeout: float = 60) -> dict[str, Any]:
        """Until /health says every process answers; returns the last /health body."""
        seen: list[Any] = [None]

        def healthy() -> dict[str, Any] | None:
            resp = self.api("GET", "/health", timeout=5)
            seen[0] = resp.body[:500]
            return dict(resp.json()) if resp.status == 200 else None

        try:
            return dict(wait_until(healthy, timeout, 0.1))
        except AssertionError:
            raise AssertionError(f"node not healthy within {timeout} s: {seen[0]!r}\n{self.logs()}") from None

    def logs(self, program: str | None = None, lines: int = 40) -> str:
        names = [program] if program else ["gateway", "pow", "inference", "train", "supervisord"]
        out = []
        for name in names:
            path = self.state_dir / "logs" / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}.log ---\n" + "\n".join(tail))
        return "\n".join(out)

    def service_status(self, service: str) -> dict[str, Any]:
        """A service's own ``status`` reply over the bus (through ``mlnode status --json``)."""
        out = self.cli("status", "--json", check=False).stdout
        return dict(json.loads(out)["services"][service])

    def engine_pids(self) -> list[int]:
        """Live (non-zombie) processes carrying this node's engine marker, wherever they came from."""
        marker = f"MLNODE_ENGINE_OF={(self.state_dir / 'inference').resolve()}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_bytes()
                if stat[stat.rfind(b")") + 2 :].split()[0] == b"Z":
                    continue
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return found

    def log_lines(self, program: str) -> list[dict[str, Any]]:
        path = self.state_dir / "logs" / f"{program}.log"
        entries = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"unparsed": line})
        return entries
