"""Inference validation on stock vLLM with the plugin: the golden reference, the CPU engine, both directions.

The node serves the golden ``infval-tiny-qwen3`` through vLLM (this module runs last in the tier, so the
engine switches model once); a CPU engine process serves the same directory beside it. Requests reach
vLLM through the node's inference port exactly as the Network Node sends them (executors: no
Content-Type; validators: JSON), so the proxy, the plugin's patches and the sampler are all on the path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.inference.validation.check import run_check
from services.inference.validation.compare import answer_content, compare, numeric_tokens
from services.inference.validation.network import enforced_tokens, executor_request
from tests.support import infval
from tests.support.cpu_engine import Engine
from tests.support.node import REPO, Node, Response, request
from tests.vllm.conftest import Served, serve

NAME = infval.SERVED_NAME
JSON = {"content-type": "application/json"}
USER = [{"role": "user", "content": "Tell me a story about validators."}]
EOS = infval.golden()["eos_id"]


@pytest.fixture(scope="module")
def served(vllm_node: Node) -> Served:
    return serve(vllm_node, infval.MODEL_DIR, NAME)


@pytest.fixture(scope="module")
def cpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = Engine(infval.MODEL_DIR, tmp_path_factory.mktemp("cpu") / "engine.log", "--dtype", "float32",
                    served_name=NAME)
    engine.wait_healthy()
    yield engine
    engine.stop()


def _vllm(served: Served, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return served.node.inference("POST", path, body, headers=headers, timeout=300)


def _cpu(cpu: Engine, path: str, body: dict[str, Any]) -> Response:
    return request(cpu.port, "POST", path, body, headers=JSON, timeout=300)


def _content(resp: Response) -> list[dict[str, Any]]:
    assert resp.status == 200, resp.body[:1000]
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [ln[len("data: "):] for ln in resp.body.decode().splitlines() if ln.startswith("data: ")]
        return answer_content([json.loads(ln) for ln in lines if ln != "[DONE]"])
    return answer_content(resp.json())


@pytest.mark.parametrize("name", infval.case_names())
def test_golden_case(served: Served, name: str) -> None:
    c = infval.case(name)
    resp = _vllm(served, "/v1/chat/completions", infval.validation_body(c), JSON)
    assert resp.json()["prompt_token_ids"] == c["prompt_ids"]
    infval.check_against_reference(c, _content(resp))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_executor_answers_carry_token_ids(served: Served, stream: bool) -> None:
    chat = executor_request({"model": NAME, "messages": USER, "max_tokens": 16, "temperature": 0.9,
                             "top_k": 3, "stream": stream})
    content = _content(_vllm(served, "/v1/chat/completions", chat))
    assert len(content) == 16 and numeric_tokens(content)
    assert all(e["bytes"] == list(e["token"].encode()) for e in content)
    assert all(len(e["top_logprobs"]) == 5 and e["top_logprobs"][0]["token"] == e["token"] for e in content)
    assert all(t["logprob"] == -9999.0 for e in content for t in e["top_logprobs"][4:])  # top-k 3: masked
    completion = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "logprobs": 5,
                  "stream": stream, "return_token_ids": True}
    resp = _vllm(served, "/v1/completions", completion)
    assert resp.status == 200, resp.body
    if stream:
        chunks = [json.loads(ln[6:]) for ln in resp.body.decode().splitlines()
                  if ln.startswith("data: {")]
        logs = [ch["choices"][0]["logprobs"] or {} for ch in chunks if ch["choices"]]
        tokens = [t for lp in logs for t in lp.get("tokens", [])]
    else:
        logprobs = resp.json()["choices"][0]["logprobs"]
        tokens = logprobs["tokens"]
        assert all(set(top) <= {str(i) for i in range(512)} for top in logprobs["top_logprobs"])
    assert len(tokens) == 8 and all(t.isdigit() for t in tokens)


def _forced(c: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The case's request (without its mode) with ``fields``."""
    request = {k: v for k, v in c["request"].items() if k != "logprobs_mode"}
    return {**request, "logprobs": True, "top_logprobs": 5, "max_tokens": 32, **fields}


