"""Metrics: the text format, timings shared by workers, restart counting, and a scrape with services down."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import config
from node.errors import Unavailable
from services.gateway.metrics import (
    BUCKETS,
    BusTimings,
    Exposition,
    MeasuredServices,
    NodeView,
    ProcessView,
    Series,
    ServiceView,
    Timings,
    render,
)
from services.gateway.resources.metrics import Metrics, count_restarts

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
SAMPLE = re.compile(rf"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{(?:{LABEL},?)*\}})? (\S+)$")


def parse(text: str) -> dict[str, float]:
    """Strict enough a reader of format 0.0.4: every line is a comment, or a well-formed sample."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
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
    s = MeasuredServices(config.load({"MLNODE_STATE_DIR": str(tmp_path / "state")}))
    yield s
    s.close()


def test_exposition_groups_families_and_escapes_labels() -> None:
    out = Exposition()
    out.add("m_total", "counter", "Help with \\ and\nnewline.", 3, {"a": 'q"uo\\te\nx'})
    out.add("g", "gauge", "A gauge.", float("nan"))
    out.add("m_total", "counter", "ignored second help", 4.5, {"a": "b"})
    out.histogram("h_seconds", "Hist.", {"k": "v"}, (0.1, 1.0), (2, 1), 4.2, 4)
    assert out.render().splitlines() == [
        "# HELP m_total Help with \\\\ and\\nnewline.",
        "# TYPE m_total counter",
        'm_total{a="q\\"uo\\\\te\\nx"} 3',
        'm_total{a="b"} 4.5',
        "# HELP g A gauge.",
        "# TYPE g gauge",
        "g NaN",
        "# HELP h_seconds Hist.",
        "# TYPE h_seconds histogram",
        'h_seconds_bucket{k="v",le="0.1"} 2',
        'h_seconds_bucket{k="v",le="1.0"} 3',
        'h_seconds_bucket{k="v",le="+Inf"} 4',
        'h_seconds_sum{k="v"} 4.2',
        'h_seconds_count{k="v"} 4',
    ]
    with pytest.raises(ValueError):
        out.add("bad name", "gauge", "x", 1)


def test_render_maps_what_the_services_report() -> None:
    pow_status = {"active": True, "status": "GENERATING", "nonces_computed": 1200, "valid_found": 7,
                  "nonces_per_second": 55.5, "batches_validated": 2, "nonces_validated": 40,
                  "fraud_detected": 1, "validation_queue": 0,
                  "outbox": {"pending": 3, "pending_units": 1, "delivered": 9, "sends": 12, "failures": 3,
                             "dead": 0, "oldest_age_s": 4.5, "last_success_ts": None, "running": True}}
    bus = {"auth_failures": {"local": 2}, "auth_successes": {"local": 5}, "dropped_frames": 4}
    inference_status = {"active": False, "instances": [{"index": 0, "healthy": True, "restarts": 2},
                                                       {"index": 1, "healthy": False, "restarts": 0}]}
    inference_metrics = {"bus": bus, "values": {"instances": [
        {"index": 0, "metrics": {"vllm:request_success_total": 17.0, "vllm:num_requests_running": 1.0,
                                 "bad name": 1.0, "vllm:prompt_tokens_total": "x"}}]}}
    timings = Timings()
    timings.series[("pow", "status")] = series = Series()
    series.observe(0.002)
    series.observe(100.0)
    timings.failures[("train", "status", "timeout")] = 2
    view = NodeView(
        version="9.9.9", state="POW",
        services={
            "pow": ServiceView(pow_status, {"bus": bus, "values": {}}, 0.0, True),
            "inference": ServiceView(inference_status, inference_metrics, 12.5, False),
            "train": None,
        },
        processes=[ProcessView("gateway", True, 1000.0, 0), ProcessView("pow", False, 1010.0, 3)],
        timings=timings,
    )
    m = parse(render(view))
    assert m['mlnode_build_info{version="9.9.9"}'] == 1
    assert m['mlnode_node_state{state="POW"}'] == 1 and m['mlnode_node_state{state="STOPPED"}'] == 0
    assert m['mlnode_service_up{service="pow"}'] == 1
    assert m['mlnode_service_up{service="inference"}'] == 0 and m['mlnode_service_up{service="train"}'] == 0
    assert m['mlnode_metrics_age_seconds{service="inference"}'] == 12.5
    assert 'mlnode_metrics_age_seconds{service="train"}' not in m
    assert m["mlnode_pow_nonces_computed_total"] == 1200 and m["mlnode_pow_valid_nonces_total"] == 7
    assert m["mlnode_pow_fraud_detected_total"] == 1 and m["mlnode_pow_batches_validated_total"] == 2
    assert m["mlnode_pow_outbox_pending_nonces"] == 3 and m["mlnode_pow_outbox_delivery_failures_total"] == 3
    assert "mlnode_pow_outbox_last_success_timestamp_seconds" not in m  # null: nothing to show
    assert m['mlnode_bus_auth_failures_total{service="pow",domain="local"}'] == 2
    assert m['mlnode_bus_dropped_frames_total{service="inference"}'] == 4
    assert m['mlnode_engine_instance_up{engine_instance="0"}'] == 1
    assert m['mlnode_engine_instance_up{engine_instance="1"}'] == 0
    assert m['mlnode_engine_instance_restarts_total{engine_instance="0"}'] == 2
    assert m['vllm:request_success_total{engine_instance="0"}'] == 17
    assert not any(k.startswith(("bad", "vllm:prompt")) for k in m)
    assert m['mlnode_process_running{program="pow"}'] == 0
    assert m['mlnode_process_restarts_total{program="pow"}'] == 3
    assert m['mlnode_bus_request_duration_seconds_bucket{service="pow",kind="status",le="0.0025"}'] == 1
    assert m['mlnode_bus_request_duration_seconds_bucket{service="pow",kind="status",le="60.0"}'] == 1
    assert m['mlnode_bus_request_duration_seconds_bucket{service="pow",kind="status",le="+Inf"}'] == 2
    assert m['mlnode_bus_request_duration_seconds_count{service="pow",kind="status"}'] == 2
    assert m['mlnode_bus_request_failures_total{service="train",kind="status",reason="timeout"}'] == 2


