"""Where MLNode's exception tree meets HTTP: one table from error kind to status code.

Answers use the client's error shape, ``{"detail": "<reason>"}``.
"""

from __future__ import annotations

import json
from typing import Any

import falcon
import falcon.asgi

from node.errors import MLNodeError
from node.logging import get_logger

log = get_logger(__name__)

STATUS_BY_KIND: dict[str, int] = {
    "invalid": 400,
    "protocol": 400,
    "unprocessable": 422,
    "too_large": 413,
    "request_timeout": 408,
    "forbidden": 403,
    "unsupported_media": 415,
    "overloaded": 429,
    "upstream": 502,
    "not_found": 404,
    "conflict": 409,
    "unavailable": 503,
    "unreachable": 503,
    "timeout": 504,
    "config": 500,
    "key_file": 500,
    "internal": 500,
}
#: The Network Node keeps the first 4 KiB of an error body (network-node-today.md §5): a reason is cut in
#: the middle to fit, so its start (what failed) and its end (an engine's last log lines) both arrive.
MAX_ERROR_BYTES = 4000
_HEAD_CHARS = 400


def status_for(error: MLNodeError) -> int:
    return STATUS_BY_KIND.get(error.kind, 500)


async def handle_mlnode_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: MLNodeError, _params: dict[str, Any]
) -> None:
    status = status_for(error)
    if status >= 500:
        log.warning("request_failed", path=req.path, kind=error.kind, reason=error.message)
    resp.status = status
    # A resource may have set its own type (``/metrics``: text) before failing: the answer is JSON.
    resp.content_type = falcon.MEDIA_JSON
    # An error may carry a structured detail (the fan-out's per-engine errors); else its message.
    detail = error.details.get("detail", error.message)
    resp.media = {"detail": fit(detail) if isinstance(detail, str) else detail}


def fit(detail: str, limit: int = MAX_ERROR_BYTES) -> str:
    """``detail`` cut in the middle so that ``{"detail": …}`` is at most ``limit`` bytes of JSON."""
    def size(text: str) -> int:
        return len(json.dumps({"detail": text}).encode())

    if size(detail) <= limit:
        return detail
    head, rest = detail[:_HEAD_CHARS], detail[_HEAD_CHARS:]
    low, high = 0, len(rest)  # the longest tail that fits
    while low < high:
        mid = (low + high + 1) // 2
        if size(f"{head} [...] {rest[-mid:]}") <= limit:
            low = mid
        else:
            high = mid - 1
    return f"{head} [...] {rest[-low:]}" if low else head[: max(0, limit // 8)]


async def handle_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, _params: dict[str, Any]
) -> None:
    if isinstance(error, falcon.HTTPError):
        raise error
    log.exception("request_crashed", path=req.path)
    resp.status = 500
    resp.content_type = falcon.MEDIA_JSON
    resp.media = {"detail": f"internal error: {type(error).__name__}"}


def serialize_http_error(
    _req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError
) -> None:
    """Falcon's own errors (404, 405, 413, bad JSON) in the same ``{"detail"}`` shape."""
    resp.content_type = falcon.MEDIA_JSON
    detail = exc.description or exc.title or "error"
    resp.media = {"detail": detail}
