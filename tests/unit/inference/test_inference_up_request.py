"""The ``inference/up`` body: what the client sends is accepted, anything else is a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from node.errors import InvalidRequest
from services.inference.up_request import UpRequest, parse_up_request


def test_the_clients_body_is_accepted_verbatim() -> None:
    args = ["--quantization", "fp8", "--tensor-parallel-size", "4", "--kv-cache-dtype", "fp8"]
    req = parse_up_request({"model": "Qwen/Qwen2.5-7B-Instruct", "dtype": "float16", "additional_args": args,
                            "unknown": 1})
    assert req == UpRequest("Qwen/Qwen2.5-7B-Instruct", "float16", tuple(args))
    assert req.to_wire() == {"model": "Qwen/Qwen2.5-7B-Instruct", "dtype": "float16", "additional_args": args}


def test_missing_dtype_and_args_default() -> None:
    assert parse_up_request({"model": "m"}) == UpRequest("m", "auto", ())
    assert parse_up_request({"model": "m", "dtype": None, "additional_args": None}) == UpRequest("m")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (None, "JSON object"),
        ([], "JSON object"),
        ({}, "model"),
        ({"model": ""}, "model"),
        ({"model": "   "}, "model"),
        ({"model": 7}, "model"),
        ({"model": "m", "dtype": 16}, "dtype"),
        ({"model": "m", "dtype": "fp16"}, "dtype"),
        ({"model": "m", "additional_args": "--x"}, "additional_args"),
        ({"model": "m", "additional_args": ["--x", 1]}, "additional_args"),
        ({"model": "m", "additional_args": ["a\x00b"]}, "additional_args"),
    ],
)
def test_bad_bodies_name_the_field(body: Any, field: str) -> None:
    with pytest.raises(InvalidRequest, match=field) as info:
        parse_up_request(body)
    assert "\n" not in info.value.message


def test_served_names_follow_the_served_model_name_flag() -> None:
    assert parse_up_request({"model": "/m"}).served_names == ("/m",)
    args = ["--served-model-name", "a", "b", "--dtype", "x"]
    assert parse_up_request({"model": "/m", "additional_args": args}).served_names == ("a", "b")
    up = parse_up_request({"model": "/m", "additional_args": ["--served-model-name=c"]})
    assert up.served_names == ("c",)
