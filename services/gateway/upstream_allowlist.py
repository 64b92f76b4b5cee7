"""Which engine paths the proxy lets through: the public OpenAI API plus the operational read-outs.

An engine serves more than inference: vLLM's dev-mode and admin routes (``/collective_rpc``, ``/sleep``,
``/reset_prefix_cache``, ``/server_info``, profiling, ...) would let any client of port 5000 drive the
workers. The node's own components reach those on the engine's loopback port; through the gateway every
path not listed here answers 404, on both ports. Only exact, plainly spelled paths match (no
percent-encoding, no dot segments), so no spelling of a hidden path can slip through.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

ALLOWED_PATHS = frozenset({
    # Public OpenAI API.
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    # Operational read-outs.
    "/health",
    "/metrics",
    "/version",
    "/tokenize",
    "/detokenize",
})
#: ``/v1/responses/{id}`` and ``/v1/responses/{id}/cancel`` (ids are opaque word characters).
_RESPONSE_ITEM = re.compile(r"/v1/responses/[A-Za-z0-9_-]+(/cancel)?")

NOT_FOUND = {"detail": "Not Found"}


def allowed(scope: MutableMapping[str, Any]) -> bool:
    """True when the request's path is on the allowlist, spelled exactly as listed."""
    path = scope.get("path", "")
    raw = scope.get("raw_path")
    if raw is not None and raw != path.encode("latin-1", "replace"):
        return False  # percent-encoded (or otherwise re-spelled) paths never match
    return path in ALLOWED_PATHS or _RESPONSE_ITEM.fullmatch(path) is not None
