"""Prometheus metrics of the node: the text format, bus latency histograms, and what a scrape shows.

No client library: the text format (0.0.4) is a few lines, and what it needs beyond that is specific
to this gateway. gunicorn runs several workers and a scrape lands on any one of them, so per-worker
numbers alone would make counters jump between scrapes. Each worker therefore writes its bus timings
to ``$MLNODE_STATE_DIR/run/gateway-metrics/timings-<pid>-<start>.json`` (at most once a second) and a
scrape sums every worker's file; files of dead workers are folded into ``timings-retired.json`` so
counters never go backwards and the directory stays small.

:func:`render` turns one :class:`NodeView` (what the services, supervisord and the timings said) into
the exposition text; it is pure so that its mapping can be tested without processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import DeadlineExceeded, Unavailable
from node.files import atomic_write_json
from node.logging import get_logger
from node.mode import MODES, STOPPED
from services.gateway.services import Services

log = get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Bus latency buckets (seconds): sub-millisecond status calls up to blocking starts.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FLUSH_INTERVAL_S = 1.0
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Labels = Mapping[str, str]


# --- the text format -----------------------------------------------------------------------------

def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def valid_metric_name(name: str) -> bool:
    return bool(_METRIC_NAME.match(name))


@dataclass
class _Family:
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


class Exposition:
    """Samples grouped into families (HELP and TYPE once each), rendered in insertion order."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help_text: str, value: float, labels: Labels | None = None,
            *, suffix: str = "") -> None:
        if not valid_metric_name(name):
            raise ValueError(f"invalid metric name {name!r}")
        family = self._families.setdefault(name, _Family(kind, help_text))
        family.samples.append((name + suffix, dict(labels or {}), value))

    def histogram(self, name: str, help_text: str, labels: Labels, buckets: Iterable[float],
                  counts: Iterable[int], total: float, count: int) -> None:
        """One labelled histogram series; ``counts`` are per bucket (not cumulative), +Inf implied."""
        running = 0
        for bound, n in zip(buckets, counts, strict=True):
            running += n
            self.add(name, "histogram", help_text, running, {**labels, "le": format_value(bound)},
                     suffix="_bucket")
        self.add(name, "histogram", help_text, count, {**labels, "le": "+Inf"}, suffix="_bucket")
        self.add(name, "histogram", help_text, total, labels, suffix="_sum")
        self.add(name, "histogram", help_text, count, labels, suffix="_count")

    def render(self) -> str:
        lines: list[str] = []
        for name, family in self._families.items():
            help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {family.kind}")
            for sample, labels, value in family.samples:
                text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items() if _LABEL_NAME.match(k))
                lines.append(f"{sample}{{{text}}} {format_value(value)}" if text
                             else f"{sample} {format_value(value)}")
        return "\n".join(lines) + "\n"


# --- bus timings, shared by the gateway's workers -------------------------------------------------