def test_logprobs_mode_per_request_default_and_guess(served: Served, cpu: Engine) -> None:
    c = infval.case("t13_topk3_processed")  # temperature 1.3, top_k 3
    ids = c["enforced_ids"]
    answers: dict[str, list[dict[str, Any]]] = {}
    for mode in ("raw_logprobs", "processed_logprobs"):
        body = _forced(c, enforced_tokens=ids, logprobs_mode=mode)
        answers[mode] = _content(_vllm(served, "/v1/chat/completions", body, JSON))
        on_cpu = _content(_cpu(cpu, "/v1/chat/completions", body))
        assert compare(on_cpu, answers[mode]).similarity > infval.MIN_SIMILARITY
        assert [[t["token"] for t in e["top_logprobs"]] for e in on_cpu] == \
            [[t["token"] for t in e["top_logprobs"]] for e in answers[mode]]
    raw, processed = answers["raw_logprobs"], answers["processed_logprobs"]
    assert any(t["logprob"] == -9999.0 for e in processed for t in e["top_logprobs"])
    assert not any(t["logprob"] == -9999.0 for e in raw for t in e["top_logprobs"])
    # No mode and no validation: the engine's default, processed (MLNODE_LOGPROBS_MODE unset).
    plain = _forced(c, temperature=0.0, max_tokens=4)
    free = _content(_vllm(served, "/v1/chat/completions", plain, JSON))
    named = {**plain, "logprobs_mode": "processed_logprobs"}
    greedy = _content(_vllm(served, "/v1/chat/completions", named, JSON))
    assert free == greedy
    # No mode on a validation request: guessed from top_tokens (the processed answer's tie slots are low ids).
    for mode, answer in answers.items():
        guessed = _content(_vllm(served, "/v1/chat/completions",
                                 _forced(c, enforced_tokens=enforced_tokens(answer)), JSON))
        assert compare(answer, guessed).similarity == 1.0, mode


SAMPLINGS = {
    "top_p": {"temperature": 0.8, "top_p": 0.9},
    "top_k": {"temperature": 1.2, "top_k": 5},
    "penalties": {"temperature": 0.9, "repetition_penalty": 1.3, "frequency_penalty": 0.5,
                  "presence_penalty": 0.4, "min_tokens": 10},
    "greedy": {"temperature": 0.0, "stop_token_ids": [86]},
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("direction", ["vllm->cpu", "cpu->vllm"])
def test_one_engine_executes_the_other_validates(served: Served, cpu: Engine, direction: str, sampling: str,
                                                  stream: bool) -> None:
    node = f"http://127.0.0.1:{served.node.inference_port}"
    executor, validator = (node, cpu.url) if direction == "vllm->cpu" else (cpu.url, node)
    user = {"model": NAME, "messages": USER, "max_tokens": 40, "stream": stream, **SAMPLINGS[sampling]}
    outcome = run_check(executor, validator, user, seed=11, engine=executor == cpu.url)
    assert outcome.passed and outcome.similarity > 0.99, outcome
    assert outcome.validator_positions >= outcome.executor_tokens > 0


def test_sampling_fields_behave_alike_on_both_engines(served: Served, cpu: Engine) -> None:
    c = infval.case("greedy_processed")
    ids = c["enforced_ids"][:-1]
    bodies = {
        "max_completion_tokens": _forced(c, enforced_tokens=ids, max_completion_tokens=3,
                                         return_token_ids=True),
        "stop_token_ids": _forced(c, enforced_tokens=ids, stop_token_ids=[ids[4]]),
        "special tokens shown": _forced(c, enforced_tokens=[ids[0], 1, ids[1]], skip_special_tokens=False),
        "special tokens skipped": _forced(c, enforced_tokens=[ids[0], 1, ids[1]]),
        "min_tokens": _forced(c, enforced_tokens=[ids[0], EOS], min_tokens=5,
                              logprobs_mode="processed_logprobs"),
        "seeded": _forced(c, temperature=1.0, seed=5, max_tokens=12),
    }
    for what, body in bodies.items():
        on_vllm = _vllm(served, "/v1/chat/completions", body, JSON).json()["choices"][0]
        on_cpu = _cpu(cpu, "/v1/chat/completions", body).json()["choices"][0]
        for key in ("finish_reason", "stop_reason", "token_ids"):
            assert on_vllm.get(key) == on_cpu.get(key), (what, key, on_vllm.get(key), on_cpu.get(key))
        assert on_vllm["message"]["content"] == on_cpu["message"]["content"] or what == "seeded", what
        if what != "seeded":
            assert compare(on_cpu["logprobs"]["content"], on_vllm["logprobs"]["content"]).similarity > 0.999
    first, again = (_vllm(served, "/v1/chat/completions", bodies["seeded"], JSON).json() for _ in range(2))
    assert first["choices"][0]["message"] == again["choices"][0]["message"]  # a seed repeats on vLLM
    short = _vllm(served, "/v1/chat/completions", bodies["max_completion_tokens"], JSON).json()["choices"][0]
    assert short["finish_reason"] == "length" and short["token_ids"] == ids[:3]
    stopped = _vllm(served, "/v1/chat/completions", bodies["stop_token_ids"], JSON).json()["choices"][0]
    assert (stopped["finish_reason"], stopped["stop_reason"]) == ("stop", ids[4])
    shown = _vllm(served, "/v1/chat/completions", bodies["special tokens shown"], JSON).json()["choices"][0]
    assert "<|im_start|>" in shown["message"]["content"]
    masked = _vllm(served, "/v1/chat/completions", bodies["min_tokens"], JSON).json()["choices"][0]
    assert masked["logprobs"]["content"][1]["logprob"] == -9999.0  # EOS masked before min_tokens ...
    assert masked["finish_reason"] == "stop" and len(masked["logprobs"]["content"]) == 2  # ... yet it ends


@pytest.mark.parametrize(("extra", "param"), [
    ({"enforced_tokens": [5, -1]}, "enforced_tokens[1]"),
    ({"enforced_tokens": [100000]}, "enforced_tokens[0]"),
    ({"enforced_tokens": {"tokens": [{"token": "12"}, {"token": 3.5}]}}, "enforced_tokens.tokens[1].token"),
    ({"enforced_tokens": {"tokens": "12"}}, "enforced_tokens.tokens"),
    ({"enforced_tokens": "12"}, "enforced_tokens"),
    ({"enforced_str": 5}, "enforced_str"),
    ({"logprobs_mode": "raw_logits"}, "logprobs_mode"),
])
def test_what_can_never_be_served_is_a_400_naming_the_field(served: Served, extra: dict[str, Any],
                                                             param: str) -> None:
    resp = _vllm(served, "/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": 2, **extra})
    assert resp.status == 400, resp.body
    error = resp.json()["error"]
    assert error["param"] == param and param in error["message"], error
    ok = _vllm(served, "/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": 1})
    assert ok.status == 200


