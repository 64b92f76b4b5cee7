"""The validator's comparison (spec §4) against the golden ``compare`` cases, and the requests it sends."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from services.inference.validation.compare import (
    DECODED_TEXT,
    DIFFERENT_LENGTH,
    DIFFERENT_TOKENS,
    PASS_THRESHOLD,
    answer_content,
    compare,
)
from services.inference.validation.network import executor_request, validator_request

GOLDEN = json.loads((Path(__file__).resolve().parents[4] / "shared" / "golden" / "inference_validation.json")
                    .read_text(encoding="utf-8"))
CASES = {c["name"]: c for c in GOLDEN["compare"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_golden_similarities(name: str) -> None:
    case = CASES[name]
    got = compare(case["original"], case["validation"])
    assert got.similarity == pytest.approx(case["similarity"], abs=1e-12)


def test_why_an_answer_fails() -> None:
    assert compare(CASES["different_token"]["original"], CASES["different_token"]["validation"]).reason \
        == DIFFERENT_TOKENS
    shorter = CASES["validation_shorter"]
    assert compare(shorter["original"], shorter["validation"]).reason == DIFFERENT_LENGTH
    one_off = CASES["one_percent_off"]
    result = compare(one_off["original"], one_off["validation"])
    assert result.passed and result.reason is None and result.similarity > PASS_THRESHOLD


def test_decoded_text_is_refused_before_any_comparison() -> None:
    original: list[dict[str, Any]] = [dict(e) for e in CASES["identical"]["original"]]
    original[3] = {**original[3], "top_logprobs": [{**t, "token": "the"} if i == 2 else t
                                                   for i, t in enumerate(original[3]["top_logprobs"])]}
    assert compare(original, original).reason == DECODED_TEXT
    assert compare([{**original[0], "token": "token_id:5"}], original).reason == DECODED_TEXT


def test_answer_content_joins_streamed_chunks() -> None:
    content = CASES["identical"]["original"]
    chunks = [{"choices": [{"delta": {"role": "assistant"}, "logprobs": None}]}]
    chunks += [{"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [e]}}]} for e in content]
    chunks.append({"choices": [], "usage": {}})
    assert answer_content(chunks) == content
    assert answer_content({"choices": [{"logprobs": {"content": content}}]}) == content


def test_the_executor_request_is_the_network_nodes_rewrite() -> None:
    user = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_completion_tokens": 40, "min_tokens": 90, "logprobs_mode": "raw_logprobs", "top_logprobs": 2}
    body = executor_request(user, rng=random.Random(1))
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["max_tokens"] == body["max_completion_tokens"] == 40 and body["min_tokens"] == 40
    assert body["skip_special_tokens"] is False and body["return_token_ids"] is True
    assert 0 <= body["seed"] < 2**31 and body["stream_options"] == {"include_usage": True}
    assert body["logprobs_mode"] == "processed_logprobs"  # the chain's value overwrites the user's
    plain = executor_request({"messages": [], "min_tokens": 0, "seed": 3})
    assert plain["max_tokens"] == 5000 and "min_tokens" not in plain and plain["seed"] == 3
    assert "stream_options" not in plain and user["max_completion_tokens"] == 40  # the input is untouched


def test_the_validator_request_forces_the_executors_answer() -> None:
    executed = executor_request({"messages": [], "stream": True}, rng=random.Random(1))
    content = CASES["identical"]["original"][:2]
    body = validator_request(executed, content)
    assert body["stream"] is False and "stream_options" not in body and body["skip_special_tokens"] is False
    assert body["enforced_tokens"] == {"tokens": [
        {"token": e["token"], "top_tokens": [t["token"] for t in e["top_logprobs"]]} for e in content]}
    assert body["seed"] == executed["seed"] and body["logprobs_mode"] == executed["logprobs_mode"]
