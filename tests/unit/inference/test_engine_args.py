"""The engine-argument policy: the network's own configurations pass, everything that loads code, touches
host paths, opens listeners or carries secrets is refused with a 400 naming the flag, and only the
operator's settings loosen it. (That each accepted flag means what the policy thinks is proven with
vLLM's own parser in ``tests/vllm/test_engine_args_vllm.py``.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node import config
from node.errors import ConfigError, InvalidRequest
from services.inference.engine_args import FLAGS, REASONS, EnginePolicy
from services.inference.manager import EngineManager
from services.inference.up_request import UpRequest
from tests.support.network_configs import NETWORK_CONFIGS

ROOT = Path("/srv/models")
POLICY = EnginePolicy(model_roots=(ROOT,))

def vet(args: list[str], model: str = "org/model", policy: EnginePolicy = POLICY) -> tuple[str, ...]:
    return policy.vet(UpRequest(model, "auto", tuple(args))).additional_args


def refusal(args: list[str], model: str = "org/model", policy: EnginePolicy = POLICY) -> str:
    with pytest.raises(InvalidRequest) as caught:
        vet(args, model, policy)
    return caught.value.message


@pytest.mark.parametrize(("model", "args"), NETWORK_CONFIGS, ids=[m for m, _ in NETWORK_CONFIGS])
def test_the_networks_own_configurations_pass_unchanged(model: str, args: list[str]) -> None:
    assert vet(args, model) == tuple(args)


@pytest.mark.parametrize(("given", "canonical"), [
    (["-tp", "4", "-pp=2"], ("--tensor-parallel-size", "4", "--pipeline-parallel-size", "2")),
    (["--tensor_parallel_size=2"], ("--tensor-parallel-size", "2")),
    (["-q", "awq", "-ep"], ("--quantization", "awq", "--enable-expert-parallel")),
    (["--device-memory-utilization", "0.5"], ("--gpu-memory-utilization", "0.5")),
    (["--max-model-len=4k", "--served-model-name", "a", "b"],
     ("--max-model-len", "4k", "--served-model-name", "a", "b")),
    (["--no-enable-prefix-caching", "--no-trust-remote-code"],
     ("--no-enable-prefix-caching", "--no-trust-remote-code")),
])
def test_spellings_vllm_reads_become_the_canonical_form(given: list[str], canonical: tuple[str, ...]) -> None:
    assert vet(given) == canonical
    assert vet(list(canonical)) == canonical  # idempotent: a replayed request is judged the same


@pytest.mark.parametrize(("args", "named"), [
    (["--hos=0.0.0.0"], "--hos is not a full flag name (it abbreviates --host)"),
    (["--trust-remote"], "--trust-remote is not a full flag name"),
    (["--tensor-parallel", "2"], "--tensor-parallel is not a full flag name"),
    (["--host", "0.0.0.0"], "--host is not allowed: the node binds each engine to loopback"),
    (["--port=9"], "--port is not allowed"),
    (["--model", "other/model"], "--model is not allowed"),
    (["--worker-cls", "x.Y"], "--worker-cls is not allowed: it loads code"),
    (["--middleware", "evil.app"], "--middleware is not allowed: it loads code"),
    (["--tool-parser-plugin", "/tmp/p.py"], "--tool-parser-plugin is not allowed: it loads code"),
    (["--hf-overrides", "{}"], "--hf-overrides is not allowed: it loads code"),
    (["--chat-template", "/etc/shadow"], "--chat-template is not allowed: it reads or writes host paths"),
    (["--download-dir", "/"], "--download-dir is not allowed: it reads or writes host paths"),
    (["--config", "/etc/x.yaml"], "--config is not allowed: it reads or writes host paths"),
    (["--grpc-port", "9000"], "--grpc-port is not allowed: it opens a listener"),
    (["--kv-transfer-config", "{}"], "--kv-transfer-config is not allowed: it opens a listener"),
    (["--data-parallel-size", "2"], "--data-parallel-size is not allowed"),
    (["--api-key", "sekrit-value"], "--api-key is not allowed: it carries a secret"),
    (["--hf-token=hf_sekrit"], "--hf-token is not allowed: it carries a secret"),
    (["--no-such-flag"], "--no-such-flag is not an engine flag the node allows"),
    (["--compilation-config.backend", "os.system"], "pass the whole JSON object to --compilation-config"),
    (["-O3"], "-O3 is not an engine flag the node allows"),
    (["4"], "additional_args[0] is a value without a flag"),
    (["--enforce-eager", "true"], "--enforce-eager takes no value"),
    (["--seed"], "--seed needs a value"),
    (["--seed", "1", "2"], "--seed takes one value, got 2"),
    (["--seed", "-1"], "--seed needs a value"),  # "-1" reads as a flag, as vLLM's parser would
    (["--revision", "../x"], "--revision must be a revision"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be an integer >= 1"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be a number > 0 and <= 1"),
    (["--kv-cache-dtype", "fp4"], "--kv-cache-dtype must be one of auto"),
    (["--distributed-executor-backend", "ray"], "--distributed-executor-backend must be one of mp, uni"),
    (["--generation-config", "/etc"], "--generation-config must be one of auto, vllm"),
    (["--tool-call-parser", "../../x.py"], "--tool-call-parser must be a name"),
    (["--served-model-name", "-O3"], "--served-model-name needs a value"),
    (["--compilation-config", '{"backend": "os.system"}'],
     "--compilation-config key 'backend' is not allowed"),
    (["--compilation-config", "[1]"], "--compilation-config must be a JSON object"),
    (["--speculative-config", '{"method": "custom_class"}'], "key 'method' must be a speculative decoding"),
    (["--speculative-config", '{"method": "eagle", "model": "/etc"}'], "key 'model' must be a Hugging Face"),
    (["--spec-method", "extract_hidden_states"], "--spec-method must be a speculative decoding method"),
    (["--tokenizer", "/etc/passwd"], "--tokenizer must be a directory under the model roots"),
    (["--tokenizer", "./local"], "--tokenizer must be a Hugging Face repo id"),
    (["--override-generation-config", '{"temperature": [1]}'], "key 'temperature' must be a number"),
])
def test_refusals_name_the_flag(args: list[str], named: str) -> None:
    message = refusal(args)
    assert message.startswith("additional_args"), message
    assert named in message, message


def test_a_refusal_never_echoes_a_value() -> None:
    for args in (["--api-key", "sekrit-value"], ["--api-key=sekrit-value"], ["--hf-token", "hf_sekrit-value"],
                 ["--sekrit-value"], ["--revision", "sekrit value"]):
        assert "sekrit" not in refusal(args).replace("--sekrit-value", "")


def test_every_allowed_flag_is_a_known_name_and_no_reason_is_also_allowed() -> None:
    names = [name for flag in FLAGS for name in flag.names]
    assert len(names) == len(set(names))
    assert not set(names) & set(REASONS)


@pytest.mark.parametrize(("model", "problem"), [
    ("/etc", "model must be a directory under the model roots (/srv/models"),
    ("/srv/models/../../etc", "model must be a directory under the model roots"),
    ("../x", "model must be a Hugging Face repo id"),
    ("tests/../x", "model must be a Hugging Face repo id"),
    ("a/b/c", "model must be a Hugging Face repo id"),
    ("org/na--me", "model must be a Hugging Face repo id"),
    ("~/models/x", "model must be a Hugging Face repo id"),
    ("file:///etc", "model must be a Hugging Face repo id"),
])
def test_models_are_hub_ids_or_directories_under_the_roots(model: str, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem.replace("(", r"\(")):
        vet([], model)


def test_hub_ids_and_root_directories_pass(tmp_path: Path) -> None:
    policy = EnginePolicy(model_roots=(tmp_path,))
    for model in ("m", "Qwen/Qwen3-32B-FP8", "org/model.v2_x", str(tmp_path / "tiny"), str(tmp_path)):
        assert policy.vet(UpRequest(model)).model == model
    link = tmp_path / "escape"
    link.symlink_to("/etc")
    with pytest.raises(InvalidRequest, match="under the model roots"):
        policy.vet(UpRequest(str(link)))  # judged where it leads


def test_the_operators_autostart_directory_is_always_allowed(tmp_path: Path) -> None:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path / "state"),
                            "MLNODE_INFERENCE_AUTOSTART": str(tmp_path / "elsewhere" / "tiny")})
    policy = EnginePolicy.from_settings(settings)
    assert policy.model_roots == (tmp_path.resolve() / "state" / "models",)
    policy.vet(UpRequest(str(tmp_path / "elsewhere" / "tiny")))
    policy.vet(UpRequest(str(tmp_path / "state" / "models" / "x")))
    with pytest.raises(InvalidRequest):
        policy.vet(UpRequest(str(tmp_path / "elsewhere" / "other")))


def test_trust_remote_code_only_for_the_models_the_operator_names() -> None:
    assert "MLNODE_TRUST_REMOTE_CODE" in refusal(["--trust-remote-code"], "org/model")
    named = EnginePolicy(model_roots=(ROOT,), trust_remote_code=("deepseek-ai/DeepSeek-V4-Flash-0731",))
    trusted = vet(["--trust-remote-code"], "deepseek-ai/DeepSeek-V4-Flash-0731", named)
    assert trusted == ("--trust-remote-code",)
    assert "not allowed for this model" in refusal(["--trust-remote-code"], "org/other", named)
    # A draft model or tokenizer would run its own code too: it must be named as well.
    spec = ["--trust-remote-code", "--speculative-config", '{"method": "eagle", "model": "org/draft"}']
    assert "not allowed for this model" in refusal(spec, "deepseek-ai/DeepSeek-V4-Flash-0731", named)
    assert "not allowed" in refusal(["--trust-remote-code", "--tokenizer", "org/tok"],
                                    "deepseek-ai/DeepSeek-V4-Flash-0731", named)
    anything = EnginePolicy(model_roots=(ROOT,), trust_remote_code=("*",))
    assert vet(spec, "org/x", anything)[0] == "--trust-remote-code"


def test_trust_remote_code_pinned_to_a_revision() -> None:
    pinned = EnginePolicy(model_roots=(ROOT,), trust_remote_code=("zai-org/GLM-5.3-Flash@04c4e9e9",))
    vet(["--revision", "04c4e9e9", "--trust-remote-code"], "zai-org/GLM-5.3-Flash", pinned)
    for args in (["--trust-remote-code"], ["--revision", "main", "--trust-remote-code"]):
        assert "not allowed for this model" in refusal(args, "zai-org/GLM-5.3-Flash", pinned)


def test_the_operator_adds_flags_never_the_nodes_own() -> None:
    policy = EnginePolicy(model_roots=(ROOT,), allowed_flags=frozenset({"--chat-template", "--api-key"}))
    assert vet(["--chat-template", "/srv/t.jinja", "--api-key", "k"], policy=policy) == (
        "--chat-template", "/srv/t.jinja", "--api-key", "k")
    assert "abbreviates" in refusal(["--chat-templ", "x"], policy=policy)  # still full names only
    for owned in ("--host", "--port", "--model", "--worker-extension-cls"):
        with pytest.raises(ConfigError, match=f"cannot allow {owned}"):
            EnginePolicy(model_roots=(ROOT,), allowed_flags=frozenset({owned}))


def test_a_worker_extension_is_replaced_by_the_nodes_own() -> None:
    """The network's release configuration names the reference node's PoC extension: the node serves
    PoC with its own, so the class is dropped (never imported) and the rest is kept."""
    assert vet(["--worker-extension-cls", "gonka_poc.worker.PoCWorkerExtension", "-tp", "4"]) == (
        "--tensor-parallel-size", "4")


def test_sizes_are_bounded() -> None:
    assert "at most 128" in refusal(["--enforce-eager"] * 129)
    assert "longer than 4096" in refusal(["--served-model-name", "x" * 5000])


# --- where the policy is applied: before anything is saved, planned or started ------------------------


def test_the_manager_refuses_before_saving_or_stopping_anything(tmp_path: Path) -> None:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path), "MLNODE_ENGINE": "cpu"})

    async def scenario() -> None:
        manager = EngineManager(settings, lambda urls: None)
        with pytest.raises(InvalidRequest, match="--hos is not a full flag name"):
            manager.begin(UpRequest("org/model", "auto", ("--hos=0.0.0.0",)))
        assert manager.phase == "idle" and not manager.request_file.exists()
        manager.phase = "running"  # as if an engine served: a refused replacement must leave it
        with pytest.raises(InvalidRequest, match="--trust-remote-code"):
            await manager.replace(UpRequest("org/model", "auto", ("--trust-remote-code",)))
        assert manager.phase == "running"

    asyncio.run(scenario())
