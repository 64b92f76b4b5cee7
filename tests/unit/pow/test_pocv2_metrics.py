"""pow's v2 counters as the gateway exposes them on /metrics: one sample per engine port."""

from __future__ import annotations

from services.gateway.metrics import Exposition, _pocv2


def test_pocv2_counters_per_engine_port() -> None:
    out = Exposition()
    engine = {"generating": 1, "nonces_per_second": 12.5, "nonces_generated_total": 640,
              "nonces_dropped_total": 0, "jobs_completed_total": 2, "jobs_failed_total": 0,
              "validations_total": 1, "fraud_detected_total": 0, "jobs_queued": 3, "queued_nonces": 600}
    _pocv2(out, {"values": {"poc_v2": {"engines": {"5001": engine, "5002": {"generating": 0}}}}})
    text = out.render()
    assert 'mlnode_pocv2_generating{engine_port="5001"} 1' in text
    assert 'mlnode_pocv2_generating{engine_port="5002"} 0' in text
    assert 'mlnode_pocv2_nonces_generated_total{engine_port="5001"} 640' in text
    assert "# TYPE mlnode_pocv2_validations_total counter" in text
    assert 'mlnode_pocv2_queued_nonces{engine_port="5001"} 600' in text


def test_an_old_or_silent_pow_contributes_nothing() -> None:
    for metrics in ({}, {"values": None}, {"values": {"poc_v2": {"engines": []}}}):
        out = Exposition()
        _pocv2(out, metrics)
        assert "mlnode_pocv2" not in out.render()
