"""Metrics: what a scrape shows, timings shared by workers (prometheus_client multiprocess mode),
restart counting, and a scrape with services down."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest

from node import config, registry
from node.errors import Unavailable
from node.identity import ensure_node_keys
from services.gateway import metrics as gateway_metrics
from services.gateway.metrics import (
    RESERVED_BYTES,
    BusTimings,
    MeasuredServices,
    NodeView,
    ProcessView,
    ServiceView,
    render,
)
from services.gateway.resources.metrics import Metrics, count_restarts

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
SAMPLE = re.compile(rf"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{(?:{LABEL},?)*\}})? (\S+)$")


def parse(text: str | bytes) -> dict[str, float]:
    """Strict enough a reader of format 0.0.4: every line is a comment, or a well-formed sample."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in (text.decode() if isinstance(text, bytes) else text).splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"TYPE twice for {name}"
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.match(line)
        assert match, line
        key = match.group(1) + (match.group(2) or "")
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(match.group(3))
    return samples


@pytest.fixture
def services(tmp_path: Path) -> Iterator[MeasuredServices]:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path / "state")})
    ensure_node_keys(settings.keys_dir)  # what `mlnode up` does before the gateway starts
    s = MeasuredServices(settings)
    yield s
    s.close()


def answer(program: registry.Program, status: dict[str, Any], values: dict[str, Any] | None = None,
           bus: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a service's ``metrics`` handler answers (bus.service builds its samples the same way)."""
    rows = [list(astuple(x)) for x in registry.samples(program, {"status": status, "values": values or {}})]
    return {"active": status.get("active", False), "bus": bus or {}, "samples": rows}


def test_render_shows_the_node_and_what_the_services_report() -> None:
    pow_status = {"active": True, "nonces_computed": 1200, "valid_found": 7,
                  "outbox": {"pending": 3, "failures": 3, "last_success_ts": None}}
    bus = {"auth_failures": {"local": 2}, "auth_successes": {"local": 5}, "dropped_frames": 4}
    inference = answer(registry.INFERENCE, {"instances": [{"index": 0, "healthy": True, "restarts": 2}]},
                       bus=bus)
    inference["samples"].append(["bad name", "gauge", "x", {}, 1.0])  # skipped, never breaks the scrape
    view = NodeView(
        version="9.9.9", state="POW",
        services={
            "pow": ServiceView(answer(registry.POW, pow_status, bus=bus), 0.0, True),
            "inference": ServiceView(inference, 12.5, False),
            "train": None,
        },
        processes=[ProcessView("gateway", True, 1000.0, 0), ProcessView("pow", False, 1010.0, 3)],
    )
    m = parse(render(view, BusTimings()))
    assert m['mlnode_build_info{version="9.9.9"}'] == 1
    assert m['mlnode_node_state{state="POW"}'] == 1 and m['mlnode_node_state{state="STOPPED"}'] == 0
    assert m['mlnode_service_up{service="pow"}'] == 1 and m['mlnode_service_active{service="pow"}'] == 1
    assert m['mlnode_service_up{service="inference"}'] == 0 and m['mlnode_service_up{service="train"}'] == 0
    assert m['mlnode_metrics_age_seconds{service="inference"}'] == 12.5
    assert 'mlnode_metrics_age_seconds{service="train"}' not in m
    assert m["mlnode_pow_nonces_computed_total"] == 1200 and m["mlnode_pow_valid_nonces_total"] == 7
    assert m["mlnode_pow_outbox_pending_nonces"] == 3 and m["mlnode_pow_outbox_delivery_failures_total"] == 3
    assert "mlnode_pow_outbox_last_success_timestamp_seconds" not in m  # null: nothing to show
    assert m['mlnode_bus_auth_failures_total{domain="local",service="pow"}'] == 2
    assert m['mlnode_bus_dropped_frames_total{service="inference"}'] == 4
    assert m['mlnode_engine_instance_up{engine_instance="0"}'] == 1
    assert m['mlnode_engine_instance_restarts_total{engine_instance="0"}'] == 2
    assert not any(k.startswith("bad") for k in m)
    assert m['mlnode_process_running{program="pow"}'] == 0
    assert m['mlnode_process_restarts_total{program="pow"}'] == 3


def test_each_service_reports_the_fields_the_registry_declares() -> None:
    def values(program: registry.Program, status: dict[str, Any], vals: dict[str, Any]) -> dict[str, float]:
        return {x.name + str(sorted(x.labels.items())): x.value
                for x in registry.samples(program, {"status": status, "values": vals})}

    status = {"batches_validated": 2, "nonces_per_second": 55.5, "fraud_detected": True}
    pow_values = values(registry.POW, status,
                        {"poc_v2": {"engines": {"5001": {"nonces_generated_total": 9, "generating": 1}}}})
    assert pow_values["mlnode_pow_batches_validated_total[]"] == 2
    assert pow_values["mlnode_pow_nonces_per_second[]"] == 55.5
    assert "mlnode_pow_fraud_detected_total[]" not in pow_values  # a truth value is not a count
    assert pow_values["mlnode_pocv2_nonces_generated_total[('engine_port', '5001')]"] == 9
    engines = {"instances": [{"index": 0, "metrics": {"vllm:request_success_total": 17.0, "bad name": 1.0,
                                                      "vllm:prompt_tokens_total": "x"}}]}
    inference = values(registry.INFERENCE, {"instances": [{"index": 1, "healthy": False}]}, engines)
    assert inference == {"mlnode_engine_instance_up[('engine_instance', '1')]": 0.0,
                         "vllm:request_success_total[('engine_instance', '0')]": 17.0}
    nested = {"progress": {"inner_step": 120, "outer_step": 2, "loss_last": 3.25, "loss_ema": None}}
    assert values(registry.TRAIN, nested, {}) == {
        "mlnode_train_step[]": 120, "mlnode_train_outer_step[]": 2, "mlnode_train_loss[]": 3.25}
    assert values(registry.TRAIN, {"step": 5, "loss": 1.5}, {}) == {"mlnode_train_step[]": 5,
                                                                   "mlnode_train_loss[]": 1.5}
    reported = {"waiting_for_quorum": 1, "bytes_sent": 4096, "bytes_received": 2048}  # train's own metrics()
    assert values(registry.TRAIN, {}, reported) == {"mlnode_train_waiting_for_quorum[]": 1,
                                                   "mlnode_train_bytes_sent_total[]": 4096,
                                                   "mlnode_train_bytes_received_total[]": 2048}


WORKER = """
import sys
from services.gateway.metrics import BusTimings, multiprocess_dir
timings = BusTimings(multiprocess_dir())
for seconds in map(float, sys.argv[1:]):
    timings.observe("pow", "status", seconds, "timeout" if seconds > 1 else None)
"""
SCRAPE = """
from services.gateway.metrics import BusTimings, NodeView, multiprocess_dir, render
print(render(NodeView("1", "STOPPED", {}, []), BusTimings(multiprocess_dir())).decode(), end="")
"""


def in_worker(directory: Path, code: str, *args: str) -> str:
    """A fresh process with the multiprocess dir set (prometheus_client reads it at import)."""
    env = {**os.environ, gateway_metrics.MULTIPROCESS_DIR_ENV: str(directory)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          check=True, cwd=Path(registry.__file__).parent.parent).stdout


def test_timings_of_every_worker_add_up_dead_ones_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prometheus"
    in_worker(directory, WORKER, "0.002", "0.2")
    in_worker(directory, WORKER, "3.0")
    files = sorted(directory.glob("*.db"))
    assert files and all(f.stat().st_blocks * 512 >= RESERVED_BYTES for f in files)  # space reserved
    m = parse(in_worker(directory, SCRAPE))
    assert m['mlnode_bus_request_duration_seconds_count{kind="status",service="pow"}'] == 3
    assert m['mlnode_bus_request_duration_seconds_bucket{kind="status",le="0.0025",service="pow"}'] == 1
    assert m['mlnode_bus_request_duration_seconds_bucket{kind="status",le="+Inf",service="pow"}'] == 3
    assert m['mlnode_bus_request_failures_total{kind="status",reason="timeout",service="pow"}'] == 1
    monkeypatch.setenv(gateway_metrics.MULTIPROCESS_DIR_ENV, str(directory))
    gateway_metrics.reset_multiprocess_dir()  # a new gateway starts from zero
    assert not list(directory.glob("*.db"))


FULL_DISK = """
import errno, os
def full(*_args):
    raise OSError(errno.ENOSPC, "No space left on device")
os.posix_fallocate = full
""" + WORKER


def test_a_worker_that_cannot_reserve_its_files_records_nothing_and_scrapes_answer(tmp_path: Path) -> None:
    """A write into a memory-mapped file the disk has no room for kills the worker (SIGBUS)."""
    directory = tmp_path / "prometheus"
    in_worker(directory, WORKER, "0.002")
    in_worker(directory, FULL_DISK, "0.002", "0.2")
    assert len(list(directory.glob("*.db"))) == 2  # the first worker's only
    m = parse(in_worker(directory, SCRAPE))
    assert m['mlnode_bus_request_duration_seconds_count{kind="status",service="pow"}'] == 1


def test_restarts_are_counted_once_per_new_start_and_reset_with_supervisord(tmp_path: Path) -> None:
    assert count_restarts(tmp_path, 10, {"pow": 100.0, "train": 100.0}) == {"pow": 0, "train": 0}
    assert count_restarts(tmp_path, 10, {"pow": 100.0, "train": 100.0}) == {"pow": 0, "train": 0}
    assert count_restarts(tmp_path, 10, {"pow": 130.0, "train": 100.0}) == {"pow": 1, "train": 0}
    assert count_restarts(tmp_path, 10, {"pow": 150.0, "train": 100.0}) == {"pow": 2, "train": 0}
    assert count_restarts(tmp_path, 11, {"pow": 200.0, "train": 200.0}) == {"pow": 0, "train": 0}


def test_restarts_are_still_counted_when_the_disk_refuses_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.gateway.resources import metrics as resource

    assert count_restarts(tmp_path, 10, {"pow": 100.0}) == {"pow": 0}

    def full(*_args: Any, **_kwargs: Any) -> None:
        raise Unavailable("cannot write restarts.json (state directory): No space left on device")

    monkeypatch.setattr(resource, "atomic_write_json", full)
    assert count_restarts(tmp_path, 10, {"pow": 130.0}) == {"pow": 1}
    assert count_restarts(tmp_path, 10, {"pow": 130.0}) == {"pow": 1}  # seen again, counted once


async def test_a_bus_request_to_a_dead_service_is_timed_and_counted(services: MeasuredServices) -> None:
    key = 'mlnode_bus_request_failures_total{kind="status",reason="unreachable",service="pow"}'
    before = parse(render(NodeView("1", "STOPPED", {}, []), services.timings)).get(key, 0)
    with pytest.raises(Unavailable):
        await services.call("pow", "status", timeout=0.2)
    assert parse(render(NodeView("1", "STOPPED", {}, []), services.timings))[key] == before + 1


@pytest.mark.timeout(20)
async def test_a_scrape_answers_fast_when_every_service_is_down(
    services: MeasuredServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens: each service costs one short deadline, in parallel; last answers are still shown."""
    other_worker = Metrics(services)
    last = answer(registry.POW, {"active": False, "nonces_computed": 5}, bus={"dropped_frames": 1})
    other_worker._remember("pow", {"time": time.time() - 30, "answer": last})
    asking, most = set(), 0
    call = services.call

    async def counted(service: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal most
        asking.add(service)
        most = max(most, len(asking))
        try:
            return await call(service, *args, **kwargs)
        finally:
            asking.discard(service)

    monkeypatch.setattr(services, "call", counted)
    scrape = Metrics(services)
    text = await asyncio.wait_for(scrape.scrape(), 10)
    assert most >= 2, most  # the services' deadlines ran side by side, not one after another
    m = parse(text)
    assert m['mlnode_service_up{service="pow"}'] == 0 and m['mlnode_service_up{service="train"}'] == 0
    assert 29 < m['mlnode_metrics_age_seconds{service="pow"}'] < 40
    assert m["mlnode_pow_nonces_computed_total"] == 5
    assert m['mlnode_bus_dropped_frames_total{service="pow"}'] == 1
    assert 'mlnode_metrics_age_seconds{service="train"}' not in m
    assert m['mlnode_node_state{state="STOPPED"}'] == 1
    assert not any(k.startswith("mlnode_process_") for k in m)  # no supervisord here
    assert m['mlnode_bus_request_failures_total{kind="metrics",reason="unreachable",service="train"}'] >= 1