def test_render_reads_training_progress_when_present() -> None:
    train = {"active": True, "progress": {"inner_step": 120, "outer_step": 2, "total_steps": 6000,
                                          "loss_last": 3.25, "loss_ema": None}}
    view = NodeView("1", "TRAIN", {"train": ServiceView(train, {}, 0.0, True)}, [], Timings())
    m = parse(render(view))
    assert (m["mlnode_train_step"], m["mlnode_train_outer_step"], m["mlnode_train_loss"]) == (120, 2, 3.25)
    assert "mlnode_train_loss_ema" not in m


def test_timings_of_all_workers_add_up_and_dead_workers_are_folded(tmp_path: Path) -> None:
    directory = tmp_path / "gm"
    first, second = BusTimings(directory), BusTimings(directory)
    first.observe("pow", "status", 0.004, None)
    second.observe("pow", "status", 0.2, None)
    second.observe("pow", "init", 3.0, "timeout")
    first.flush()
    second.flush()
    merged = first.merged()
    assert merged.series[("pow", "status")].count == 2
    assert merged.series[("pow", "status")].counts[BUCKETS.index(0.005)] == 1
    assert merged.failures == {("pow", "init", "timeout"): 1}

    # A worker that died (its pid is gone) leaves its file; the next worker folds it into the retired file.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_file = directory / f"timings-{int(dead.stdout)}-1.json"
    dead_file.write_text(json.dumps(Timings.from_json(json.loads(second.path.read_text())).to_json()))
    second.path.unlink()
    third = BusTimings(directory)
    third.flush()
    assert not dead_file.exists() and (directory / "timings-retired.json").exists()
    again = third.merged()
    assert again.series[("pow", "status")].count == 2 and again.failures == {("pow", "init", "timeout"): 1}
    (directory / "timings-99-2.json").write_text("{torn")
    assert third.merged().series[("pow", "status")].count == 2


def test_restarts_are_counted_once_per_new_start_and_reset_with_supervisord(tmp_path: Path) -> None:
    assert count_restarts(tmp_path, 10, {"pow": 100.0, "train": 100.0}) == {"pow": 0, "train": 0}
    assert count_restarts(tmp_path, 10, {"pow": 100.0, "train": 100.0}) == {"pow": 0, "train": 0}
    assert count_restarts(tmp_path, 10, {"pow": 130.0, "train": 100.0}) == {"pow": 1, "train": 0}
    assert count_restarts(tmp_path, 10, {"pow": 150.0, "train": 100.0}) == {"pow": 2, "train": 0}
    assert count_restarts(tmp_path, 11, {"pow": 200.0, "train": 200.0}) == {"pow": 0, "train": 0}


async def test_a_bus_request_to_a_dead_service_is_timed_and_counted(services: MeasuredServices) -> None:
    with pytest.raises(Unavailable):
        await services.call("pow", "status", timeout=0.2)
    assert services.timings.mine.series[("pow", "status")].count == 1
    assert services.timings.mine.failures == {("pow", "status", "unreachable"): 1}


@pytest.mark.timeout(20)
async def test_a_scrape_answers_fast_when_every_service_is_down(services: MeasuredServices) -> None:
    """Nothing listens: each service costs one short deadline, in parallel; last answers are still shown."""
    other_worker = Metrics(services)
    other_worker._remember("pow", {"time": time.time() - 30,
                                   "status": {"active": False, "nonces_computed": 5},
                                   "metrics": {"bus": {"dropped_frames": 1}}})
    scrape = Metrics(services)
    started = time.perf_counter()
    text = await scrape.scrape()
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, elapsed
    m = parse(text)
    assert m['mlnode_service_up{service="pow"}'] == 0 and m['mlnode_service_up{service="train"}'] == 0
    assert 29 < m['mlnode_metrics_age_seconds{service="pow"}'] < 40
    assert m["mlnode_pow_nonces_computed_total"] == 5
    assert m['mlnode_bus_dropped_frames_total{service="pow"}'] == 1
    assert 'mlnode_metrics_age_seconds{service="train"}' not in m
    assert m['mlnode_node_state{state="STOPPED"}'] == 1
    assert not any(k.startswith("mlnode_process_") for k in m)  # no supervisord here
    assert m['mlnode_bus_request_failures_total{service="train",kind="status",reason="unreachable"}'] == 1