@dataclass
class Series:
    """One histogram series: per-bucket counts (the last one is +Inf), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))
        self.counts[index] += 1
        self.total += seconds
        self.count += 1

    def merge(self, other: Series) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count


@dataclass
class Timings:
    """Bus request durations by (service, kind), and bus failures by (service, kind, reason)."""

    series: dict[tuple[str, str], Series] = field(default_factory=dict)
    failures: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def merge(self, other: Timings) -> None:
        for key, series in other.series.items():
            self.series.setdefault(key, Series()).merge(series)
        for fkey, n in other.failures.items():
            self.failures[fkey] = self.failures.get(fkey, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "series": [[s, k, v.counts, v.total, v.count] for (s, k), v in self.series.items()],
            "failures": [[s, k, r, n] for (s, k, r), n in self.failures.items()],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Timings:
        """Parse a worker file; anything malformed is skipped (a torn file must not break a scrape)."""
        out = cls()
        if not isinstance(doc, dict):
            return out
        for row in doc.get("series", []):
            with contextlib.suppress(TypeError, ValueError):
                service, kind, counts, total, count = row
                if len(counts) == len(BUCKETS) + 1:
                    out.series[(str(service), str(kind))] = Series([int(c) for c in counts], float(total),
                                                                   int(count))
        for row in doc.get("failures", []):
            with contextlib.suppress(TypeError, ValueError):
                service, kind, reason, n = row
                out.failures[(str(service), str(kind), str(reason))] = int(n)
        return out


class BusTimings:
    """This worker's timings, flushed to its own file; :meth:`merged` reads every worker's."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.mine = Timings()
        self.path = directory / f"timings-{os.getpid()}-{time.time_ns()}.json"
        self._last_flush = 0.0
        self._flush_scheduled = False
        self._folded = False
        self._save_failed = False

    def observe(self, service: str, kind: str, seconds: float, failure: str | None) -> None:
        self.mine.series.setdefault((service, kind), Series()).observe(seconds)
        if failure is not None:
            key = (service, kind, failure)
            self.mine.failures[key] = self.mine.failures.get(key, 0) + 1
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        wait = self._last_flush + FLUSH_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.flush()
            return
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_scheduled = True
        loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Write this worker's totals (atomically); a full or read-only disk only costs freshness."""
        self._flush_scheduled = False
        self._last_flush = time.monotonic()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._folded:
                self._fold_dead_workers()
                self._folded = True
            _write_json(self.path, self.mine.to_json())
            self._save_failed = False
        except OSError as exc:
            if not self._save_failed:  # once per outage: a full disk must not flood the log
                log.warning("metrics_timings_not_saved", path=str(self.path), error=str(exc))
            self._save_failed = True

    def merged(self) -> Timings:
        """Every worker's timings summed (this worker's from memory, the others' from their files).

        Flushes first: a scrape on another worker then sees at least what this scrape showed, so no
        counter goes back between scrapes that land on different workers. Call it on the event loop
        (not in a thread): ``observe`` mutates the same dicts.
        """
        self.flush()
        total = Timings()
        total.merge(self.mine)
        with contextlib.suppress(OSError), self._locked(fcntl.LOCK_SH):  # never mid-fold
            for path in self.directory.glob("timings-*.json"):
                if path != self.path:
                    total.merge(Timings.from_json(_read_json(path)))
        return total

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fd = os.open(self.directory / "timings.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _fold_dead_workers(self) -> None:
        """Fold files of workers that no longer run into the retired file, once, under the lock."""
        with self._locked(fcntl.LOCK_EX):
            retired_path = self.directory / "timings-retired.json"
            retired = Timings.from_json(_read_json(retired_path))
            dead = [p for p in self.directory.glob("timings-*-*.json") if not _alive(_pid_of(p))]
            if not dead:
                return
            for path in dead:
                retired.merge(Timings.from_json(_read_json(path)))
            _write_json(retired_path, retired.to_json())
            for path in dead:
                path.unlink(missing_ok=True)


def _pid_of(path: Path) -> int:
    parts = path.stem.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, doc: Any) -> None:
    try:
        atomic_write_json(path, doc, durable=False)
    except Unavailable as exc:
        raise OSError(exc.message) from None


