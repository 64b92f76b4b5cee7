"""The inference-validation golden data (``shared/golden`` beside the repository) and its pass criteria.

``inference_validation.json`` holds, per case, a chat request, the forced continuation and the reference
logprobs at every forced position (float32, Hugging Face transformers); spec §5 says what an engine must
match: numeric tokens, the forced ids in order, the same top ids (tie slots included), each logprob within
2e-3, and a §4 similarity to the reference above 0.999.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from services.inference.validation.compare import compare
from services.inference.validation.network import enforced_tokens

GOLDEN_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
MODEL_DIR = GOLDEN_DIR / "infval-tiny-qwen3"
SERVED_NAME = "infval-tiny-qwen3"
LOGPROB_TOLERANCE = 2e-3
MIN_SIMILARITY = 0.999


@cache
def golden() -> dict[str, Any]:
    return json.loads((GOLDEN_DIR / "inference_validation.json").read_text(encoding="utf-8"))


def cases() -> list[dict[str, Any]]:
    return list(golden()["cases"])


def case_names() -> list[str]:
    return [c["name"] for c in cases()]


def case(name: str) -> dict[str, Any]:
    return next(c for c in cases() if c["name"] == name)


def _entry(token: int, logprob: float) -> dict[str, Any]:
    return {"token": str(token), "logprob": logprob, "bytes": list(str(token).encode())}


def reference_content(c: dict[str, Any]) -> list[dict[str, Any]]:
    """The case's reference as an executor's ``logprobs.content`` would carry it."""
    return [{**_entry(step["token_id"], step["logprob"]),
             "top_logprobs": [_entry(t, lp) for t, lp in step["top"]]} for step in c["steps"]]


def validation_body(c: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
    """The case's request as the Network Node's validator sends it: the executor's rewritten request and
    the reference answer in ``enforced_tokens``' object form."""
    body = {**c["request"], "logprobs": True, "top_logprobs": 5, "max_tokens": 64,
            "max_completion_tokens": 64, "skip_special_tokens": False, "return_token_ids": True,
            "stream": stream}
    body["enforced_tokens"] = enforced_tokens(reference_content(c))
    return body


def check_against_reference(c: dict[str, Any], content: list[dict[str, Any]]) -> float:
    """Assert the §5 criteria for one engine answer; returns its similarity to the reference."""
    name = c["name"]
    assert all(e["token"].isdigit() for e in content), (name, content[:2])
    assert [int(e["token"]) for e in content] == c["enforced_ids"], (name, [e["token"] for e in content])
    for i, (entry, step) in enumerate(zip(content, c["steps"], strict=True)):
        want_ids = [t for t, _lp in step["top"]]
        got_ids = [int(t["token"]) for t in entry["top_logprobs"]]
        assert got_ids == want_ids, (name, i, got_ids, want_ids)
        assert abs(entry["logprob"] - step["logprob"]) <= LOGPROB_TOLERANCE, (name, i, entry["logprob"])
        for got, (_t, want) in zip(entry["top_logprobs"], step["top"], strict=True):
            assert abs(got["logprob"] - want) <= LOGPROB_TOLERANCE, (name, i, got, want)
    similarity = compare(reference_content(c), content).similarity
    assert similarity > MIN_SIMILARITY, (name, similarity)
    return similarity
