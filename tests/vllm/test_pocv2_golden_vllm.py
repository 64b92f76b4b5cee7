"""The four golden PoC v2 cases computed by stock vLLM through the worker extension's
``mlnode_poc_artifacts``, called on the engine's own ``/collective_rpc`` as pow calls it.

Same criteria as tests/unit/inference/test_poc_golden_cpu.py (CPU engine): L2 to ``vector_f16`` per
nonce. The golden model is float32, so the engine must serve it in float32 (``--dtype auto`` would
serve bf16 on CPU and miss the tolerance for a reason unrelated to the code under test).
"""

from __future__ import annotations

from typing import Any

import pytest

from services.pow.v2.engine import EngineRefused, parse_answer
from tests.support.pocv2 import case, check_artifacts, golden, rpc_kwargs
from tests.vllm.conftest import Served, one_result, rpc


def test_served_in_float32_with_the_engines_attention(vllm_serving: Served) -> None:
    info = one_result(rpc(vllm_serving, "mlnode_body_info"))
    assert info["dtype"] == "float32", info
    # The golden cases below then run through vLLM's own attention backend, not the SDPA fallback.
    assert (info["attention"], info["attention_backend"]) == ("engine", "CPU_ATTN"), info


@pytest.mark.parametrize("name", [c["name"] for c in golden()["cases"]])
def test_golden_case(vllm_serving: Served, name: str) -> None:
    c = case(name)
    resp = rpc(vllm_serving, "mlnode_poc_artifacts", rpc_kwargs(c))
    result = one_result(resp)
    assert "error" not in result, result
    assert result["dropped"] == []
    worst = check_artifacts(c, result["artifacts"])
    print(f"vllm {name}: worst L2 to vector_f16 {worst:.3g}")
    # What pow reads from the same bytes: every nonce, nothing refused.
    computed = parse_answer(resp.body, vllm_serving.engine_port, list(c["nonces"]))
    assert sorted(computed.vectors) == sorted(c["nonces"])


@pytest.mark.parametrize("bad, why", [
    ({"seq_len": 0}, "seq_len"),
    ({"k_dim": 100_000}, "k_dim"),
    ({"nonces": [-1]}, "nonces"),
    ({"colour": "red"}, "unknown kwargs"),
])
def test_bad_kwargs_are_refused_and_the_engine_keeps_serving(
        vllm_serving: Served, bad: dict[str, Any], why: str) -> None:
    kwargs = {**rpc_kwargs(golden()["cases"][0]), "nonces": [0], **bad}
    resp = rpc(vllm_serving, "mlnode_poc_artifacts", kwargs)
    assert why in one_result(resp)["error"]
    with pytest.raises(EngineRefused, match=why):
        parse_answer(resp.body, vllm_serving.engine_port, [0])
    assert vllm_serving.engine("GET", "/health").status == 200
