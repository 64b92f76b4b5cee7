"""Enforced decoding fields, made readable by stock vLLM.

The Network Node sends ``enforced_str`` / ``enforced_tokens`` as top-level fields of a completion request.
Stock vLLM ignores unknown fields; its logits processors read per-request arguments from ``vllm_xargs``.
So for the two completion routes, a body that mentions an enforced field gets a copy of it in
``vllm_xargs`` (where MLNode's vLLM plugin picks it up); the top-level fields stay, for engines that read
them there (the built-in CPU engine). Every other body is forwarded byte for byte, unparsed: the cheap
substring test keeps ordinary requests off the JSON path.
"""

from __future__ import annotations

import json
from typing import Any

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
FIELDS = ("enforced_str", "enforced_tokens")
_MARKER = b'"enforced_'


def with_engine_args(path: str, body: bytes) -> bytes:
    """``body`` with its enforced fields copied into ``vllm_xargs`` (unchanged when there are none).

    A body that is not a JSON object, or whose ``vllm_xargs`` is not an object, is left for the engine
    to reject with its own 400.
    """
    if path not in COMPLETION_PATHS or _MARKER not in body:
        return body
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    present = {f: data[f] for f in FIELDS if data.get(f) is not None}
    if not present:
        return body
    xargs = data.get("vllm_xargs")
    if xargs is None:
        xargs = {}
    elif not isinstance(xargs, dict):
        return body
    data["vllm_xargs"] = {**xargs, **present}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
