"""Reading the client's bodies: a missing Content-Type means JSON, an empty body means none."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import falcon.asgi

from node.errors import InvalidRequest

MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_TIMEOUT_S = 60.0


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"request body contains {name}, which is not a JSON number")


async def json_body(req: falcon.asgi.Request, *, required: bool) -> Any:
    """The decoded JSON body; ``None`` when there is none and none is required."""
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        # A client trickling its body must not hold a connection (and a worker slot) forever.
        raw = await asyncio.wait_for(req.stream.read(MAX_BODY_BYTES + 1), BODY_TIMEOUT_S)
    except TimeoutError:
        raise InvalidRequest(f"request body not received within {BODY_TIMEOUT_S:g} s") from None
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if required:
            raise InvalidRequest("request body is required (JSON)")
        return None
    # Whatever the Content-Type says (the client sends none), the API speaks only JSON.
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body nests too deeply to be a request") from None
