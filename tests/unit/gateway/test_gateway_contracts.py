"""Request contracts as the gateway applies them: 400 reasons name the field, the contract's bodies pass."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.checked import convert, decode_json
from contracts.inference import InferenceUp
from contracts.pow import InitDto, ProofBatch
from contracts.train import TrainStart
from node.errors import InvalidRequest
from services.gateway.resources.service_routes import ROUTES

CONTRACT_INIT = (
    '{"block_hash":"9F3C64ABCDEF","block_height":12345,"public_key":"02ab66cdef",'
    '"batch_size":100,"r_target":1.4013564660458173,"fraud_threshold":1e-7,'
    '"params":{"dim":1792,"n_layers":64,"n_heads":64,"n_kv_heads":64,"vocab_size":8196,'
    '"ffn_dim_multiplier":10,"multiple_of":8192,"norm_eps":0.00001,"rope_theta":10000,'
    '"use_scaled_rope":false,"seq_len":256},'
    '"node_id":1,"node_count":2,"url":"http://api:9100/v1/poc-batches"}'
)
CONTRACT_TRAIN = json.loads(
    '{"train_config":{"project":"1B-ft-xlam","name":"refactor test 3090","description":"3090 micro bs2",'
    '"group":"base","tags":["1x1","no-diloco"],"train":{"micro_bs":2,"eval_interval":50},'
    '"data":{"seq_length":1024},"optim":{"sched_type":"cosine","batch_size":32,"warmup_steps":50,'
    '"total_steps":6000,"adam_betas1":0.9,"adam_betas2":0.95,"weight_decay":0.1,"lr":5e-6},'
    '"diloco":{"inner_steps":50},"ckpt":{"interval":1000,"topk":6,"path":"outputs/1B_4x1-lr"}},'
    '"train_env":{"TASK_ID":"7","NODE_ID":"gonka1abc/node-1","STORE_API_URL":"api-private:9300",'
    '"GLOBAL_ADDR":"10.0.0.5","GLOBAL_PORT":"5565","GLOBAL_RANK":"1","GLOBAL_UNIQUE_ID":"1",'
    '"GLOBAL_WORLD_SIZE":"3","BASE_PORT":"10001"}}'
)
BATCH = {"public_key": "k", "block_hash": "h", "block_height": 1, "nonces": [1, 2], "dist": [0.5, 1],
         "node_id": 0}


def reason(body: Any, kind: type[Any]) -> str:
    with pytest.raises(InvalidRequest) as caught:
        convert(body, kind)
    message = caught.value.message
    assert "\n" not in message
    return message


def test_the_contracts_exact_bodies_are_accepted() -> None:
    init = json.loads(CONTRACT_INIT)
    assert isinstance(init["params"]["ffn_dim_multiplier"], int)  # integers where floats are meant
    assert convert(init, InitDto).params.ffn_dim_multiplier == 10.0
    assert convert({**init, "extra_field_from_newer_client": [1, 2]}, InitDto) == convert(init, InitDto)
    assert convert(BATCH, ProofBatch).dist == [0.5, 1.0]
    convert({"model": "Qwen/Qwen2.5-7B", "dtype": "float16", "additional_args": ["--quantization", "fp8"]},
            InferenceUp)
    assert convert({"model": "m", "dtype": None, "additional_args": None}, InferenceUp).dtype is None
    convert(CONTRACT_TRAIN, TrainStart)
    convert({}, TrainStart)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"r_target": "1.4"}, "r_target must be a number, got string"),
        ({"block_height": 1.0}, "block_height must be an integer, got number"),
        ({"block_height": True}, "block_height must be an integer, got boolean"),
        ({"block_height": -5}, "block_height must be >= 0, got -5"),
        ({"block_height": 2**64}, "block_height must be <= 9223372036854775807"),
        ({"node_id": -2}, "node_id must be >= 0, got -2"),
        ({"node_id": -1}, "Node ID and node count must be set"),
        ({"node_count": 0}, "node_count must be >= 1, got 0"),
        ({"block_hash": ""}, "block_hash must be a non-empty string"),
        ({"params": {"dim": 64}}, "params.n_layers is required"),
        ({"params": []}, "params must be an object, got array"),
        ({"r_target": math.inf}, "r_target must be a finite number"),
        ({"r_target": 0}, "r_target must be > 0, got 0"),
        ({"url": "ftp://x"}, "url must be an http(s) URL, got 'ftp://x'"),
    ],
)
def test_a_bad_init_names_the_field(change: dict[str, Any], expected: str) -> None:
    body = {**json.loads(CONTRACT_INIT), **change}
    assert expected in reason(body, InitDto)


def test_missing_fields_and_nested_paths_are_named() -> None:
    body = json.loads(CONTRACT_INIT)
    del body["block_hash"]
    assert reason(body, InitDto) == "block_hash is required"
    body = json.loads(CONTRACT_INIT)
    body["params"]["norm_eps"] = None
    assert reason(body, InitDto) == "params.norm_eps must be a number, got null"
    assert reason({**BATCH, "nonces": [1, -2]}, ProofBatch).startswith("nonces[1] must be >= 0")
    assert reason({**BATCH, "dist": [1.0, "x"]}, ProofBatch).startswith("dist[1]")
    assert reason({**BATCH, "dist": [1.0]}, ProofBatch) == "nonces has 2 entries but dist has 1"
    assert reason([1, 2], InitDto) == "request body must be a JSON object, got array"
    assert "at most 100000" in reason({**BATCH, "nonces": [0] * 100_001}, ProofBatch)


def test_json_bodies_are_refused_like_values() -> None:
    with pytest.raises(InvalidRequest, match=r"^r_target must be a finite number$"):
        decode_json(CONTRACT_INIT.replace("1.4013564660458173", "1e999").encode(), InitDto)
    with pytest.raises(InvalidRequest, match=r"^request body is not valid JSON"):
        decode_json(b'{"model": NaN}', InferenceUp)
    with pytest.raises(InvalidRequest, match=r"^params.dim must be an integer, got number$"):
        decode_json(CONTRACT_INIT.replace('"dim":1792', '"dim":1792.0').encode(), InitDto)


def test_enums_and_inference_rules() -> None:
    assert "dtype must be one of auto, bfloat16" in reason({"model": "m", "dtype": "fp8"}, InferenceUp)
    assert reason({"model": "m", "dtype": 3}, InferenceUp) == "dtype must be a string or null, got integer"
    assert reason({"model": "  "}, InferenceUp).startswith("model must be a Hugging Face repo id")
    assert "NUL" in reason({"model": "m", "additional_args": ["a\x00"]}, InferenceUp)


def test_unknown_fields_of_a_closed_contract_are_named() -> None:
    from contracts.train import TrainPeerRemove

    assert reason({"task_id": "t", "node_id": "n", "b": 2}, TrainPeerRemove) == "b is not a known field"
    env = {**CONTRACT_TRAIN, "train_env": {"GLOBAL_RANK": ["1"]}}
    assert reason(env, TrainStart) == (
        "train_env.GLOBAL_RANK must be an integer or a string or null, got array")
    assert reason({"train_env": {"TASK_ID": 1.5}}, TrainStart).startswith("train_env.TASK_ID must be")
    assert convert({"train_env": {"odd key": 1.5}}, TrainStart).train_env is not None  # a note, not a 400


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
KINDS = tuple(dict.fromkeys(row.body for row in ROUTES if row.body is not None))


@settings(max_examples=300, deadline=None)
@given(body=JSON | st.fixed_dictionaries({}, optional={k: JSON for k in InitDto.__struct_fields__}))
def test_any_json_is_accepted_or_refused_with_one_line(body: Any) -> None:
    for kind in KINDS:
        try:
            convert(body, kind)
        except InvalidRequest as exc:
            assert exc.message and "\n" not in exc.message and "Expected `" not in exc.message
        raw = msgspec.json.encode(body) if _finite(body) else b"[]"
        try:
            decode_json(raw, kind)
        except InvalidRequest as exc:
            assert exc.message and "\n" not in exc.message and "Expected `" not in exc.message


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def test_a_route_may_refuse_with_422() -> None:
    from node.errors import Unprocessable
    from services.gateway.errors import status_for

    with pytest.raises(Unprocessable) as caught:
        decode_json(b'{"model": 1}', InferenceUp, refuse=Unprocessable)
    assert status_for(caught.value) == 422 and caught.value.message == "model must be a string, got integer"
