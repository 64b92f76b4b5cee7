"""The gateway's JSON-Schema validator: 400 reasons that name the field, and the contract's bodies pass."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import InvalidRequest
from services.gateway import schemas
from services.gateway.schemas import check_body, validate

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


def reason(body: Any, schema: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequest) as caught:
        validate(body, schema)
    message = caught.value.message
    assert "\n" not in message
    return message


def test_the_contracts_exact_bodies_are_accepted() -> None:
    init = json.loads(CONTRACT_INIT)
    assert isinstance(init["params"]["ffn_dim_multiplier"], int)  # integers where floats are meant
    check_body("POST", "/api/v1/pow/init/generate", init)
    check_body("POST", "/api/v1/pow/init/generate", {**init, "extra_field_from_newer_client": [1, 2]})
    batch = {"public_key": "k", "block_hash": "h", "block_height": 1, "nonces": [1, 2], "dist": [0.5, 1],
             "node_id": 0}
    check_body("POST", "/api/v1/pow/validate", batch)
    check_body("POST", "/api/v1/inference/up", {"model": "Qwen/Qwen2.5-7B", "dtype": "float16",
                                                "additional_args": ["--quantization", "fp8"]})
    check_body("POST", "/api/v1/inference/up/async", {"model": "m", "dtype": None, "additional_args": None})
    check_body("POST", "/api/v1/train/start", CONTRACT_TRAIN)
    check_body("POST", "/api/v1/train/start", {})
    check_body("POST", "/api/v1/pow/stop", "anything: routes without a schema are not checked")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"r_target": "1.4"}, "r_target must be a number, got string"),
        ({"block_height": 1.0}, "block_height must be an integer, got number"),
        ({"block_height": True}, "block_height must be an integer, got boolean"),
        ({"block_height": -5}, "block_height must be >= 0, got -5"),
        ({"block_height": 2**64}, "block_height must be <= 9223372036854775807"),
        ({"node_id": -2}, "node_id must be >= -1"),
        ({"block_hash": ""}, "block_hash must be a non-empty string"),
        ({"params": {"dim": 64}}, "params.n_layers is required"),
        ({"params": []}, "params must be an object, got array"),
        ({"r_target": math.inf}, "r_target must be a finite number"),
    ],
)
def test_a_bad_init_names_the_field(change: dict[str, Any], expected: str) -> None:
    body = {**json.loads(CONTRACT_INIT), **change}
    assert expected in reason(body, schemas.INIT_DTO)


def test_missing_fields_and_nested_paths_are_named() -> None:
    body = json.loads(CONTRACT_INIT)
    del body["block_hash"]
    assert reason(body, schemas.INIT_DTO) == "block_hash is required"
    body = json.loads(CONTRACT_INIT)
    body["params"]["norm_eps"] = None
    assert reason(body, schemas.INIT_DTO) == "params.norm_eps must be a number, got null"
    batch = {"public_key": "k", "block_hash": "h", "block_height": 1, "nonces": [1, -2], "dist": [1.0, 1.0]}
    assert reason(batch, schemas.PROOF_BATCH).startswith("nonces[1] must be >= 0")
    assert reason({**batch, "nonces": [1, 2], "dist": [1.0, "x"]}, schemas.PROOF_BATCH).startswith("dist[1]")
    assert reason([1, 2], schemas.INIT_DTO) == "request body must be a JSON object, got array"
    assert "at most 100000" in reason({**batch, "nonces": [0] * 100_001}, schemas.PROOF_BATCH)


def test_enums_follow_json_equality() -> None:
    up = schemas.INFERENCE_UP
    assert "dtype must be one of auto, bfloat16" in reason({"model": "m", "dtype": "fp8"}, up)
    assert reason({"model": "m", "dtype": 3}, up) == "dtype must be a string or null, got integer"
    assert "must be one of true" in reason(1, {"enum": [True]})
    assert "must be one of 1" in reason(True, {"enum": [1]})
    assert "must be one of null" in reason(0, {"enum": [None]})
    validate(1, {"enum": [1.0]})  # 1 and 1.0 are the same JSON number


def test_additional_properties_false_and_schema() -> None:
    closed = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}
    assert reason({"a": 1, "b": 2}, closed) == "b is not a known field"
    assert reason({"a": 1, "we\nird": 2}, closed) == "'we\\nird' is not a known field"
    env = {**CONTRACT_TRAIN, "train_env": {"GLOBAL_RANK": ["1"]}}
    assert reason(env, schemas.TRAIN_START) == (
        "train_env.GLOBAL_RANK must be a string or an integer or null, got array")
    env = {"train_env": {"odd key": 1.5}}
    assert reason(env, schemas.TRAIN_START).startswith("train_env['odd key'] must be")


def test_inference_dtypes_are_the_inference_services() -> None:
    from services.inference.up_request import DTYPES

    assert set(schemas.DTYPES) == set(DTYPES)


def test_schemas_use_only_keywords_the_validator_enforces_or_that_only_describe() -> None:
    allowed = schemas.CHECKED_KEYWORDS | schemas.DOC_KEYWORDS

    def walk(schema: Any, where: str) -> None:
        assert isinstance(schema, dict), where
        assert set(schema) <= allowed, (where, set(schema) - allowed)
        for name, sub in schema.get("properties", {}).items():
            walk(sub, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                walk(schema[key], f"{where}.{key}")

    for name, schema in schemas.NAMED.items():
        walk(schema, name)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(body=JSON | st.fixed_dictionaries({}, optional={k: JSON for k in schemas.INIT_DTO["properties"]}))
def test_any_json_is_accepted_or_refused_with_one_line(body: Any) -> None:
    for schema in schemas.REQUEST_BODIES.values():
        try:
            validate(body, schema)
        except InvalidRequest as exc:
            assert exc.message and "\n" not in exc.message and len(exc.message) < 300