class MeasuredServices(Services):
    """:class:`Services` that times every bus request into a :class:`BusTimings`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timings = BusTimings(self.settings.run_dir / "gateway-metrics")

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
        except Unavailable as exc:
            failure = "unreachable" if "not reachable" in exc.message else None
            raise
        except asyncio.CancelledError:
            failure = "cancelled"
            raise
        finally:
            self.timings.observe(service, kind, time.perf_counter() - started, failure)


# --- what a scrape shows ----------------------------------------------------------------------------

@dataclass
class ServiceView:
    """What one service said (``status`` and ``metrics``), and how old that is."""

    status: dict[str, Any]
    metrics: dict[str, Any]
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
    timings: Timings
    scrape_seconds: float = 0.0


def render(view: NodeView) -> str:
    out = Exposition()
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
                int(bool(sv.status.get("active"))), labels)
        _bus_security(out, service, sv.metrics.get("bus"))
    pow_view, inference_view, train_view = (view.services.get(s) for s in ("pow", "inference", "train"))
    if pow_view is not None:
        _pow(out, pow_view.status)
        _pocv2(out, pow_view.metrics)
    if inference_view is not None:
        _inference(out, inference_view)
    if train_view is not None:
        _train(out, train_view.status)
    _bus_timings(out, view.timings)
    out.add("mlnode_metrics_scrape_duration_seconds", "gauge", "Time this scrape took to gather.",
            round(view.scrape_seconds, 6))
    return out.render()


def _processes(out: Exposition, processes: list[ProcessView]) -> None:
    for p in processes:
        labels = {"program": p.program}
        out.add("mlnode_process_running", "gauge", "1 when supervisord reports the program RUNNING.",
                int(p.running), labels)
    for p in processes:
        out.add("mlnode_process_start_time_seconds", "gauge", "When supervisord last started the program.",
                p.start_time, {"program": p.program})
    for p in processes:
        out.add("mlnode_process_restarts_total", "counter",
                "Restarts of the program seen by the gateway (start time changed).", p.restarts,
                {"program": p.program})


def _bus_security(out: Exposition, service: str, bus: Any) -> None:
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


_POW_COUNTERS = (
    ("nonces_computed", "mlnode_pow_nonces_computed_total", "Nonces evaluated in the current round."),
    ("valid_found", "mlnode_pow_valid_nonces_total", "Valid nonces (distance < r_target) found this round."),
    ("batches_validated", "mlnode_pow_batches_validated_total", "Batches validated this round."),
    ("nonces_validated", "mlnode_pow_nonces_validated_total", "Nonces recomputed to validate, this round."),
    ("fraud_detected", "mlnode_pow_fraud_detected_total", "Batches judged fraudulent this round."),
)
_OUTBOX = (
    ("pending", "mlnode_pow_outbox_pending_nonces", "gauge", "Results waiting for delivery (nonces)."),
    ("pending_units", "mlnode_pow_outbox_pending_batches", "gauge", "Batches waiting for delivery."),
    ("delivered", "mlnode_pow_outbox_delivered_total", "counter", "Batches delivered to the callback URL."),
    ("sends", "mlnode_pow_outbox_sends_total", "counter", "Delivery attempts."),
    ("failures", "mlnode_pow_outbox_delivery_failures_total", "counter", "Delivery attempts that failed."),
    ("dead", "mlnode_pow_outbox_dead_total", "counter", "Batches the receiver refused for good (4xx)."),
    ("oldest_age_s", "mlnode_pow_outbox_oldest_age_seconds", "gauge", "Age of the oldest undelivered batch."),
    ("last_success_ts", "mlnode_pow_outbox_last_success_timestamp_seconds", "gauge",
     "When a delivery last succeeded."),
)


def _pow(out: Exposition, status: dict[str, Any]) -> None:
    for key, name, help_text in _POW_COUNTERS:
        if _is_number(status.get(key)):
            out.add(name, "counter", help_text, status[key])
    if _is_number(status.get("nonces_per_second")):
        out.add("mlnode_pow_nonces_per_second", "gauge", "Nonce rate of the current round.",
                status["nonces_per_second"])
    if _is_number(status.get("validation_queue")):
        out.add("mlnode_pow_validation_queue", "gauge", "Batches waiting for validation.",
                status["validation_queue"])
    outbox = status.get("outbox")
    if isinstance(outbox, dict):
        for key, name, kind, help_text in _OUTBOX:
            if _is_number(outbox.get(key)):
                out.add(name, kind, help_text, outbox[key])


_POCV2 = (
    ("generating", "mlnode_pocv2_generating", "gauge", "1 while the engine's PoC v2 generation loop runs."),
    ("nonces_per_second", "mlnode_pocv2_nonces_per_second", "gauge",
     "Nonce rate of the engine's current PoC v2 loop."),
    ("nonces_generated_total", "mlnode_pocv2_nonces_generated_total", "counter",
     "PoC v2 artifacts the generation loop produced (since pow started)."),
    ("nonces_dropped_total", "mlnode_pocv2_nonces_dropped_total", "counter",
     "PoC v2 nonces the engine dropped as non-finite."),
    ("jobs_completed_total", "mlnode_pocv2_jobs_completed_total", "counter", "PoC v2 /generate jobs done."),
    ("jobs_failed_total", "mlnode_pocv2_jobs_failed_total", "counter", "PoC v2 /generate jobs that failed."),
    ("validations_total", "mlnode_pocv2_validations_total", "counter", "PoC v2 verdicts computed."),
    ("fraud_detected_total", "mlnode_pocv2_fraud_detected_total", "counter",
     "PoC v2 verdicts with fraud_detected."),
    ("jobs_queued", "mlnode_pocv2_jobs_queued", "gauge", "PoC v2 jobs waiting for the engine."),
    ("queued_nonces", "mlnode_pocv2_queued_nonces", "gauge",
     "Nonces of the PoC v2 jobs waiting (429 above 100000)."),
)


def _pocv2(out: Exposition, metrics: dict[str, Any]) -> None:
    """Per engine port, from the pow service's own metrics report."""
    values = metrics.get("values")
    pocv2 = values.get("poc_v2") if isinstance(values, dict) else None
    engines = pocv2.get("engines") if isinstance(pocv2, dict) else None
    if not isinstance(engines, dict):
        return
    for key, name, kind, help_text in _POCV2:
        for port, counters in sorted(engines.items()):
            if isinstance(counters, dict) and _is_number(counters.get(key)):
                out.add(name, kind, help_text, counters[key], {"engine_port": str(port)})


