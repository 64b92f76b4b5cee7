"""Prometheus metrics of the node, through ``prometheus_client``: what a scrape shows, and bus timings
summed over gunicorn's workers.

A scrape lands on any gunicorn worker, so per-worker numbers alone would make counters jump between
scrapes. The gateway's bus timings therefore use prometheus_client's multiprocess mode: each worker
records into its own memory-mapped file in ``$PROMETHEUS_MULTIPROC_DIR`` (supervisord sets it to
``run/gateway-metrics/prometheus``; the gateway empties it at start) and a scrape sums every file,
dead workers' included, so every worker answers the same numbers and no counter goes back.

A write into a memory-mapped file on a full disk kills the process (SIGBUS), so each worker reserves
its files' space before it records anything; a worker that cannot (the disk is already full) records
no timings, and scrapes still answer. Without the variable (a bare gateway in tests) the timings stay
in the process.

What the services said arrives as samples they built themselves (:mod:`node.registry`); :func:`render`
adds the node's own series and knows no service's fields.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from node.errors import DeadlineExceeded, Unreachable
from node.logging import get_logger
from node.registry import MODES, STOPPED
from services.gateway.services import Services

log = get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Bus latency buckets (seconds): sub-millisecond status calls up to blocking starts.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Space reserved per worker file: about 400 labelled histogram series.
RESERVED_BYTES = 1 << 20
_FILE_KINDS = ("histogram", "counter")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

disable_created_metrics()  # ``_created`` series would differ between workers
REQUEST_SECONDS = Histogram(
    "mlnode_bus_request_duration_seconds",
    "Bus request round trips measured in the gateway, by service and request kind.",
    ("service", "kind"), buckets=BUCKETS, registry=None,
)
REQUEST_FAILURES = Counter(
    "mlnode_bus_request_failures_total", "Bus requests that got no answer (timeout, unreachable, cancelled).",
    ("service", "kind", "reason"), registry=None,
)


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROCESS_DIR_ENV)
    return Path(value) if value else None


def reset_multiprocess_dir() -> None:
    """Start the gateway's timings from zero (before any worker exists): old workers' files go."""
    directory = multiprocess_dir()
    if directory is None:
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


class BusTimings:
    """This process's bus request timings; with a multiprocess dir, every worker's."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._ready_pid = 0
        self._enabled = True

    def observe(self, service: str, kind: str, seconds: float, failure: str | None) -> None:
        if self.directory is not None and self._ready_pid != os.getpid():
            self._ready_pid = os.getpid()
            self._enabled = _reserve(self.directory)
        if not self._enabled:
            return
        REQUEST_SECONDS.labels(service, kind).observe(seconds)
        if failure is not None:
            REQUEST_FAILURES.labels(service, kind, failure).inc()

    def collectors(self) -> list[Collector]:
        if self.directory is None:
            return [REQUEST_SECONDS, REQUEST_FAILURES]
        return [MultiProcessCollector(None, path=str(self.directory))]


