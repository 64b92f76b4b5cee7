"""What today's Network Node reads (network-node-today.md §1, §2, §4-§6), on the real node.

One node for the module, with ``MLNODE_API_TOKEN`` set: every request of the helper carries the token
(tests that check the refusals send their own headers), so the whole module also proves that a node
with a token works for a client that has it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import REPO, Node, request
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TOKEN = "s3cret-token-for-tests-0123456789"
SPEC = REPO.parent / "shared" / "spec" / "network-node-today.md"
SERVED = "net/tiny-model"
PING = {"model": SERVED, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("today")
    n = Node(root, MLNODE_API_TOKEN=TOKEN, HF_HOME=str(root / "hf")).start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def serving(node: Node) -> Iterator[Node]:
    """The node serving a model under the network's id (as the client's ``up`` asks for it)."""
    up = node.api("POST", "/api/v1/inference/up", {"model": "tiny-net", "dtype": "float16",
                                                   "additional_args": ["--served-model-name", SERVED,
                                                                       "--max-model-len", "512"]})
    assert up.status == 200, up.body
    yield node
    assert node.api("POST", "/api/v1/stop").status == 200


def allowlist() -> set[str]:
    """The family names of the schema page's §4, read as data."""
    text = SPEC.read_text()
    section = text.split("## 4.", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`((?:vllm:|mlnode_|gonka_)[a-z_:]+)", section))
    return names


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """TYPE per family and every sample (name, labels, value) of a 0.0.4 exposition."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples = []
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
        elif line.strip():
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)", line)
            assert match, line
            samples.append((match[1], dict(label.findall(match[2] or "")), float(match[3])))
    assert set(types) == helps, "every family has HELP and TYPE"
    return types, samples


def family_of(sample: str, types: dict[str, str]) -> str:
    for suffix in ("_bucket", "_sum", "_count", ""):
        base = sample.removesuffix(suffix) if suffix else sample
        if base in types and (suffix == "" or types[base] == "histogram"):
            return base
    raise AssertionError(f"sample {sample} has no family")


def test_state_and_versions_while_stopped(node: Node) -> None:
    state = node.api("GET", "/api/v1/state").json()
    assert state["state"] == "STOPPED" and isinstance(state["version"], str) and state["version"]
    assert {k: state[k] for k in ("poc_status", "inference_healthy", "loaded_model",
                                  "poc_validation_inference")} == {
        "poc_status": None, "inference_healthy": None, "loaded_model": None,
        "poc_validation_inference": False}
    versions = node.api("GET", "/api/v1/versions")
    assert (versions.status, versions.json()) == (200, {"version": state["version"], "vllm_version": None,
                                                        "poc_validation_inference": False})
    assert node.api("GET", "/api/v1/inference/pow/versions").status == 404


def test_clock_is_204_with_server_times_and_needs_no_token(node: Node) -> None:
    before = time.time_ns()
    resp = request(node.api_port, "GET", "/api/v1/clock")
    after = time.time_ns()
    assert resp.status == 204 and resp.body == b""
    recv, send = int(resp.headers["x-server-recv-ns"]), int(resp.headers["x-server-send-ns"])
    assert before <= recv <= send <= after
    for method in ("POST", "PUT", "DELETE"):
        assert request(node.api_port, method, "/api/v1/clock").status == 405


def test_token_is_required_on_both_ports_except_the_probes(node: Node) -> None:
    for port in (node.api_port, node.inference_port):
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            resp = request(port, "GET", "/api/v1/state" if port == node.api_port else "/v1/models",
                           headers=headers)
            assert resp.status == 401, (port, headers, resp.body)
            assert resp.json()["detail"] and resp.headers["www-authenticate"].startswith("Bearer")
    for path in ("/api/v1/stop", "/api/v1/models/list", "/metrics", "/api/v1/metrics", "/health",
                 "/v1/models"):
        assert request(node.api_port, "GET" if path != "/api/v1/stop" else "POST", path).status == 401, path
    assert request(node.api_port, "GET", "/livez").status == 200
    ready = request(node.api_port, "GET", "/readyz")
    assert (ready.status, ready.json()["ready"]) == (200, True)  # STOPPED is ready: liveness, not serving
    assert node.api("GET", "/api/v1/state").status == 200
    assert node.inference("GET", "/v1/models").status == 503  # through the token check, no engine yet


def test_the_management_port_proxies_the_engine_api_for_single_url_clients(node: Node) -> None:
    """STOPPED: the engine paths reach the proxy (503, no backend), not the management app (404)."""
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                         ("GET", "/version"), ("GET", "/v1/models")):
        resp = node.api(method, path, {} if method == "POST" else None)
        assert resp.status == 503 and "backend" in resp.json()["detail"], (path, resp.body)
    assert node.api("GET", "/collective_rpc").status == 404


def test_exit_78_when_the_engine_interpreter_has_no_vllm(tmp_path: Path) -> None:
    env = dict(os.environ, MLNODE_STATE_DIR=str(tmp_path / "s"), MLNODE_ENGINE="vllm",
               MLNODE_VLLM_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, "-m", "services.inference"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlnode inference: MLNODE_ENGINE=vllm but "), lines
    assert "cannot import vllm" in lines[0] and "MLNODE_ENGINE=cpu" in lines[0]


def test_state_versions_and_single_url_while_serving(serving: Node) -> None:
    node = serving
    state = node.api("GET", "/api/v1/state").json()
    assert state["state"] == "INFERENCE" and state["loaded_model"] == "tiny-net"
    assert state["poc_validation_inference"] is True and state["inference_healthy"] is True
    assert state["poc_status"] == "IDLE"
    assert node.api("GET", "/api/v1/versions").json()["poc_validation_inference"] is True
    # The pre-PoC self-test through one base URL: management port, no Content-Type.
    chat = node.api("POST", "/v1/chat/completions", PING)
    assert chat.status == 200 and chat.json()["choices"], chat.body
    tokens = node.api("POST", "/tokenize", {"model": SERVED, "prompt": "hello world"})
    assert tokens.status == 200 and tokens.json()["count"] >= 1
    assert node.api("GET", "/version").status == 200
    assert node.api("GET", "/v1/models").json()["data"][0]["id"] == SERVED
    for hidden in ("/collective_rpc", "/sleep", "/server_info", "/v1/../collective_rpc"):
        assert node.api("POST", hidden, {}).status in (404, 405), hidden
    assert node.api("GET", "/health").json()["status"] == "healthy"  # the node's own, not the engine's
    # The engine runs without usage reports.
    pids = node.engine_pids()
    assert pids and all(b"VLLM_NO_USAGE_STATS=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
                        for p in pids)


def test_state_answers_while_the_inference_process_is_frozen(serving: Node) -> None:
    """Nothing on /state's path waits for a service that does not answer: it says what the claim says."""
    pid = serving.pid("inference")
    os.kill(pid, signal.SIGSTOP)
    try:
        resp = serving.api("GET", "/api/v1/state", timeout=5)  # the client's own timeout
        assert resp.status == 200 and resp.json()["state"] == "INFERENCE"
        assert serving.api("GET", "/api/v1/versions", timeout=5).status == 200
    finally:
        os.kill(pid, signal.SIGCONT)


def test_network_metrics_are_the_schema_and_nothing_else(serving: Node) -> None:
    node = serving
    assert node.api("POST", "/v1/chat/completions", PING).status == 200

    def scraped() -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]], bytes] | None:
        resp = node.api("GET", "/api/v1/metrics")
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        types, samples = parse(resp.body.decode())
        names = {s[0] for s in samples}
        wanted = {"vllm:request_success_total", "mlnode_host_cpu_busy_ratio"}
        return (types, samples, resp.body) if wanted <= names else None

    types, samples, body = wait_until(scraped, 60, 0.5)
    allowed = allowlist()
    assert {"gonka_metrics_schema_info", "vllm:num_requests_running", "mlnode_gpu_xid_events_total",
            "mlnode_host_hf_cache_free_bytes"} <= allowed  # the page was read
    assert set(types) - allowed == set(), "families outside the schema"
    assert all(family_of(s[0], types) in allowed for s in samples)
    assert not any(s[0].endswith("_created") for s in samples)
    for name, kind in types.items():
        assert (kind == "counter") == name.endswith("_total") or kind == "histogram", (name, kind)
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in samples:
        by_name.setdefault(name, []).append((labels, value))
    assert by_name["gonka_metrics_schema_info"] == [({"version": "1"}, 1.0)]
    version = node.api("GET", "/api/v1/state").json()["version"]
    assert by_name["mlnode_version_info"] == [({"version": version}, 1.0)]
    (config, _), = by_name["mlnode_config_info"]
    assert config == {"model_name": SERVED, "dtype": "float16", "replicas": "1", "max_num_seqs": "",
                      "max_model_len": "512", "tensor_parallel_size": "", "pipeline_parallel_size": ""}
    stamps = by_name["mlnode_source_scrape_timestamp_seconds"]
    sources = {(lab["source"], lab.get("replica")) for lab, _ in stamps}
    assert sources == {("vllm", "0"), ("host", None)}  # no NVML on this host: no nvml source
    assert all(abs(v - time.time()) < 300 for _, v in by_name["mlnode_source_scrape_timestamp_seconds"])
    for name, rows in by_name.items():
        if name.startswith("vllm:"):
            for labels, _ in rows:
                assert labels["model_name"] == SERVED and labels["replica"] == "0" and "engine" not in labels
    assert sum(v for lab, v in by_name["vllm:request_success_total"]) >= 1
    assert not any(n.startswith("mlnode_gpu_") for n in by_name)  # no GPU: no series, never a zero
    assert 0 <= by_name["mlnode_host_cpu_busy_ratio"][0][1] <= 1
    assert by_name["mlnode_host_memory_used_bytes"][0][1] > 0
    assert by_name["mlnode_host_hf_cache_free_bytes"][0][1] > 0
    text = body.decode()
    state_dir = str(node.state_dir)
    assert state_dir not in text and "127.0.0.1" not in text and str(node.inference_port) not in text
    assert len(body) < 2 << 20 and len(samples) < 5000
    # The operator's own set stays on /metrics, and only there.
    operator = node.api("GET", "/metrics").body.decode()
    assert "mlnode_build_info" in operator and "mlnode_build_info" not in text
    start = [e for e in node.log_lines("inference") if e.get("event") == "network_metrics"]
    assert start and start[-1]["GONKA_METRICS"] == "full"


def test_a_failed_start_is_a_5xx_whose_first_4_kib_hold_the_engine_lines(node: Node, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "junk": "x" * 20000}))
    resp = node.api("POST", "/api/v1/inference/up", {"model": str(broken), "dtype": "auto",
                                                     "additional_args": []})
    try:
        assert resp.status == 503, resp.body
        assert len(resp.body) <= 4096
        detail: Any = resp.json()["detail"]
        assert "last log lines" in detail and "before serving" in detail
        assert node.api("GET", "/api/v1/inference/up/status").json()["status"] == "failed"
    finally:
        node.api("POST", "/api/v1/stop")
