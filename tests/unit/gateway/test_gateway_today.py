"""Gateway rules of today's client that need no service: the network metrics switch, the bearer token
check, and error bodies cut to what the client keeps (4 KiB)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import falcon.testing
import pytest

from node import config
from node.identity import ensure_node_keys
from services.gateway import auth
from services.gateway.app import PortRouter
from services.gateway.errors import MAX_ERROR_BYTES, fit

TOKEN = "a-long-operator-token-0123456789"


def router(tmp_path_factory: pytest.TempPathFactory, **env: str) -> PortRouter:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path_factory.mktemp("gw")), **env})
    ensure_node_keys(settings.keys_dir)  # what `mlnode up` does before the gateway starts
    return PortRouter(settings)


@pytest.fixture(scope="module")
def off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PortRouter]:
    r = router(tmp_path_factory, GONKA_METRICS="off")
    yield r
    r.services.close()


def test_gonka_metrics_off_is_a_404_and_the_operator_set_stays(off: PortRouter,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    async def call(service: str, kind: str, *_a: Any, **_k: Any) -> Any:
        asked.append(kind)
        raise AssertionError("no service is asked")

    monkeypatch.setattr(off.services, "call", call)
    client = falcon.testing.TestClient(off.api)
    assert client.simulate_get("/api/v1/metrics").status_code == 404
    assert "network_metrics" not in asked


@pytest.mark.parametrize("value", ["full", "FULL", "", "verbose"])
def test_any_other_value_serves_the_schema(value: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert config.load({"MLNODE_STATE_DIR": "/tmp/x", "GONKA_METRICS": value}).network_metrics
    assert not config.load({"MLNODE_STATE_DIR": "/tmp/x", "GONKA_METRICS": "Off"}).network_metrics


def scope(path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "path": path, "headers": list(headers)}


def test_token_refusals_say_why_and_probes_are_open() -> None:
    assert auth.refusal("", scope("/api/v1/state")) is None  # no token configured: open
    assert "missing" in (auth.refusal(TOKEN, scope("/api/v1/state")) or "")
    assert "Bearer <token>" in (auth.refusal(TOKEN, scope("/x", (b"authorization", TOKEN.encode()))) or "")
    assert auth.refusal(TOKEN, scope("/x", (b"authorization", b"Bearer " + TOKEN[:-1].encode() + b"X"))) \
        == "invalid bearer token"
    assert auth.refusal(TOKEN, scope("/x", (b"Authorization", b"bearer " + TOKEN.encode()))) is None
    two = scope("/x", (b"authorization", b"Bearer " + TOKEN.encode()), (b"authorization", b"Bearer x"))
    assert auth.refusal(TOKEN, two) is not None
    for path in ("/api/v1/clock", "/livez", "/readyz"):
        assert auth.refusal(TOKEN, scope(path)) is None
    assert auth.refusal(TOKEN, scope("/readyz/")) is not None  # exact spellings only


def test_a_short_or_spaced_token_stops_the_node_at_start() -> None:
    for bad in ("short", "has a space in it 0123456789"):
        with pytest.raises(config.ConfigError, match="MLNODE_API_TOKEN"):
            config.load({"MLNODE_STATE_DIR": "/tmp/x", "MLNODE_API_TOKEN": bad})
    settings = config.load({"MLNODE_STATE_DIR": "/tmp/x", "MLNODE_API_TOKEN": TOKEN})
    assert TOKEN not in repr(settings)  # never in a log line that prints the settings


def test_error_bodies_fit_4_kib_keeping_the_start_and_the_end() -> None:
    lines = " | ".join(f"engine log line {i} é\u00a0" + "x" * 80 for i in range(200))
    detail = "engine 0 (port 5001) exited with status 1 before serving; last log lines: " + lines
    cut = fit(detail)
    assert len(json.dumps({"detail": cut}).encode()) <= MAX_ERROR_BYTES < 4096
    assert cut.startswith("engine 0 (port 5001) exited") and cut.endswith(lines[-200:])
    assert fit("short") == "short"
