"""Reading the client's bodies: a missing Content-Type means JSON, an empty body means none.

The edge (:mod:`.edge`) has already read the body within its deadline and size limit. Here it is
checked for nesting depth (a deep document would exhaust the decoder's recursion, and the bus's encoder
after it) and decoded into its contract; a large body is decoded on a worker thread so the event loop
keeps serving every other request meanwhile.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, TypeVar

import falcon.asgi
import numpy as np

from contracts.checked import Refuse, decode_json
from node.errors import InvalidRequest, TooLarge
from services.gateway.edge import LIMITS_KEY, Limits

T = TypeVar("T")
#: Bodies above this are checked and decoded off the event loop.
OFF_LOOP_BYTES = 256 * 1024
#: The edge's limits when a request did not come through it (unit tests on the bare app).
_DEFAULT = Limits(max_requests=1, max_body_bytes=8 * 1024 * 1024 - 64 * 1024, body_timeout_s=60.0,
                  max_json_depth=32, cross_site_checks=True)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _limits(req: falcon.asgi.Request) -> Limits:
    limits = req.scope.get(LIMITS_KEY)
    return limits if isinstance(limits, Limits) else _DEFAULT


async def raw_body(req: falcon.asgi.Request) -> bytes:
    """The body's bytes (already bounded in size and time by the edge)."""
    limits = _limits(req)
    raw = await req.stream.read(limits.max_body_bytes + 1)
    if len(raw) > limits.max_body_bytes:
        raise TooLarge(f"request body larger than {limits.max_body_bytes} bytes")
    return raw


def json_depth(raw: bytes) -> int:
    """How deeply ``raw``'s arrays and objects nest (brackets inside strings do not count)."""
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def check_depth(raw: bytes, limit: int) -> None:
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return  # cannot nest deeper than it has brackets: the common case costs two scans in C
    depth = json_depth(raw)
    if depth > limit:
        raise InvalidRequest(f"request body nests {depth} levels deep; at most {limit} are allowed")


def _decode(raw: bytes, kind: type[T], refuse: Refuse, limit: int) -> T:
    check_depth(raw, limit)
    return decode_json(raw if raw.strip() else b"{}", kind, refuse=refuse)


async def decode(req: falcon.asgi.Request, raw: bytes, kind: type[T], *,
                 refuse: Refuse = InvalidRequest) -> T:
    """``raw`` checked into ``kind``, off the event loop when it is large."""
    limit = _limits(req).max_json_depth
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(_decode, raw, kind, refuse, limit)
    return _decode(raw, kind, refuse, limit)


async def typed_body(req: falcon.asgi.Request, kind: type[T], *,
                     refuse: Refuse = InvalidRequest) -> T:
    """The body checked into the contract ``kind`` (an empty body is ``{}``: missing fields are named).

    Whatever the Content-Type says (the client sends none), the API speaks only JSON.
    """
    return await decode(req, await raw_body(req), kind, refuse=refuse)


async def any_json(req: falcon.asgi.Request, raw: bytes) -> Any:
    """Any JSON document (for a body the contract has already accepted)."""
    return await decode(req, raw, Any)
