"""Least-connections choice among the healthy engine instances this gateway worker knows.

Each gunicorn worker balances its own requests: counts are per worker, which is what matters for
spreading load when every worker sees a similar share of clients. Ties rotate so equal instances
share the work instead of the first one taking every idle-time request.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from services.gateway.upstream import Pool


class Backend:
    """One engine instance: its address, its connection pool and the requests in flight to it."""

    def __init__(self, url: str, idle_timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"backend URL must look like http://host:port, got {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port
        self.authority = f"{self.host}:{self.port}".encode()
        self.pool = Pool(self.host, self.port, idle_timeout_s=idle_timeout_s)
        self.inflight = 0


class Balancer:
    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._backends: list[Backend] = []
        self._turn = 0

    @property
    def size(self) -> int:
        return len(self._backends)

    @property
    def urls(self) -> list[str]:
        return [b.url for b in self._backends]

    def update(self, urls: Iterable[str]) -> bool:
        """Adopt a new healthy set; returns whether it changed. Requests in flight keep their backend."""
        wanted = list(dict.fromkeys(urls))
        if wanted == self.urls:
            return False
        known = {b.url: b for b in self._backends}
        fresh: list[Backend] = []
        for url in wanted:
            backend = known.pop(url, None)
            if backend is None:
                backend = Backend(url, self.idle_timeout_s)
            fresh.append(backend)
        for gone in known.values():
            gone.pool.close()
        self._backends = fresh
        return True

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> Backend | None:
        """The backend with the fewest requests in flight (ties rotate), skipping ``exclude``."""
        backends = self._backends
        n = len(backends)
        if n == 1:
            only = backends[0]
            return None if only.url in exclude else only
        best: Backend | None = None
        start = self._turn % n if n else 0
        for i in range(n):
            backend = backends[(start + i) % n]
            if backend.url in exclude:
                continue
            if best is None or backend.inflight < best.inflight:
                best = backend
        self._turn += 1
        return best

    def close(self) -> None:
        for backend in self._backends:
            backend.pool.close()
        self._backends = []
