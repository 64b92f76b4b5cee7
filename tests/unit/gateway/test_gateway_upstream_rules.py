"""The proxy's path allowlist and the enforced-field copy into ``vllm_xargs``."""

from __future__ import annotations

import json

import pytest

from services.gateway.upstream_allowlist import allowed
from services.gateway.upstream_enforced import with_engine_args


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


def test_enforced_fields_are_copied_into_vllm_xargs() -> None:
    body = json.dumps({"model": "m", "enforced_str": "héllo", "vllm_xargs": {"k": 1}}).encode()
    out = json.loads(with_engine_args("/v1/chat/completions", body))
    assert out["vllm_xargs"] == {"k": 1, "enforced_str": "héllo"}
    assert out["enforced_str"] == "héllo"  # kept for engines that read it top-level
    tokens = json.loads(with_engine_args("/v1/completions", b'{"enforced_tokens":[3,4],"enforced_str":null}'))
    assert tokens["vllm_xargs"] == {"enforced_tokens": [3, 4]}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", b'{"model":"m","messages":[]}'),  # nothing enforced: bytes untouched
    ("/tokenize", b'{"enforced_str":"x"}'),  # not a completion route
    ("/v1/completions", b'{"enforced_str":'),  # not JSON: the engine says 400
    ("/v1/completions", b'["enforced_str"]'),
    ("/v1/completions", b'{"enforced_str":"x","vllm_xargs":"bad"}'),
    ("/v1/completions", b'{"enforced_str":null}'),
])
def test_other_bodies_pass_byte_for_byte(path: str, body: bytes) -> None:
    assert with_engine_args(path, body) is body
