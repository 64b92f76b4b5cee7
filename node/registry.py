"""The node's programs, in one place: what each is called, how supervisord runs it, which node state
it stands for, and which of its status fields it reports as metrics.

Everything that lists the services reads this table: the bus wiring (one endpoint per service), the
mode claim (the states a claim may name), the gateway (whom to ask, the state a service stands for,
what a scrape shows) and, checked by a unit test, ``supervisord.conf``. It is plain data so that
``node``, ``bus`` and every service can import it without importing one another.

A service turns its own ``status`` and ``metrics`` answers into samples (:func:`samples`, run inside
the service by :mod:`bus.service`); the gateway only adds them up with what it measures itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge"]
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
#: Where a number is read: the first key of a path is ``status`` (the service's status answer) or
#: ``values`` (its ``metrics`` answer); the rest walks nested objects.
Path = tuple[str, ...]


@dataclass(frozen=True)
class Metric:
    """One series read from a report: the first of ``paths`` that holds a finite number.

    ``flag`` metrics read a truth value and are always shown (1 or 0); counters end in ``_total``.
    """

    name: str
    kind: Kind
    help: str
    paths: tuple[Path, ...]
    flag: bool = False


@dataclass(frozen=True)
class Each:
    """The same metrics for every entry of a collection, labelled by the entry.

    A mapping labels each value by its key; a list labels each object by its ``key`` field. With
    ``passthrough`` set, the entry's field of that name is a ``{metric name: number}`` map exported as
    it is (an engine's own counters); metric paths are relative to the entry.
    """

    path: Path
    label: str
    metrics: tuple[Metric, ...] = ()
    key: str = ""
    passthrough: str = ""


@dataclass(frozen=True)
class Program:
    """A supervisord program; ``mode`` is the node state it stands for (None: not a service)."""

    name: str
    module: str
    mode: str | None = None
    metrics: tuple[Metric | Each, ...] = ()


@dataclass(frozen=True)
class Sample:
    name: str
    kind: Kind
    help: str
    labels: dict[str, str]
    value: float


def _counter(name: str, help_text: str, *path: str) -> Metric:
    return Metric(name, "counter", help_text, (path,))


def _gauge(name: str, help_text: str, *path: str) -> Metric:
    return Metric(name, "gauge", help_text, (path,))


POW = Program("pow", "services.pow", "POW", (
    _counter("mlnode_pow_nonces_computed_total", "Nonces evaluated in the current round.",
             "status", "nonces_computed"),
    _counter("mlnode_pow_valid_nonces_total", "Valid nonces (distance < r_target) found this round.",
             "status", "valid_found"),
    _counter("mlnode_pow_batches_validated_total", "Batches validated this round.",
             "status", "batches_validated"),
    _counter("mlnode_pow_nonces_validated_total", "Nonces recomputed to validate, this round.",
             "status", "nonces_validated"),
    _counter("mlnode_pow_fraud_detected_total", "Batches judged fraudulent this round.",
             "status", "fraud_detected"),
    _gauge("mlnode_pow_nonces_per_second", "Nonce rate of the current round.", "status", "nonces_per_second"),
    _gauge("mlnode_pow_validation_queue", "Batches waiting for validation.", "status", "validation_queue"),
    _gauge("mlnode_pow_outbox_pending_nonces", "Results waiting for delivery (nonces).",
           "status", "outbox", "pending"),
    _gauge("mlnode_pow_outbox_pending_batches", "Batches waiting for delivery.",
           "status", "outbox", "pending_units"),
    _counter("mlnode_pow_outbox_delivered_total", "Batches delivered to the callback URL.",
             "status", "outbox", "delivered"),
    _counter("mlnode_pow_outbox_sends_total", "Delivery attempts.", "status", "outbox", "sends"),
    _counter("mlnode_pow_outbox_delivery_failures_total", "Delivery attempts that failed.",
             "status", "outbox", "failures"),
    _counter("mlnode_pow_outbox_dead_total", "Batches the receiver refused for good (4xx).",
             "status", "outbox", "dead"),
    _gauge("mlnode_pow_outbox_dead_letters", "Dead letters held (GET /api/v1/pow/outbox/dead lists them).",
           "status", "outbox", "dead_letters"),
    _gauge("mlnode_pow_outbox_oldest_age_seconds", "Age of the oldest undelivered batch.",
           "status", "outbox", "oldest_age_s"),
    _gauge("mlnode_pow_outbox_last_success_timestamp_seconds", "When a delivery last succeeded.",
           "status", "outbox", "last_success_ts"),
    Each(("values", "poc_v2", "engines"), "engine_port", (
        Metric("mlnode_pocv2_generating", "gauge", "1 while the engine's PoC v2 generation loop runs.",
               (("generating",),)),
        _gauge("mlnode_pocv2_nonces_per_second", "Nonce rate of the engine's current PoC v2 loop.",
               "nonces_per_second"),
        _counter("mlnode_pocv2_nonces_generated_total",
                 "PoC v2 artifacts the generation loop produced (since pow started).",
                 "nonces_generated_total"),
        _counter("mlnode_pocv2_nonces_dropped_total", "PoC v2 nonces the engine dropped as non-finite.",
                 "nonces_dropped_total"),
        _counter("mlnode_pocv2_jobs_completed_total", "PoC v2 /generate jobs done.", "jobs_completed_total"),
        _counter("mlnode_pocv2_jobs_failed_total", "PoC v2 /generate jobs that failed.", "jobs_failed_total"),
        _counter("mlnode_pocv2_validations_total", "PoC v2 verdicts computed.", "validations_total"),
        _counter("mlnode_pocv2_fraud_detected_total", "PoC v2 verdicts with fraud_detected.",
                 "fraud_detected_total"),
        _gauge("mlnode_pocv2_jobs_queued", "PoC v2 jobs waiting for the engine.", "jobs_queued"),
        _gauge("mlnode_pocv2_queued_nonces", "Nonces of the PoC v2 jobs waiting (429 above 100000).",
               "queued_nonces"),
    )),
))

INFERENCE = Program("inference", "services.inference", "INFERENCE", (
    Each(("status", "instances"), "engine_instance", (
        Metric("mlnode_engine_instance_up", "gauge", "1 while the engine instance is healthy.",
               (("healthy",),), flag=True),
        _counter("mlnode_engine_instance_restarts_total",
                 "Times the inference service restarted the engine instance.", "restarts"),
    ), key="index"),
    Each(("values", "instances"), "engine_instance", key="index", passthrough="metrics"),
    _gauge("mlnode_model_downloads_active", "Model downloads running now (at most 3).",
           "values", "downloads", "active"),
    _counter("mlnode_model_downloads_completed_total", "Model downloads finished and verified.",
             "values", "downloads", "completed_total"),
    _counter("mlnode_model_downloads_failed_total", "Model downloads given up (missing repo, or every "
             "attempt failed).", "values", "downloads", "failed_total"),
    Each(("values", "downloads", "tasks"), "task_id", (
        _gauge("mlnode_model_download_bytes", "Bytes of the repo in the cache so far.", "downloaded_bytes"),
        _gauge("mlnode_model_download_attempt", "Which attempt the download is on.", "attempt"),
        _gauge("mlnode_model_download_elapsed_seconds", "Seconds since the download started.",
               "elapsed_seconds"),
    )),
))


def _progress(name: str, help_text: str, *keys: str) -> Metric:
    """Training progress, nested under ``progress`` or at the top of the status."""
    return Metric(name, "gauge", help_text,
                  tuple(("status", "progress", k) for k in keys) + tuple(("status", k) for k in keys))


TRAIN = Program("train", "services.train", "TRAIN", (
    _progress("mlnode_train_step", "Inner (optimizer) steps done in the current run.", "inner_step", "step"),
    _progress("mlnode_train_outer_step", "DiLoCo outer steps done in the current run.", "outer_step"),
    _progress("mlnode_train_total_steps", "Inner steps the run will take.", "total_steps"),
    _progress("mlnode_train_loss", "Training loss of the last inner step.", "loss_last", "loss"),
    _progress("mlnode_train_loss_ema", "Exponential moving average of the training loss.", "loss_ema"),
    _gauge("mlnode_train_waiting_for_quorum",
           "1 while this rank waits for a majority to decide a step.", "values", "waiting_for_quorum"),
    _counter("mlnode_train_bytes_sent_total", "Bytes this rank sent to its peers in the current run.",
             "values", "bytes_sent"),
    _counter("mlnode_train_bytes_received_total",
             "Bytes this rank received from its peers in the current run.", "values", "bytes_received"),
))

GATEWAY = Program("gateway", "services.gateway")

#: The services on the bus, each holding the node in its own mode.
SERVICES: tuple[Program, ...] = (POW, INFERENCE, TRAIN)
#: Every supervisord program.
PROGRAMS: tuple[Program, ...] = (GATEWAY, *SERVICES)
NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)
MODE_OF: dict[str, str] = {s.name: s.mode for s in SERVICES if s.mode}
SERVICE_OF: dict[str, str] = {mode: name for name, mode in MODE_OF.items()}
MODES: tuple[str, ...] = tuple(MODE_OF.values())
STOPPED = "STOPPED"
BY_NAME: dict[str, Program] = {p.name: p for p in PROGRAMS}


def samples(program: Program, report: Mapping[str, Any]) -> list[Sample]:
    """The samples ``program`` declares, read from ``{"status": …, "values": …}``; absent or
    non-numeric fields are skipped (a field that is null has nothing to show)."""
    out: list[Sample] = []
    for item in program.metrics:
        if isinstance(item, Metric):
            out.extend(_read(item, report, {}))
            continue
        for label, entry in _entries(item, _walk(report, item.path)):
            labels = {item.label: label}
            for metric in item.metrics:
                out.extend(_read(metric, entry, labels))
            passed = entry.get(item.passthrough) if item.passthrough else None
            if isinstance(passed, dict):
                for name, value in sorted(passed.items()):
                    if isinstance(name, str) and _METRIC_NAME.match(name) and _number(value):
                        kind: Kind = "counter" if name.endswith("_total") else "gauge"
                        out.append(Sample(name, kind, "Passed through from the engine's /metrics "
                                          "(summed over its labels).", labels, float(value)))
    return out


def _read(metric: Metric, source: Mapping[str, Any], labels: dict[str, str]) -> Iterator[Sample]:
    for path in metric.paths:
        value = _walk(source, path)
        if metric.flag:
            yield Sample(metric.name, metric.kind, metric.help, labels, float(bool(value)))
            return
        if _number(value):
            yield Sample(metric.name, metric.kind, metric.help, labels, float(value))
            return


def _entries(each: Each, found: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(found, dict):
        for key, entry in sorted(found.items()):
            if isinstance(entry, dict):
                yield str(key), entry
    elif isinstance(found, list):
        for entry in found:
            label = entry.get(each.key) if isinstance(entry, dict) else None
            if isinstance(entry, dict) and label is not None and (not each.metrics or _number(label)):
                yield str(label), entry


def _walk(source: Any, path: Path) -> Any:
    for key in path:
        if not isinstance(source, Mapping):
            return None
        source = source.get(key)
    return source


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
