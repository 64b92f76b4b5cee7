"""One look at an engine instance over HTTP: ``/health`` and ``/metrics``, concurrently, bounded in time."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from services.inference.liveness import Observation, parse_metrics

# httpx logs every request at INFO: a poll every few seconds would drown the service's own log.
logging.getLogger("httpx").setLevel(logging.WARNING)


class Prober:
    """Probes engines with one pooled HTTP client (the engines are on loopback)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False)

    async def health(self, url: str) -> bool:
        try:
            resp = await self._client.get(f"{url}/health")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def metrics(self, url: str) -> str | None:
        """The engine's ``/metrics`` text, or None when it did not answer 200."""
        try:
            resp = await self._client.get(f"{url}/metrics")
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        return resp.text

    async def observe(self, url: str) -> Observation:
        """Both endpoints at once; whatever has not answered within the timeout counts as no answer."""
        try:
            health, text = await asyncio.wait_for(
                asyncio.gather(self.health(url), self.metrics(url)), self.timeout_s + 0.5
            )
        except TimeoutError:
            return Observation(health_ok=False, metrics=None)
        if text is None:
            return Observation(health_ok=health, metrics=None)
        return Observation(health_ok=health, metrics=parse_metrics(text), text=text, at=time.time())

    async def close(self) -> None:
        await self._client.aclose()
