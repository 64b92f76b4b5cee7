"""One table of OpenAI requests and what vLLM's OpenAI server answers to them (issue 12, case 1).

The same rows run against the CPU engine (tests/integration/test_openai_compat.py) and against real
vLLM (the real-vLLM tier), so the CPU engine accepts what vLLM accepts, with the same coercions, and
refuses with a 400 in vLLM's error shape what vLLM refuses. Each row was derived from vLLM's own
request models (pydantic, lax mode) and its sampling-parameter checks; every body is sent as the
network's client sends it: JSON without a Content-Type header, with ``model`` set to the served model.

Left out on purpose: ``n`` > 1 (vLLM answers several choices, the CPU engine refuses) and a temperature
above 2 (older vLLM releases accept it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Say something"}]
PROMPT = "Once upon a time"

Check = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict[str, Any]
    status: int
    #: For an accepted body: what its answer must show (the coercion took effect).
    check: Check | None = field(default=None, compare=False)
    stream: bool = False


def _chat(**extra: Any) -> dict[str, Any]:
    return {"messages": MESSAGES, "max_tokens": 4, **extra}


def _completion(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": 4, **extra}


def _top_logprobs(n: int) -> Check:
    def check(answer: dict[str, Any]) -> None:
        content = answer["choices"][0]["logprobs"]["content"]
        assert content, answer
        assert all(len(token["top_logprobs"]) == n for token in content), content

    return check


def _completion_logprobs(answer: dict[str, Any]) -> None:
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs is not None and logprobs["token_logprobs"], answer


def _at_most(n: int) -> Check:
    def check(answer: dict[str, Any]) -> None:
        assert 1 <= answer["usage"]["completion_tokens"] <= n, answer["usage"]

    return check


def _no_logprobs(answer: dict[str, Any]) -> None:
    assert answer["choices"][0].get("logprobs") is None, answer


ACCEPTED: tuple[Case, ...] = (
    # The reported case: the network's validators send an integer for the boolean.
    Case("chat logprobs 1, top_logprobs 3", CHAT, _chat(logprobs=1, top_logprobs=3), 200, _top_logprobs(3)),
    Case("chat logprobs 'true'", CHAT, _chat(logprobs="true", top_logprobs=2), 200, _top_logprobs(2)),
    Case("chat logprobs 0", CHAT, _chat(logprobs=0), 200, _no_logprobs),
    Case("chat top_logprobs null", CHAT, _chat(logprobs=True, top_logprobs=None), 200),
    Case("chat max_tokens '3'", CHAT, _chat(max_tokens="3"), 200, _at_most(3)),
    Case("chat max_tokens 3.0", CHAT, _chat(max_tokens=3.0), 200, _at_most(3)),
    Case("chat max_completion_tokens 2", CHAT, _chat(max_completion_tokens=2), 200, _at_most(2)),
    Case("chat temperature '0'", CHAT, _chat(temperature="0"), 200),
    Case("chat top_p '0.9'", CHAT, _chat(top_p="0.9"), 200),
    Case("chat seed '42'", CHAT, _chat(seed="42", temperature=1), 200),
    Case("chat n '1'", CHAT, _chat(n="1"), 200),
    Case("chat stop string", CHAT, _chat(stop="\n"), 200),
    Case("chat unknown fields ignored", CHAT,
         _chat(use_deterministic_hash=True, not_an_openai_field={"x": [1]}, seed=7), 200),
    Case("chat stream 1", CHAT, _chat(stream=1), 200, stream=True),
    Case("chat stream with include_usage", CHAT,
         _chat(stream=True, stream_options={"include_usage": "true"}), 200, stream=True),
    Case("completion logprobs true", COMPLETIONS, _completion(logprobs=True), 200, _completion_logprobs),
    Case("completion token-id prompt", COMPLETIONS, _completion(prompt=[1, 2, 3]), 200),
    Case("completion max_tokens null", COMPLETIONS, _completion(max_tokens=None), 200),
    Case("completion stop list", COMPLETIONS, _completion(stop=["\n", "."]), 200),
    Case("completion echo false and user", COMPLETIONS, _completion(echo=False, user="validator-7"), 200),
)

REJECTED: tuple[Case, ...] = (
    Case("chat logprobs 2", CHAT, _chat(logprobs=2), 400),
    Case("chat logprobs 'maybe'", CHAT, _chat(logprobs="maybe"), 400),
    Case("chat top_logprobs without logprobs", CHAT, _chat(top_logprobs=3), 400),
    Case("chat top_logprobs '3'", CHAT, _chat(logprobs=True, top_logprobs="3"), 400),
    Case("chat top_logprobs -2", CHAT, _chat(logprobs=True, top_logprobs=-2), 400),
    Case("chat top_logprobs 21", CHAT, _chat(logprobs=True, top_logprobs=21), 400),
    Case("chat max_tokens 0", CHAT, _chat(max_tokens=0), 400),
    Case("chat max_tokens 'ten'", CHAT, _chat(max_tokens="ten"), 400),
    Case("chat max_tokens 2.5", CHAT, _chat(max_tokens=2.5), 400),
    Case("chat temperature -1", CHAT, _chat(temperature=-1), 400),
    Case("chat top_p 0", CHAT, _chat(top_p=0), 400),
    Case("chat top_p 1.5", CHAT, _chat(top_p=1.5), 400),
    Case("chat seed 1.5", CHAT, _chat(seed=1.5), 400),
    Case("chat stream_options without stream", CHAT, _chat(stream_options={"include_usage": True}), 400),
    Case("chat messages missing", CHAT, {"max_tokens": 4}, 400),
    Case("chat messages a string", CHAT, _chat(messages="hi"), 400),
    Case("chat stop [1]", CHAT, _chat(stop=[1]), 400),
    Case("completion logprobs 21", COMPLETIONS, _completion(logprobs=21), 400),
    Case("completion logprobs 'x'", COMPLETIONS, _completion(logprobs="x"), 400),
    Case("completion logprobs '2'", COMPLETIONS, _completion(logprobs="2"), 400),  # vLLM: numbers only
    Case("completion prompt 5", COMPLETIONS, _completion(prompt=5), 400),
    Case("completion max_tokens -1", COMPLETIONS, _completion(max_tokens=-1), 400),
    Case("completion stop ''", COMPLETIONS, _completion(stop=""), 400),
)

CASES: tuple[Case, ...] = ACCEPTED + REJECTED


def request_body(case: Case, model: str) -> bytes:
    return json.dumps({"model": model, **case.body}).encode()


def verify(case: Case, status: int, body: bytes) -> None:
    """Assert that an answer is what vLLM answers to ``case``."""
    assert status == case.status, (case.name, status, body[:500])
    if case.stream:
        events = [line for line in body.decode().split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", (case.name, body[:500])
        return
    answer = json.loads(body)
    if status == 400:
        error = answer["error"]  # vLLM's ErrorResponse
        assert isinstance(error["message"], str) and error["message"], (case.name, answer)
        assert isinstance(error["type"], str) and error["code"] == 400, (case.name, answer)
        assert "param" in error, (case.name, answer)
        return
    assert answer["choices"], (case.name, answer)
    if case.check is not None:
        case.check(answer)
