"""The v2 bodies exactly as the Go client sends them, and the 400/422 rules of §2.1 and §8."""

from __future__ import annotations

from typing import Any

import pytest

from contracts import checked
from contracts.pow_v2 import Generate, InitGenerate, Stop, aggregate, check_scheme, refused
from node.errors import InvalidRequest, Unprocessable

INIT = {"block_hash": "9F3C" * 16, "block_height": 123456, "public_key": "02ab" + "cd" * 31,
        "node_id": 1, "node_count": 3,
        "params": {"model": "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "seq_len": 1024},
        "url": "http://api:9100/v2/poc-batches/Qwen%252FQwen3-235B-A22B-Instruct-2507-FP8",
        "poc_stronger_rng": True}


def convert(body: Any, kind: type[Any]) -> Any:
    return checked.convert(body, kind, refuse=refused)


def test_the_go_init_body() -> None:
    init = convert({**INIT, "something_new": [1]}, InitGenerate)  # top-level unknown keys are ignored
    assert (init.params.k_dim, init.batch_size, init.poc_stronger_rng) == (12, 32, True)
    assert init.url.endswith("Qwen%252FQwen3-235B-A22B-Instruct-2507-FP8")


def test_unknown_params_keys_are_422_other_faults_400() -> None:
    with pytest.raises(Unprocessable, match=r"^params\.dim is not a known field$"):
        convert({**INIT, "params": {**INIT["params"], "dim": 7}}, InitGenerate)
    with pytest.raises(InvalidRequest) as info:
        convert({**INIT, "block_height": "7"}, InitGenerate)
    assert not isinstance(info.value, Unprocessable)
    with pytest.raises(InvalidRequest):
        convert({**INIT, "node_count": 0}, InitGenerate)
    with pytest.raises(InvalidRequest, match=r"^params is required$"):
        convert({k: v for k, v in INIT.items() if k != "params"}, InitGenerate)
    with pytest.raises(InvalidRequest, match="url must be an http"):
        convert({**INIT, "url": "api:9100/x"}, InitGenerate)
    assert convert({**INIT, "url": ""}, InitGenerate).url == ""


def test_generate_rules_the_schema_cannot_state_and_base64() -> None:
    artifacts = [{"nonce": 1, "vector_b64": "WZzqqt8wHqWSOMK1+rcvsWgwEDTOtVSx"},
                 {"nonce": 2, "vector_b64": ""}]
    body = {**INIT, "nonces": [2, 1, 2], "validation": {"artifacts": artifacts}}
    convert(body, Generate)
    with pytest.raises(InvalidRequest, match=r"^validation\.artifacts nonces must match nonces field$"):
        convert({**body, "nonces": [1]}, Generate)
    bad = {**body, "validation": {"artifacts": [{"nonce": 1, "vector_b64": "not base64!"}]}, "nonces": [1]}
    with pytest.raises(InvalidRequest, match=r"vector_b64 must be standard base64"):
        convert(bad, Generate)


def test_the_decode_scheme_is_422() -> None:
    for params in ({"decode": True}, {"max_tokens": 8}):
        init = convert({**INIT, "params": {**INIT["params"], **params}}, InitGenerate)
        with pytest.raises(Unprocessable, match="decode PoC scheme not supported"):
            check_scheme(init.params)
    check_scheme(convert(INIT, InitGenerate).params)


def test_integers_are_accepted_where_floats_are_meant() -> None:
    body = convert({**INIT, "nonces": [1, 2], "stat_test": {"dist_threshold": 1, "p_mismatch": 0}}, Generate)
    assert body.stat_test and body.stat_test.dist_threshold == 1.0  # type: ignore[union-attr]
    assert convert({}, Stop) == Stop()


def test_aggregate() -> None:
    assert aggregate(["GENERATING", "GENERATING"]) == "GENERATING"
    assert aggregate(["IDLE", "IDLE"]) == "IDLE"
    assert aggregate(["IDLE", "GENERATING"]) == "MIXED"
    assert aggregate(["ERROR", "IDLE"]) == "MIXED"
