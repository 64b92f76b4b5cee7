"""``MLNODE_API_TOKEN``: one bearer token for both HTTP ports, checked before any routing.

The operator sets the token (never the API); newer Network Nodes send it as ``Authorization: Bearer
<token>``. Unset, the node is open as before. The clock probe and the two liveness probes stay open: the
client's clock probe carries no token, and orchestrators probe ``/livez`` and ``/readyz`` without one.
The comparison is constant-time, so the answer's timing says nothing about how much of a guess matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, MutableMapping
from typing import Any

#: Paths answered without a token (exact spellings; see the module docstring).
OPEN_PATHS = frozenset({"/api/v1/clock", "/livez", "/readyz"})
CHALLENGE = (b"www-authenticate", b'Bearer realm="mlnode"')


def refusal(token: str, scope: Mapping[str, Any]) -> str | None:
    """Why ``scope`` may not pass (a one-line reason), or None when it may."""
    if not token or scope.get("path") in OPEN_PATHS:
        return None
    header = _authorization(scope.get("headers") or ())
    if header is None:
        return "missing Authorization: Bearer token (MLNODE_API_TOKEN is set on this node)"
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not credentials.strip():
        return "the Authorization header must be 'Bearer <token>'"
    if not hmac.compare_digest(credentials.strip(), token.encode()):
        return "invalid bearer token"
    return None


def _authorization(headers: Any) -> bytes | None:
    found = None
    for name, value in headers:
        if name.lower() == b"authorization":
            if found is not None:
                return b""  # two Authorization headers: refuse rather than pick one
            found = bytes(value)
    return found


def scrub(scope: MutableMapping[str, Any]) -> None:
    """Drop the node's own credentials before a request is proxied: the engine never sees the token."""
    scope["headers"] = [(k, v) for k, v in scope.get("headers") or () if k.lower() != b"authorization"]