def _inference(out: Exposition, view: ServiceView) -> None:
    """Instances from ``status``; the engines' own counters from ``metrics`` values, per instance."""
    instances = view.status.get("instances")
    if isinstance(instances, list):
        for inst in instances:
            if not isinstance(inst, dict) or not _is_number(inst.get("index")):
                continue
            labels = {"engine_instance": str(inst["index"])}
            out.add("mlnode_engine_instance_up", "gauge", "1 while the engine instance is healthy.",
                    int(bool(inst.get("healthy"))), labels)
            if _is_number(inst.get("restarts")):
                out.add("mlnode_engine_instance_restarts_total", "counter",
                        "Times the inference service restarted the engine instance.", inst["restarts"],
                        labels)
    values = view.metrics.get("values")
    engines = values.get("instances") if isinstance(values, dict) else None
    if not isinstance(engines, list):
        return
    for inst in engines:
        if not isinstance(inst, dict) or not isinstance(inst.get("metrics"), dict):
            continue
        labels = {"engine_instance": str(inst.get("index", "?"))}
        for name, value in sorted(inst["metrics"].items()):
            if isinstance(name, str) and valid_metric_name(name) and _is_number(value):
                kind = "counter" if name.endswith("_total") else "gauge"
                out.add(name, kind, "Passed through from the engine's /metrics (summed over its labels).",
                        value, labels)


def _train(out: Exposition, status: dict[str, Any]) -> None:
    nested = status.get("progress")
    progress: dict[str, Any] = nested if isinstance(nested, dict) else status
    for keys, name, help_text in (
        (("inner_step", "step"), "mlnode_train_step", "Inner (optimizer) steps done in the current run."),
        (("outer_step",), "mlnode_train_outer_step", "DiLoCo outer steps done in the current run."),
        (("total_steps",), "mlnode_train_total_steps", "Inner steps the run will take."),
        (("loss_last", "loss"), "mlnode_train_loss", "Training loss of the last inner step."),
        (("loss_ema",), "mlnode_train_loss_ema", "Exponential moving average of the training loss."),
    ):
        value = next((progress[k] for k in keys if _is_number(progress.get(k))), None)
        if value is not None:
            out.add(name, "gauge", help_text, value)


def _bus_timings(out: Exposition, timings: Timings) -> None:
    for (service, kind), series in sorted(timings.series.items()):
        out.histogram("mlnode_bus_request_duration_seconds",
                      "Bus request round trips measured in the gateway, by service and request kind.",
                      {"service": service, "kind": kind}, BUCKETS, series.counts[:-1],
                      series.total, series.count)
    for (service, kind, reason), n in sorted(timings.failures.items()):
        out.add("mlnode_bus_request_failures_total", "counter",
                "Bus requests that got no answer (timeout, unreachable, cancelled).", n,
                {"service": service, "kind": kind, "reason": reason})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
