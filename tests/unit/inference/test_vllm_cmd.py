"""Engine command lines, parallelism parsing and GPU planning, pinned exactly."""

from __future__ import annotations

import pytest

from node.errors import InvalidRequest
from services.inference.vllm_cmd import (
    cpu_engine_command,
    parse_parallelism,
    plan_instances,
    take_logprobs_mode,
    visible_gpus,
    vllm_command,
)

CLIENT_EXAMPLE = [
    "--quantization", "fp8",
    "--tensor-parallel-size", "4",
    "--pipeline-parallel-size", "2",
    "--kv-cache-dtype", "fp8",
    "--gpu-memory-utilization", "0.9",
]  # fmt: skip
VLLM = ["/py", "-m", "vllm.entrypoints.openai.api_server"]
#: The node loads its plugin's worker extension (PoC hooks) into every vLLM worker, and runs vLLM with
#: processed logprobs (the plugin picks each request's mode).
EXT = ("--worker-extension-cls", "services.inference.vllm_plugin.worker.MLNodeWorkerExtension",
       "--logprobs-mode", "processed_logprobs")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], (1, 1)),
        (CLIENT_EXAMPLE, (4, 2)),
        (["--tensor-parallel-size=2", "--pipeline-parallel-size=3"], (2, 3)),
        (["-tp", "8"], (8, 1)),
        (["-tp=2", "-pp=2"], (2, 2)),
        (["-pp", "4"], (1, 4)),
        (["--tensor_parallel_size", "2", "--pipeline_parallel_size=2"], (2, 2)),
        (["-tp", "2", "--tensor-parallel-size", "4", "-tp=8"], (8, 1)),
        (["--max-model-len", "4", "--seed", "2"], (1, 1)),
    ],
)
def test_parse_parallelism(args: list[str], expected: tuple[int, int]) -> None:
    assert parse_parallelism(args) == expected


@pytest.mark.parametrize(
    "args",
    [["-tp", "0"], ["-tp", "two"], ["--tensor-parallel-size"], ["-pp=-1"], ["-pp", "1.5"], ["-tp="]],
)
def test_parse_parallelism_rejects_bad_values(args: list[str]) -> None:
    with pytest.raises(InvalidRequest, match="must be a positive integer"):
        parse_parallelism(args)


def test_plan_instances() -> None:
    gpus = [str(i) for i in range(8)]
    assert plan_instances(gpus, 1, 1) == [[g] for g in gpus]
    assert plan_instances(gpus, 4, 2) == [gpus]
    assert plan_instances(gpus, 2, 1) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert plan_instances(gpus, 3, 1) == [["0", "1", "2"], ["3", "4", "5"]]  # spare GPUs stay idle
    assert plan_instances(["0", "1"], 4, 1) == [["0", "1"]]  # at least one instance
    assert plan_instances([], 1, 1) == [[]]
    with pytest.raises(InvalidRequest):
        plan_instances(gpus, 0, 1)


def test_visible_gpus() -> None:
    assert visible_gpus({}, 4) == ["0", "1", "2", "3"]
    assert visible_gpus({}, 0) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, 8) == ["2", "3"]
    uuids = "GPU-1b2c3d4e-aaaa-bbbb-cccc-000000000001, MIG-5f6a7b8c-0000-1111-2222-333333333333"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": uuids}, 2) == [u.strip() for u in uuids.split(",")]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, 4) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, 4) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,-1,2"}, 4) == ["0", "1"]


def test_vllm_command_float16_and_auto() -> None:
    assert vllm_command("Qwen/Qwen3-8B", "float16", [], 5001, python="/py") == [
        *VLLM, "--model", "Qwen/Qwen3-8B", "--host", "127.0.0.1", "--port", "5001", "--dtype", "float16",
        *EXT,
    ]  # fmt: skip
    assert vllm_command("m", "auto", [], 5002, host="0.0.0.0", python="/py") == [
        *VLLM, "--model", "m", "--host", "0.0.0.0", "--port", "5002", "--dtype", "auto", *EXT,
    ]  # fmt: skip


def test_vllm_command_client_example_is_verbatim() -> None:
    cmd = vllm_command("Qwen/QwQ-32B", "float16", CLIENT_EXAMPLE, 5001, python="/py")
    assert cmd == [
        *VLLM, "--model", "Qwen/QwQ-32B", "--host", "127.0.0.1", "--port", "5001", "--dtype", "float16",
        *EXT,
        *CLIENT_EXAMPLE,
    ]  # fmt: skip


def test_node_owns_host_port_model_and_args_own_dtype() -> None:
    extra = ["--port", "9999", "--host=0.0.0.0", "--dtype", "bfloat16", "--model=/other", "--seed", "3"]
    assert vllm_command("m", "float16", extra, 5003, python="/py") == [
        *VLLM, "--model", "m", "--host", "127.0.0.1", "--port", "5003", *EXT,
        "--dtype", "bfloat16", "--seed", "3",
    ]  # fmt: skip
    assert vllm_command("m", "auto", ["--dtype=half"], 5003, python="/py")[-1] == "--dtype=half"
    assert vllm_command("m", "auto", ["--dtype=half"], 5003, python="/py").count("auto") == 0


def test_cpu_engine_command() -> None:
    assert cpu_engine_command("m", "auto", CLIENT_EXAMPLE, 5001, python="/py") == [
        "/py", "-m", "services.inference.cpu_engine",
        "--model", "m", "--host", "127.0.0.1", "--port", "5001", "--dtype", "auto",
        "--logprobs-mode", "processed_logprobs", *CLIENT_EXAMPLE,
    ]  # fmt: skip
    raw = cpu_engine_command("m", "auto", [], 5001, python="/py", logprobs_mode="raw_logprobs")
    assert raw[-2:] == ["--logprobs-mode", "raw_logprobs"]


@pytest.mark.parametrize(("args", "left", "mode"), [
    ([], [], "processed_logprobs"),
    (["--seed", "1", "--logprobs-mode", "raw_logprobs"], ["--seed", "1"], "raw_logprobs"),
    (["--logprobs-mode=raw_logprobs", "--logprobs_mode", "processed_logprobs"], [], "processed_logprobs"),
])
def test_the_default_logprobs_mode_comes_from_the_args_or_the_node(args: list[str], left: list[str],
                                                                    mode: str) -> None:
    assert take_logprobs_mode(args, "processed_logprobs") == (left, mode)
    assert take_logprobs_mode([], "raw_logprobs") == ([], "raw_logprobs")


@pytest.mark.parametrize("args", [["--logprobs-mode", "raw_logits"], ["--logprobs-mode"]])
def test_a_logprobs_mode_the_network_does_not_use_is_refused(args: list[str]) -> None:
    with pytest.raises(InvalidRequest, match="logprobs-mode must be one of"):
        take_logprobs_mode(args, "processed_logprobs")
