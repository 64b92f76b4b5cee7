"""``GET /api/v1/metrics``: the network's schema v1 (the operator's own set stays on ``GET /metrics``).

The Network Node federates this answer (it refuses one over 2 MiB or 5000 series, and omits a node that
answers 404). The values come from the inference service's collectors, answered from memory; when the
service does not answer within :data:`ASK_TIMEOUT_S` (restarting, busy), the last snapshot this worker
saw is shown, its source timestamps telling how old it is. ``GONKA_METRICS=off`` answers 404.
"""

from __future__ import annotations

import asyncio

import falcon
import falcon.asgi
import msgspec

from contracts.network_metrics import Snapshot
from node import __version__
from node.errors import MLNodeError
from node.logging import get_logger
from services.gateway.metrics import CONTENT_TYPE
from services.gateway.network_metrics import render
from services.gateway.services import Services

log = get_logger(__name__)
ASK_TIMEOUT_S = 0.5


class NetworkMetrics:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.version = services.settings.version_tag or __version__
        self._last: Snapshot | None = None

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not self.services.settings.network_metrics:
            raise falcon.HTTPNotFound(description="GONKA_METRICS=off: the network metrics are not exported")
        snapshot = await self._snapshot()
        resp.content_type = CONTENT_TYPE
        resp.data = await asyncio.to_thread(render, self.version, snapshot)

    async def _snapshot(self) -> Snapshot | None:
        try:
            answer = await self.services.call("inference", "network_metrics", timeout=ASK_TIMEOUT_S)
            self._last = msgspec.convert(answer, Snapshot)
        except MLNodeError:
            pass  # the last snapshot (or none) is shown: the scrape never waits for a busy service
        except msgspec.ValidationError as exc:
            log.warning("network_metrics_unreadable", error=str(exc)[:200])
        return self._last
