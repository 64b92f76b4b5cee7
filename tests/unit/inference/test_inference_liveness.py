"""Hang judgement from observed progress: busy engines live, stuck ones are caught within the window."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import config
from node.errors import ConfigError
from services.inference.liveness import Liveness, Observation, Timing, parse_metrics

HANG_ENV = "MLNODE_ENGINE_HANG_SECONDS"

METRICS = """\
# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
vllm:request_success_total{finished_reason="stop",model_name="m"} 4.0
vllm:request_success_total{finished_reason="length",model_name="m {x}"} 2.0
mlnode_engine_iterations_total{model_name="m"} 17
process_start_time_seconds 1.7e9
broken_line{model_name="m"}
nan_value NaN
"""


def metrics(iterations: float, running: float) -> dict[str, float]:
    return {"mlnode_engine_iterations_total": iterations, "vllm:num_requests_running": running}


def test_parse_metrics_sums_label_sets_and_skips_junk() -> None:
    parsed = parse_metrics(METRICS)
    assert parsed["vllm:num_requests_running"] == 3.0
    assert parsed["vllm:request_success_total"] == 6.0
    assert parsed["mlnode_engine_iterations_total"] == 17.0
    assert parsed["process_start_time_seconds"] == 1.7e9
    assert "broken_line" not in parsed and "nan_value" not in parsed


def test_timing_scales_with_the_window() -> None:
    assert Timing.for_window(60) == Timing(60, 5.0, 10.0)
    short = Timing.for_window(4)
    assert short.poll_s == pytest.approx(0.4) and short.probe_timeout_s == pytest.approx(1.0)


def test_hang_window_from_the_environment(tmp_path: Path) -> None:
    def hang_window(env: dict[str, str]) -> float:
        return config.load({"MLNODE_STATE_DIR": str(tmp_path), **env}).engine_hang_s

    assert hang_window({}) == 60.0
    assert hang_window({HANG_ENV: " 7.5 "}) == 7.5
    for bad in ("abc", "0", "-3", "inf", "nan"):
        with pytest.raises(ConfigError, match=HANG_ENV):
            hang_window({HANG_ENV: bad})


def test_saturated_engine_with_moving_counters_is_never_hung() -> None:
    live = Liveness(Timing(10, 1, 2), now=0)
    for t in range(1, 60):
        # /health times out every time (the engine is flat out) but the model keeps stepping.
        live.observe(Observation(health_ok=False, metrics=metrics(t * 5, running=64)), now=t)
        assert not live.hung(t), live.reason
        assert live.healthy(t)


def test_stalled_engine_with_running_requests_is_hung_after_the_window() -> None:
    live = Liveness(Timing(10, 1, 2), now=0)  # serving since t=0, no progress seen after
    for t in range(1, 10):
        live.observe(Observation(True, metrics(100, running=2)), now=t)
        assert not live.hung(t)
    live.observe(Observation(True, metrics(100, running=2)), now=10)
    assert live.hung(10)
    assert "2 requests running but no progress" in live.reason


def test_idle_engine_with_frozen_counters_is_fine() -> None:
    live = Liveness(Timing(10, 1, 2), now=0)
    for t in range(1, 100):
        live.observe(Observation(True, metrics(42, running=0)), now=t)
        assert not live.hung(t)


def test_unresponsive_engine_is_hung_and_unhealthy() -> None:
    live = Liveness(Timing(10, 1, 2), now=0)
    live.observe(Observation(True, metrics(1, running=0)), now=1)
    for t in range(2, 11):
        live.observe(Observation(False, None), now=t)
        assert not live.hung(t)
    assert not live.healthy(10)  # out of rotation well before it is declared hung
    live.observe(Observation(False, None), now=11)
    assert live.hung(11)
    assert "no answer from /health" in live.reason


def test_broken_metrics_alone_do_not_make_a_hang() -> None:
    live = Liveness(Timing(10, 1, 2), now=0)
    live.observe(Observation(True, metrics(5, running=3)), now=1)
    for t in range(2, 40):
        live.observe(Observation(True, None), now=t)  # /metrics fails, /health answers
        assert not live.hung(t)
