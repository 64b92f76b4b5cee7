"""The network's schema v1 from a real vLLM 0.32 exposition (captured from the vLLM tier's engine):
what is relayed, how it is relabelled, and the answer's size with several instances and GPUs."""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from contracts import network_metrics as schema
from contracts.network_metrics import Gpu, Host, Nvml, Replica, Snapshot
from services.gateway.network_metrics import clean_label, render
from services.inference.network_metrics import config_labels, relay
from services.inference.up_request import UpRequest

CAPTURE = (Path(__file__).resolve().parents[2] / "data" / "vllm_metrics_0.32_cpu.txt").read_text()
SERVED = "Qwen/Qwen3-235B-A22B"


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def test_relay_keeps_the_schema_families_with_the_served_name_and_drops_the_rest() -> None:
    relayed = relay(CAPTURE, SERVED)
    names = {r.name for r in relayed}
    assert names == set(schema.VLLM_BY_BASE)  # vLLM 0.32 writes every family of the schema
    for family in relayed:
        for sample in family.samples:
            assert sample.labels["model_name"] == SERVED and "engine" not in sample.labels
            assert not sample.name.endswith("_created")
    assert "vllm:estimated_flops_per_gpu" in families(CAPTURE)  # there, and not relayed
    assert "vllm:estimated_flops_per_gpu" not in names


def test_relay_of_garbage_is_nothing() -> None:
    assert relay("vllm:num_requests_running{engine=\"0\" 1\n#", SERVED) == []
    assert relay("", SERVED) == []


def snapshot(replicas: int, gpus: int) -> Snapshot:
    now = time.time()
    relayed = relay(CAPTURE, SERVED)
    values = {key: 1.0 for key in schema.GPU_KEYS}
    return Snapshot(
        config=config_labels(UpRequest(SERVED, "auto", ("--tensor-parallel-size", "1")), replicas),
        vllm=[Replica(replica=str(i), scraped_at=now, families=relayed) for i in range(replicas)],
        nvml=Nvml(scraped_at=now, xid=[("0", "79", 2.0)],
                  gpus=[Gpu(str(i), "NVIDIA H100 80GB HBM3", dict(values)) for i in range(gpus)]),
        host=Host(scraped_at=now, values={key: 1.0 for key in schema.HOST_KEYS}))


def test_eight_instances_and_eight_gpus_fit_the_federation_limits() -> None:
    body = render("1.2.3", snapshot(8, 8))
    text = body.decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    print(f"network metrics, 8 replicas + 8 GPUs: {len(body)} bytes, {len(samples)} series")
    assert len(body) < 2 << 20 and len(samples) < 5000
    types = dict(line.split(" ")[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    helps = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# HELP ")}
    assert set(types) == helps and set(types) <= set(schema.BY_NAME)
    assert set(types) >= {f.name for f in schema.NODE_FAMILIES + schema.GPU_FAMILIES + schema.HOST_FAMILIES}
    for name, kind in types.items():
        assert kind == schema.BY_NAME[name].kind, name
    assert 'mlnode_gpu_xid_events_total{gpu_index="0",xid="79"} 2.0' in text
    replicas = set(re.findall(r'replica="(\d+)"', text))
    assert replicas == {str(i) for i in range(8)}
    assert 'gonka_metrics_schema_info{version="1"} 1.0' in text
    assert ('mlnode_config_info{dtype="auto",max_model_len="",max_num_seqs="",'
            'model_name="Qwen/Qwen3-235B-A22B",pipeline_parallel_size="",replicas="8",'
            'tensor_parallel_size="1"} 1.0') in text


def test_without_the_inference_service_only_the_node_families_remain() -> None:
    text = render("1.2.3", None).decode()
    assert [line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")] == [
        "gonka_metrics_schema_info", "mlnode_version_info"]


def test_label_values_never_carry_paths_addresses_or_ports() -> None:
    for leaked in ("/root/.cache/huggingface/hub/models--x/snapshots/abc", "~/models/x", "./x", "C:\\m",
                   "http://10.0.0.5:8000", "10.0.0.5", "::1", "[fe80::1]", "gpu-host:5001", "localhost:8080"):
        assert clean_label(leaked) == "", leaked
    for kept in ("Qwen/Qwen3-8B", "auto", "NVIDIA H100 80GB HBM3", "0", "+Inf", "stop", "1.5"):
        assert clean_label(kept) == kept
    snap = Snapshot(config={"model_name": "/data/models/secret", "dtype": "auto", "replicas": "1"})
    assert "/data/models" not in render("1", snap).decode()


def test_config_labels_are_what_the_up_said() -> None:
    req = UpRequest("m", "float16", ("--max-num-seqs=64", "-tp", "4", "--pipeline_parallel_size", "2",
                                     "--max-model-len", "8k", "--served-model-name", "net/id"))
    assert config_labels(req, 2) == {"model_name": "net/id", "dtype": "float16", "replicas": "2",
                                     "max_num_seqs": "64", "max_model_len": "8k", "tensor_parallel_size": "4",
                                     "pipeline_parallel_size": "2"}
    assert config_labels(UpRequest("m", "auto", ("--dtype", "bfloat16")), 1)["dtype"] == "bfloat16"
