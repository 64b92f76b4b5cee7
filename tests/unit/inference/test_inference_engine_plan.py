"""Engine choice, instance plans (GPU blocks, ports, env) and the CPU stand-in models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.errors import ConfigError, InvalidRequest
from services.inference.engine_plan import CPU, VLLM, choose_engine, plan_cpu, plan_vllm
from services.inference.tiny_models import cache_dir, requested_positions, seed_for, tiny_model
from services.inference.up_request import UpRequest


def test_auto_picks_vllm_only_with_gpus_and_the_package() -> None:
    assert choose_engine("auto", gpu_count=2, has_vllm=True) is VLLM
    assert choose_engine("auto", gpu_count=0, has_vllm=True) is CPU
    assert choose_engine("auto", gpu_count=8, has_vllm=False) is CPU
    assert choose_engine("cpu", gpu_count=8, has_vllm=True) is CPU
    assert choose_engine("vllm", gpu_count=0, has_vllm=False) is VLLM
    with pytest.raises(ConfigError, match="MLNODE_ENGINE"):
        choose_engine("tgi")


def test_vllm_one_instance_per_block_of_the_visible_gpus() -> None:
    req = UpRequest("Qwen/Qwen2.5-7B-Instruct", "float16",
                    ("--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.9"))
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7,1", "PATH": "/bin"}
    plans = plan_vllm(req, 5000, env, detected_gpus=8)
    assert [(p.index, p.port, p.gpus) for p in plans] == [(0, 5001, ("4", "5")), (1, 5002, ("6", "7"))]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["4,5", "6,7"]
    assert plans[1].env["PATH"] == "/bin"
    argv = plans[1].argv
    assert argv[1:3] == ("-m", "vllm.entrypoints.openai.api_server")
    assert argv[argv.index("--port") + 1] == "5002" and argv[argv.index("--model") + 1] == req.model
    assert argv[-4:] == ("--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.9")  # verbatim
    assert plans[0].url == "http://127.0.0.1:5001"


def test_vllm_bad_parallel_size_is_a_bad_request() -> None:
    with pytest.raises(InvalidRequest, match="tensor-parallel-size"):
        plan_vllm(UpRequest("m", "auto", ("--tensor-parallel-size", "zero")), 5000, {}, 4)


def test_vllm_ports_must_fit() -> None:
    with pytest.raises(ConfigError, match="INFERENCE_PORT"):
        plan_vllm(UpRequest("m"), 65535, {}, 1)


def test_cpu_engine_serves_a_stand_in_under_the_requested_name(tmp_path: Path) -> None:
    req = UpRequest("Qwen/Qwen2.5-7B-Instruct", "float16", ("--max-num-seqs", "8"))
    [plan] = plan_cpu(req, tmp_path, 5000, {"CUDA_VISIBLE_DEVICES": "0"})
    argv = list(plan.argv)
    assert argv[1:3] == ["-m", "services.inference.cpu_engine"]
    assert argv[argv.index("--model") + 1] == str(tmp_path)
    assert argv[argv.index("--served-model-name") + 1] == "Qwen/Qwen2.5-7B-Instruct"
    assert plan.port == 5001 and plan.env["CUDA_VISIBLE_DEVICES"] == ""
    # A directory is served as itself; a name the client chose itself is kept.
    [plan] = plan_cpu(UpRequest(str(tmp_path)), None, 5000, {})
    assert "--served-model-name" not in plan.argv
    own = UpRequest("x", "auto", ("--served-model-name", "mine"))
    [plan] = plan_cpu(own, tmp_path, 5000, {})
    assert plan.argv.count("--served-model-name") == 1 and "mine" in plan.argv


def test_stand_in_seed_positions_and_cache_path(tmp_path: Path) -> None:
    assert seed_for("Qwen/Qwen2.5-7B-Instruct") == seed_for("Qwen/Qwen2.5-7B-Instruct") != seed_for("Qwen/x")
    assert 0 <= seed_for("a") < 2**63
    assert requested_positions(()) == 2048
    assert requested_positions(("--max-model-len", "32768")) == 32768
    assert requested_positions(("--max_model_len=4K",)) == 4096
    assert requested_positions(("--max-model-len", "1k")) == 2048
    assert requested_positions(("--max-model-len", "lots")) == 2048
    path = cache_dir("../../etc/passwd", tmp_path, 2048)
    assert path.parent == tmp_path and "/" not in path.name


@pytest.mark.timeout(120)
async def test_stand_in_is_built_once_and_is_deterministic(tmp_path: Path) -> None:
    first = await tiny_model("Qwen/Qwen2.5-7B-Instruct", tmp_path / "a")
    other = await tiny_model("Qwen/Qwen2.5-7B-Instruct", tmp_path / "b")
    assert json.loads((first / "config.json").read_text())["max_position_embeddings"] == 2048
    assert (first / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    weights = first / "model.safetensors"
    built = weights.stat()
    assert await tiny_model("Qwen/Qwen2.5-7B-Instruct", tmp_path / "a") == first
    again = weights.stat()
    assert (again.st_ino, again.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)  # cached: no rebuild
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".build")]


def test_vllm_on_a_cpu_host_gets_its_interpreter_dev_mode_kv_cache_and_the_plugin() -> None:
    env = {"MLNODE_VLLM_PYTHON": "/opt/vllm/bin/python"}
    [plan] = plan_vllm(UpRequest("m", "auto", ("--enforce-eager",)), 5000, env, detected_gpus=0)
    assert plan.argv[:3] == ("/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server")
    ext = plan.argv.index("--worker-extension-cls")
    assert plan.argv[ext + 1] == "services.inference.vllm_plugin.worker.MLNodeWorkerExtension"
    assert plan.argv[-1] == "--enforce-eager"
    assert plan.env["VLLM_SERVER_DEV_MODE"] == "1" and plan.env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # An operator's own sizes and extension class are kept; GPU hosts get no CPU cache setting.
    own = ("--worker-extension-cls=my.Ext",)
    [plan] = plan_vllm(UpRequest("m", "auto", own), 5000, {"VLLM_CPU_KVCACHE_SPACE": "4"}, detected_gpus=0)
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert [a for a in plan.argv if "worker-extension" in a] == ["--worker-extension-cls=my.Ext"]
    [plan] = plan_vllm(UpRequest("m"), 5000, {}, detected_gpus=1)
    assert "VLLM_CPU_KVCACHE_SPACE" not in plan.env and plan.env["CUDA_VISIBLE_DEVICES"] == "0"


def test_vllm_runs_the_plugins_sampler_setup_with_the_default_mode() -> None:
    """The V1 model runner and engine-wide processed logprobs (what the plugin is written for); the
    request default travels to the plugin in the environment, from the node or the up request."""
    [plan] = plan_vllm(UpRequest("m"), 5000, {}, detected_gpus=0)
    mode = plan.argv.index("--logprobs-mode")
    assert plan.argv[mode + 1] == "processed_logprobs" and plan.argv.count("--logprobs-mode") == 1
    assert plan.env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert plan.env["MLNODE_LOGPROBS_MODE"] == "processed_logprobs"
    [plan] = plan_vllm(UpRequest("m"), 5000, {}, detected_gpus=0, logprobs_mode="raw_logprobs")
    assert plan.env["MLNODE_LOGPROBS_MODE"] == "raw_logprobs"
    [plan] = plan_vllm(UpRequest("m", "auto", ("--logprobs-mode", "raw_logprobs")), 5000, {}, detected_gpus=0)
    assert plan.env["MLNODE_LOGPROBS_MODE"] == "raw_logprobs" and plan.argv.count("--logprobs-mode") == 1
    assert plan.argv[plan.argv.index("--logprobs-mode") + 1] == "processed_logprobs"
    [plan] = plan_cpu(UpRequest("m", "auto", ("--logprobs-mode=raw_logprobs",)), None, 5000, {})
    assert plan.argv[-2:] == ("--logprobs-mode", "raw_logprobs")
def test_engines_get_an_explicit_environment(tmp_path: Path) -> None:
    """What vLLM, torch and the hub read, plus the operator's names; never the node's own settings or
    anything else the node's environment holds."""
    node_env = {"PATH": "/usr/bin", "HOME": "/root", "LC_ALL": "C.UTF-8", "HF_TOKEN": "hf_x",
                "HF_HOME": "/cache", "VLLM_LOGGING_LEVEL": "INFO", "NCCL_DEBUG": "WARN",
                "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "0", "MLNODE_STATE_DIR": "/state", "MLNODE_API_PORT": "8080",
                "AWS_SECRET_ACCESS_KEY": "aws", "DATABASE_URL": "postgres://u:p@h/db", "VLLM_API_KEY": "lock",
                "PROMETHEUS_MULTIPROC_DIR": "/run/m", "MY_LICENSE": "x"}
    [cpu] = plan_cpu(UpRequest("m"), tmp_path, 5000, node_env, passed=("MY_LICENSE",))
    [gpu] = plan_vllm(UpRequest("m"), 5000, node_env, detected_gpus=0)
    for env in (cpu.env, gpu.env):
        assert {"PATH", "HOME", "LC_ALL", "HF_TOKEN", "HF_HOME", "NCCL_DEBUG", "OMP_NUM_THREADS"} <= set(env)
        assert not {"MLNODE_STATE_DIR", "MLNODE_API_PORT", "AWS_SECRET_ACCESS_KEY", "DATABASE_URL",
                    "VLLM_API_KEY", "PROMETHEUS_MULTIPROC_DIR"} & set(env)
    assert cpu.env["MY_LICENSE"] == "x" and "MY_LICENSE" not in gpu.env
    assert gpu.env["VLLM_LOGGING_LEVEL"] == "INFO" and gpu.env["VLLM_SERVER_DEV_MODE"] == "1"
