"""Reading the client's bodies: a missing Content-Type means JSON, an empty body means none."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import falcon.asgi

from contracts.checked import Refuse, decode_json
from node.errors import InvalidRequest

MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_TIMEOUT_S = 60.0
T = TypeVar("T")


async def raw_body(req: falcon.asgi.Request) -> bytes:
    """The body's bytes, bounded in size and in the time the client may take to send them."""
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        # A client trickling its body must not hold a connection (and a worker slot) forever.
        raw = await asyncio.wait_for(req.stream.read(MAX_BODY_BYTES + 1), BODY_TIMEOUT_S)
    except TimeoutError:
        raise InvalidRequest(f"request body not received within {BODY_TIMEOUT_S:g} s") from None
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body larger than {MAX_BODY_BYTES} bytes")
    return raw


async def typed_body(req: falcon.asgi.Request, kind: type[T], *,
                     refuse: Refuse = InvalidRequest) -> T:
    """The body checked into the contract ``kind`` (an empty body is ``{}``: missing fields are named).

    Whatever the Content-Type says (the client sends none), the API speaks only JSON.
    """
    raw = await raw_body(req)
    return decode_json(raw if raw.strip() else b"{}", kind, refuse=refuse)


def any_json(raw: bytes) -> Any:
    """Any JSON document (for a body the contract has already accepted)."""
    return decode_json(raw if raw.strip() else b"{}", Any)
