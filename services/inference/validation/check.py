"""``mlnode validate``: one inference the way the network runs it, then its validation, on real nodes.

An operator runs this before joining the network: the request goes to the executor node exactly as the
Network Node rewrites it (no Content-Type, spec §1), the answer is replayed as a validator would replay it
(spec §3) on the same or another node, and the validator's comparison (spec §4) decides. The executor's
answer must also be one a validator accepts at all (numeric token ids).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from services.inference.validation.compare import PASS_THRESHOLD, Comparison, answer_content, compare
from services.inference.validation.network import CHAIN_LOGPROBS_MODE, executor_request, validator_request

CHAT_PATH = "/v1/chat/completions"


class CheckFailed(Exception):
    """A node did not answer as the network needs (status, shape); the message says which and how."""


@dataclass(frozen=True)
class Outcome:
    executor_tokens: int
    validator_positions: int
    similarity: float
    passed: bool
    reason: str | None
    executor_text: str

    def lines(self) -> list[str]:
        verdict = "PASS" if self.passed else "FAIL"
        why = f" ({self.reason})" if self.reason else ""
        return [
            f"executor answered {self.executor_tokens} tokens: {self.executor_text[:60]!r}",
            f"validator replayed {self.validator_positions} positions",
            f"similarity {self.similarity:.6f}  {verdict} (needs > {PASS_THRESHOLD}){why}",
        ]


def _headers(token: str | None, content_type: bool) -> dict[str, str]:
    headers = {"content-type": "application/json"} if content_type else {}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def _post(client: httpx.Client, base: str, body: Mapping[str, Any],
          headers: dict[str, str]) -> httpx.Response:
    url = base.rstrip("/") + CHAT_PATH
    try:
        return client.post(url, content=json.dumps(body).encode(), headers=headers)
    except httpx.HTTPError as exc:
        raise CheckFailed(f"{url}: {exc}") from exc


def _sse_chunks(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in resp.text.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise CheckFailed(f"the stream carried an error: {chunk['error']}")
        yield chunk


def _text(chunks: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            message = choice.get("message") or choice.get("delta") or {}
            parts.append(message.get("content") or "")
    return "".join(parts)


def run_check(executor: str, validator: str, user_request: Mapping[str, Any], *, token: str | None = None,
              validator_token: str | None = None, mode: str | None = None, timeout_s: float = 300.0,
              seed: int | None = None, engine: bool = False) -> Outcome:
    """Send ``user_request`` to ``executor`` as the Network Node does, validate it on ``validator``
    (``engine``: the executor is a bare engine, which needs the Content-Type a node's proxy adds)."""
    rewritten = executor_request(user_request, mode=mode or CHAIN_LOGPROBS_MODE,
                                 rng=random.Random(seed) if seed is not None else None)
    with httpx.Client(timeout=timeout_s) as client:
        resp = _post(client, executor, rewritten, _headers(token, content_type=engine))
        if resp.status_code != 200:
            raise CheckFailed(f"executor answered {resp.status_code}: {resp.text[:500]}")
        chunks = list(_sse_chunks(resp)) if rewritten.get("stream") else [resp.json()]
        content = answer_content(chunks)
        if not content:
            raise CheckFailed("the executor's answer has no logprobs.content")
        replay = validator_request(rewritten, content)
        resp = _post(client, validator, replay, _headers(validator_token or token, content_type=True))
        if resp.status_code != 200:
            raise CheckFailed(f"validator answered {resp.status_code}: {resp.text[:500]}"
                              " (the network records a 4xx from a validator as 'passed')")
        validation = answer_content(resp.json())
    result: Comparison = compare(content, validation)
    return Outcome(len(content), len(validation), result.similarity, result.passed, result.reason,
                   _text(chunks))


def outcome_json(outcome: Outcome) -> str:
    return json.dumps({**asdict(outcome), "threshold": PASS_THRESHOLD})