def _reserve(directory: Path) -> bool:
    """Give this process's metric files their space now (see the module docstring)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for kind in _FILE_KINDS:
            fd = os.open(directory / f"{kind}_{os.getpid()}.db", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size == 0:
                    os.posix_fallocate(fd, 0, RESERVED_BYTES)
            finally:
                os.close(fd)
    except OSError as exc:
        for kind in _FILE_KINDS:
            (directory / f"{kind}_{os.getpid()}.db").unlink(missing_ok=True)
        log.warning("metrics_timings_disabled", directory=str(directory), error=str(exc))
        return False
    return True


class MeasuredServices(Services):
    """:class:`Services` that times every bus request into a :class:`BusTimings`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timings = BusTimings(multiprocess_dir())

    async def call(
        self, service: str, kind: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        started = time.perf_counter()
        failure: str | None = None
        try:
            return await super().call(service, kind, payload, timeout=timeout)
        except DeadlineExceeded:
            failure = "timeout"
            raise
        except Unreachable:
            failure = "unreachable"
            raise
        except asyncio.CancelledError:
            failure = "cancelled"
            raise
        finally:
            self.timings.observe(service, kind, time.perf_counter() - started, failure)


# --- what a scrape shows ----------------------------------------------------------------------------

@dataclass
class ServiceView:
    """One service's ``metrics`` answer, and how old it is (0 and fresh when it answered this scrape)."""

    answer: dict[str, Any]
    age_s: float
    fresh: bool


@dataclass
class ProcessView:
    program: str
    running: bool
    start_time: float
    restarts: int


@dataclass
class NodeView:
    version: str
    state: str
    services: dict[str, ServiceView | None]
    processes: list[ProcessView]
    scrape_seconds: float = 0.0


class _Families:
    """Samples grouped into families (HELP and TYPE once each), in the order first seen."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def add(self, name: str, kind: str, help_text: str, value: float,
            labels: Mapping[str, str] | None = None) -> None:
        labels = labels or {}
        family = self.families.get(name)
        if family is None:
            if not _METRIC_NAME.match(name) or not all(_LABEL_NAME.match(k) for k in labels):
                log.debug("metrics_sample_skipped", name=name)  # format 0.0.4 could not carry it
                return
            maker = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self.families[name] = maker(name, help_text, labels=list(labels))
        family.add_metric(list(labels.values()), value)  # type: ignore[attr-defined]


class _ViewCollector(Collector):
    def __init__(self, view: NodeView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.view).values())


def render(view: NodeView, timings: BusTimings) -> bytes:
    """The exposition text of one scrape: ``view`` plus the bus timings of every worker."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ViewCollector(view))
    for collector in timings.collectors():
        registry.register(collector)
    return generate_latest(registry)


def families(view: NodeView) -> dict[str, Metric]:
    out = _Families()
    out.add("mlnode_build_info", "gauge", "Always 1; the version label is the node's version.", 1,
            {"version": view.version})
    for state in (*MODES, STOPPED):
        out.add("mlnode_node_state", "gauge", "1 for the node's current state, 0 for the others.",
                int(view.state == state), {"state": state})
    _processes(out, view.processes)
    for service, sv in view.services.items():
        labels = {"service": service}
        out.add("mlnode_service_up", "gauge", "1 when the service answered this scrape.",
                int(sv is not None and sv.fresh), labels)
        if sv is None:
            continue
        out.add("mlnode_metrics_age_seconds", "gauge",
                "Age of the values shown for the service (0 when it answered this scrape).",
                round(sv.age_s, 3), labels)
        out.add("mlnode_service_active", "gauge", "1 while the service holds the node.",
                int(bool(sv.answer.get("active"))), labels)
        _bus_security(out, service, sv.answer.get("bus"))
    for sv in view.services.values():
        if sv is not None:
            _samples(out, sv.answer.get("samples"))
    out.add("mlnode_metrics_scrape_duration_seconds", "gauge", "Time this scrape took to gather.",
            round(view.scrape_seconds, 6))
    return out.families


def _processes(out: _Families, processes: list[ProcessView]) -> None:
    for p in processes:
        out.add("mlnode_process_running", "gauge", "1 when supervisord reports the program RUNNING.",
                int(p.running), {"program": p.program})
    for p in processes:
        out.add("mlnode_process_start_time_seconds", "gauge", "When supervisord last started the program.",
                p.start_time, {"program": p.program})
    for p in processes:
        out.add("mlnode_process_restarts_total", "counter",
                "Restarts of the program seen by the gateway (start time changed).", p.restarts,
                {"program": p.program})


def _bus_security(out: _Families, service: str, bus: Any) -> None:
    if not isinstance(bus, dict):
        return
    for name, key, help_text in (
        ("mlnode_bus_auth_failures_total", "auth_failures", "CURVE handshakes the service's ZAP refused."),
        ("mlnode_bus_auth_successes_total", "auth_successes", "CURVE handshakes the service admitted."),
    ):
        by_domain = bus.get(key)
        if isinstance(by_domain, dict):
            for domain, n in sorted(by_domain.items()):
                if _is_number(n):
                    out.add(name, "counter", help_text, n, {"service": service, "domain": str(domain)})
    if _is_number(bus.get("dropped_frames")):
        out.add("mlnode_bus_dropped_frames_total", "counter",
                "Bus frames the service dropped (malformed, oversized, expired, revoked key).",
                bus["dropped_frames"], {"service": service})


def _samples(out: _Families, rows: Any) -> None:
    """A service's own ``[name, kind, help, labels, value]`` rows; a malformed row is skipped."""
    for row in rows if isinstance(rows, list) else ():
        if not (isinstance(row, list | tuple) and len(row) == 5):
            continue
        name, kind, help_text, labels, value = row
        if (isinstance(name, str) and kind in ("counter", "gauge") and isinstance(help_text, str)
                and isinstance(labels, dict) and _is_number(value)):
            out.add(name, kind, help_text, value, {str(k): str(v) for k, v in labels.items()})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
