"""The two requests the Network Node sends for one inference, as data (spec §1 and §3).

:func:`executor_request` is the rewrite every user request gets before it reaches the executor's
inference port; :func:`validator_request` is what another node's validator sends to replay that answer.
Both copy the deployed client (``decentralized-api/completionapi/request.go`` and
``internal/validation/inference_validation.go``, release v0.2.14) field for field.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from typing import Any

from services.inference.validation.request import DEFAULT_MODE, ENFORCED_TOKENS, LOGPROBS_MODE

#: The client's top_logprobs (always 5 in the newest client) and its max_tokens when none is given.
TOP_LOGPROBS = 5
DEFAULT_MAX_TOKENS = 5000
#: The chain parameter ``ValidationParams.LogprobsMode`` since v0.2.12.
CHAIN_LOGPROBS_MODE = DEFAULT_MODE
_INT32_MAX = 2**31 - 1


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def executor_request(user: Mapping[str, Any], *, mode: str = CHAIN_LOGPROBS_MODE,
                     rng: random.Random | None = None) -> dict[str, Any]:
    """A user's chat (or completions) body as the Network Node forwards it to the executor."""
    body = copy.deepcopy(dict(user))
    body["logprobs"] = True
    body["top_logprobs"] = TOP_LOGPROBS
    limit = (_positive(body.get("max_tokens")) or _positive(body.get("max_completion_tokens"))
             or DEFAULT_MAX_TOKENS)
    body["max_tokens"] = body["max_completion_tokens"] = limit
    floor = _positive(body.get("min_tokens"))
    if floor is None:
        body.pop("min_tokens", None)
    else:
        body["min_tokens"] = min(floor, limit)
    body["skip_special_tokens"] = False
    body["return_token_ids"] = True
    if body.get("seed") is None:
        body["seed"] = (rng or random.SystemRandom()).randint(0, _INT32_MAX)
    if body.get("stream"):
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    body[LOGPROBS_MODE] = mode
    return body


def enforced_tokens(content: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The object form a validator builds from the executor's ``logprobs.content``."""
    return {"tokens": [
        {"token": entry.get("token"),
         "top_tokens": [top.get("token") for top in entry.get("top_logprobs") or ()]}
        for entry in content
    ]}


def validator_request(executed: Mapping[str, Any], content: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The replay of ``executed`` (the executor's rewritten body) forcing the executor's answer."""
    body = copy.deepcopy(dict(executed))
    body["stream"] = False
    body["skip_special_tokens"] = False
    body.pop("stream_options", None)
    body[ENFORCED_TOKENS] = enforced_tokens(content)
    return body
