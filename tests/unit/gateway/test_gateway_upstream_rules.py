"""The proxy's path allowlist."""

from __future__ import annotations

import pytest

from services.gateway.upstream_allowlist import allowed


def _scope(path: str, raw: bytes | None = None) -> dict[str, object]:
    return {"type": "http", "path": path, "raw_path": path.encode() if raw is None else raw}


@pytest.mark.parametrize("path", [
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/health", "/metrics",
    "/tokenize", "/detokenize", "/version", "/v1/responses", "/v1/responses/resp_abc-1",
    "/v1/responses/resp_1/cancel",
])
def test_public_paths_pass(path: str) -> None:
    assert allowed(_scope(path))


@pytest.mark.parametrize(("path", "raw"), [
    ("/collective_rpc", None), ("/sleep", None), ("/wake_up", None), ("/is_sleeping", None),
    ("/reset_prefix_cache", None), ("/server_info", None), ("/start_profile", None), ("/", None),
    ("/v1/chat/completions/", None), ("/v1/models/../../collective_rpc", None), ("/V1/models", None),
    ("/v1/models", b"/v1/model%73"), ("/v1/responses/../../sleep", None), ("/health", b"//health"),
])
def test_everything_else_is_hidden(path: str, raw: bytes | None) -> None:
    assert not allowed(_scope(path, raw))
