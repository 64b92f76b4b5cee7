"""The network's metrics schema v1 relayed from a real vLLM engine, and what state/versions say of it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from contracts import network_metrics as schema
from tests.support.waiting import wait_until
from tests.vllm.conftest import SERVED_NAME, Served

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
P0 = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
      "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
      "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total")


def test_vllm_families_are_relayed_with_the_served_name_and_replica(vllm_serving: Served) -> None:
    node = vllm_serving.node
    assert vllm_serving.chat([{"role": "user", "content": "ping"}], max_tokens=4).status == 200
    engine_text = vllm_serving.engine("GET", "/metrics").body.decode()
    capture = os.environ.get("MLNODE_CAPTURE_VLLM_METRICS")
    if capture:  # how tests/data/vllm_metrics.txt was made
        Path(capture).write_text(engine_text)

    def relayed() -> str:
        text = node.api("GET", "/api/v1/metrics").body.decode()
        return text if 'vllm:request_success_total{' in text and "vllm:time_to_first_token_seconds_bucket" \
            in text else ""

    text = wait_until(relayed, 60, 1.0)
    families = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert families <= set(schema.BY_NAME), families - set(schema.BY_NAME)
    assert set(P0) <= families, set(P0) - families
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if line.startswith("#") or not match or not match[1].startswith("vllm:"):
            continue
        labels = dict(LABEL.findall(match[2] or ""))
        assert labels["model_name"] == SERVED_NAME and labels["replica"] == "0" and "engine" not in labels
        assert not match[1].endswith("_created")
    assert "engine=" in engine_text and "_created" in engine_text  # what was dropped was there
    versions = node.api("GET", "/api/v1/versions").json()
    assert versions["vllm_version"].startswith("0.32") and versions["poc_validation_inference"] is True
    assert node.api("GET", "/api/v1/state").json()["poc_validation_inference"] is True
