"""pow's v2 counters as /metrics shows them: one sample per engine port, built by the pow service from
its own report (node.registry declares them) and rendered by the gateway unchanged."""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

from node import registry
from services.gateway.metrics import BusTimings, NodeView, ServiceView, render


def scrape(values: Any) -> str:
    rows = [list(astuple(s)) for s in registry.samples(registry.POW, {"status": {}, "values": values})]
    view = NodeView("1", "POW", {"pow": ServiceView({"active": True, "samples": rows}, 0.0, True)}, [])
    return render(view, BusTimings()).decode()


def test_pocv2_counters_per_engine_port() -> None:
    engine = {"generating": 1, "nonces_per_second": 12.5, "nonces_generated_total": 640,
              "nonces_dropped_total": 0, "jobs_completed_total": 2, "jobs_failed_total": 0,
              "validations_total": 1, "fraud_detected_total": 0, "jobs_queued": 3, "queued_nonces": 600}
    text = scrape({"poc_v2": {"engines": {"5001": engine, "5002": {"generating": 0}}}})
    assert 'mlnode_pocv2_generating{engine_port="5001"} 1.0' in text
    assert 'mlnode_pocv2_generating{engine_port="5002"} 0.0' in text
    assert 'mlnode_pocv2_nonces_generated_total{engine_port="5001"} 640.0' in text
    assert "# TYPE mlnode_pocv2_validations_total counter" in text
    assert 'mlnode_pocv2_queued_nonces{engine_port="5001"} 600.0' in text


def test_an_old_or_silent_pow_contributes_nothing() -> None:
    silent: list[dict[str, Any]] = [{}, {"poc_v2": None}, {"poc_v2": {"engines": []}}]
    for values in silent:
        assert "mlnode_pocv2" not in scrape(values)
