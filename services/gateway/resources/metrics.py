"""``GET /metrics`` and ``GET /api/v1/metrics``: the node in Prometheus text format, always fast.

A scrape asks every service for its ``metrics`` (its samples, read from its own status) with a short
deadline (0.3 s) and supervisord for its programs, all at once. A service that is busy or down does
not hold the scrape: its last known answer is shown with ``mlnode_metrics_age_seconds`` saying how old
it is. Last answers and restart counts live in ``run/gateway-metrics/`` so that every gunicorn worker
serves the same numbers, whichever worker the scraper reaches; a disk that refuses to keep them (full)
costs only that sharing, never the scrape.

Restarts are counted by noticing that supervisord's start time of a program changed between scrapes
(two restarts between two scrapes count once); a new supervisord (node restarted) starts from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import falcon.asgi

from node import __version__
from node.errors import MLNodeError, Unavailable
from node.files import atomic_write_json, locked
from node.logging import get_logger
from node.registry import NAMES
from services.gateway.metrics import (
    CONTENT_TYPE,
    BusTimings,
    MeasuredServices,
    NodeView,
    ProcessView,
    ServiceView,
    render,
)
from services.gateway.services import Report, Services

log = get_logger(__name__)

ASK_TIMEOUT_S = 0.3
MAX_RPC_REPLY_BYTES = 1 << 20


class Metrics:
    def __init__(self, services: Services, *, timeout_s: float = ASK_TIMEOUT_S) -> None:
        self.services = services
        #: Bus timings exist only when the gateway measures its requests (it does; bare tests may not).
        self.timings = services.timings if isinstance(services, MeasuredServices) else BusTimings()
        self.timeout_s = timeout_s
        self.directory = services.settings.run_dir / "gateway-metrics"
        self.supervisor_socket = services.settings.run_dir / "supervisor.sock"
        self.version = services.settings.version_tag or __version__
        self._memory: dict[str, dict[str, Any]] = {}
        self._restarts: dict[str, int] = {}
        self._save_failed = False

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = CONTENT_TYPE
        resp.data = await self.scrape()

    async def scrape(self) -> bytes:
        started = time.perf_counter()
        answers, programs = await asyncio.gather(
            asyncio.gather(*(self._ask(service) for service in NAMES)), self._programs()
        )
        views = dict(zip(NAMES, answers, strict=True))
        reports = {s: Report(s, v is not None and v.fresh, v.answer if v is not None and v.fresh else {})
                   for s, v in views.items()}
        view = NodeView(version=self.version, state=self.services.node_state(reports), services=views,
                        processes=programs, scrape_seconds=time.perf_counter() - started)
        # Reading every worker's files and formatting takes milliseconds: off the loop that streams.
        return await asyncio.to_thread(render, view, self.timings)

    # -- services ---------------------------------------------------------------------------------
    async def _ask(self, service: str) -> ServiceView | None:
        try:
            answer = await self.services.call(service, "metrics", timeout=self.timeout_s)
        except MLNodeError:
            answer = None
        except Exception as exc:  # never let one service's odd answer break the scrape
            log.warning("metrics_ask_failed", service=service, error=repr(exc)[:200])
            answer = None
        now = time.time()
        if isinstance(answer, dict):
            self._remember(service, {"time": now, "answer": answer})
            return ServiceView(answer, 0.0, True)
        last = self._last(service)
        if last is None:
            return None
        return ServiceView(last["answer"], max(0.0, now - last["time"]), False)

    def _remember(self, service: str, snapshot: dict[str, Any]) -> None:
        self._memory[service] = snapshot
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_json(self.directory / f"last-{service}.json", snapshot, durable=False, default=str)
            self._save_failed = False
        except (OSError, Unavailable, TypeError, ValueError) as exc:
            if not self._save_failed:  # once per outage: a full disk must not flood the log
                log.warning("metrics_snapshot_not_saved", service=service, error=str(exc))
            self._save_failed = True

    def _last(self, service: str) -> dict[str, Any] | None:
        """The newest snapshot any worker saved for ``service`` (or this worker's own)."""
        best = self._memory.get(service)
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads((self.directory / f"last-{service}.json").read_bytes())
            if (isinstance(doc, dict) and isinstance(doc.get("time"), int | float)
                    and isinstance(doc.get("answer"), dict)
                    and (best is None or doc["time"] > best["time"])):
                best = doc
        return best

    # -- supervisord ------------------------------------------------------------------------------
    async def _programs(self) -> list[ProcessView]:
        try:
            supervisor_pid, infos = await asyncio.wait_for(self._supervisor_info(), self.timeout_s)
            starts = {str(i["name"]): float(i.get("start") or 0) for i in infos}
            running = {str(i["name"]): i.get("statename") == "RUNNING" for i in infos}
        except Exception as exc:  # best effort: no supervisord (a bare gateway), or a reply we can't read
            log.debug("metrics_supervisor_unreachable", error=repr(exc)[:200])
            return []
        try:
            restarts = await asyncio.to_thread(count_restarts, self.directory, supervisor_pid, starts)
            self._restarts = restarts
        except OSError as exc:  # the shared file is out of reach: this worker's last counts
            log.debug("metrics_restarts_unsaved", error=str(exc))
            restarts = self._restarts
        return [ProcessView(name, running[name], starts[name], restarts.get(name, 0))
                for name in sorted(starts)]

    async def _supervisor_info(self) -> tuple[int, list[dict[str, Any]]]:
        """supervisord's pid and ``getAllProcessInfo`` in one XML-RPC multicall over its unix socket."""
        calls = [{"methodName": "supervisor.getPID", "params": []},
                 {"methodName": "supervisor.getAllProcessInfo", "params": []}]
        body = xmlrpc.client.dumps((calls,), "system.multicall").encode()
        reader, writer = await asyncio.open_unix_connection(str(self.supervisor_socket))
        try:
            writer.write(b"POST /RPC2 HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/xml\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            raw = await reader.read(MAX_RPC_REPLY_BYTES)
            while len(raw) < MAX_RPC_REPLY_BYTES:
                more = await reader.read(MAX_RPC_REPLY_BYTES - len(raw))
                if not more:
                    break
                raw += more
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise ValueError(f"supervisord answered {head[:40]!r}")
        params, _ = xmlrpc.client.loads(payload)
        results: Any = params[0]
        # supervisord answers a multicall with bare values; the XML-RPC convention wraps each in a list.
        pid, infos = (_unwrap(value) for value in results[:2])
        if not (isinstance(pid, int) and isinstance(infos, list) and all(isinstance(i, dict) for i in infos)):
            raise ValueError("unexpected supervisord reply")
        return pid, infos


def _unwrap(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 1 and not isinstance(value[0], dict):
        return value[0]
    return value


def count_restarts(directory: Path, supervisor_pid: int, starts: dict[str, float]) -> dict[str, int]:
    """Restarts per program, updated from the start times seen now; shared by workers under a lock."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "restarts.json"
    with locked(directory / "restarts.lock"):
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            doc = None
        if not isinstance(doc, dict) or doc.get("supervisord_pid") != supervisor_pid:
            doc = {"supervisord_pid": supervisor_pid, "programs": {}}
        programs: dict[str, Any] = doc.setdefault("programs", {})
        changed = False
        for name, start in starts.items():
            seen = programs.get(name)
            if not isinstance(seen, dict):
                programs[name] = {"start": start, "restarts": 0}
                changed = True
            elif start and seen.get("start") != start:
                seen["start"] = start
                seen["restarts"] = int(seen.get("restarts", 0)) + 1
                changed = True
        if changed:
            try:
                atomic_write_json(path, doc, durable=False)
            except Unavailable as exc:  # a full disk: the counts are still right, the next scrape
                log.warning("metrics_restarts_not_saved", error=exc.message)  # counts the change again
        return {name: int(entry.get("restarts", 0)) for name, entry in programs.items()}
