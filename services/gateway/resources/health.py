"""Health for operators and orchestrators: ``/health``, ``/livez``, ``/readyz``."""

from __future__ import annotations

from typing import Any

import falcon.asgi
import msgspec

from contracts.node import Health as HealthAnswer
from contracts.node import Ready as ReadyAnswer
from node import gpu
from node.registry import MODE_OF
from services.gateway.services import Services


class Health:
    """Healthy when every process answers; names the ones that do not."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        reports = await self.services.reports(timeout=2.0)
        managers: dict[str, Any] = {"gateway": {"running": True}}
        down = []
        for service, report in reports.items():
            entry: dict[str, Any] = {"running": report.reachable}
            if report.reachable:
                entry["active"] = report.active
                entry["state"] = report.status.get("state") or report.status.get("status")
                if "healthy" in report.status:
                    entry["healthy"] = report.status["healthy"]
            else:
                entry["error"] = report.error
                down.append(service)
            managers[service] = entry
        healthy = not down
        body = HealthAnswer(status="healthy" if healthy else "unhealthy",
                            service_state=self.services.node_state(reports), gpu=gpu.summary(),
                            managers=managers, down=down or None)
        resp.status = 200 if healthy else 503
        resp.media = msgspec.to_builtins(body)


class Ready:
    """Ready when the active service can do its job (or, when stopped, when every service answers)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        reports = await self.services.reports(timeout=2.0)
        active = [s for s, r in reports.items() if r.active]
        if active:
            status = reports[active[0]].status
            ready = bool(status.get("ready", status.get("healthy", True)))
            body = ReadyAnswer(ready=ready, service_state=MODE_OF[active[0]])
        else:
            ready = all(r.reachable for r in reports.values())
            body = ReadyAnswer(ready=ready, service_state=self.services.node_state(reports))
        resp.status = 200 if ready else 503
        resp.media = msgspec.to_builtins(body)