def test_well_formed_validation_requests_are_never_refused(served: Served) -> None:
    c = infval.case("greedy_processed")
    longer = _forced(c, enforced_tokens=c["enforced_ids"], max_tokens=4)
    choice = _vllm(served, "/v1/chat/completions", longer, JSON).json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["content"]) == 4
    words = _forced(c, enforced_tokens={"tokens": [{"token": "hello", "top_tokens": ["x"]}]})
    choice = _vllm(served, "/v1/chat/completions", words, JSON).json()["choices"][0]
    tokenize = {"model": NAME, "prompt": "hello", "add_special_tokens": False}
    first = served.engine("POST", "/tokenize", tokenize, headers=JSON).json()["tokens"][0]
    assert [e["token"] for e in choice["logprobs"]["content"]] == [str(first), str(EOS)]


def test_the_operator_tool_passes_on_the_node(served: Served, cpu: Engine) -> None:
    node = f"http://127.0.0.1:{served.node.inference_port}"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "validate", "--executor", node,
                           "--validator", cpu.url, "--model", NAME, "--temperature", "0.7", "--top-p", "0.9",
                           "--seed", "3", "--stream", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["passed"] and outcome["similarity"] > 0.99 and outcome["executor_tokens"] == 64


def test_an_unknown_vllm_version_stops_the_engine_naming_it(vllm_python: str, tmp_path: Path) -> None:
    """The plugin's guard runs at engine start (its register()), on the real vLLM: a vLLM that reports
    another version exits before serving, saying which version it found."""
    (tmp_path / "sitecustomize.py").write_text("import vllm\nvllm.__version__ = '0.99.0'\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_USE_V2_MODEL_RUNNER": "0"}
    proc = subprocess.run([vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                           str(infval.MODEL_DIR), "--port", "1", "--logprobs-mode", "processed_logprobs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "this engine runs vLLM 0.99.0" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
