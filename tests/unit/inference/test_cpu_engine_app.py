"""The ASGI app driven in-process: readiness before and after the model is attached, and the fault switch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from services.inference.cpu_engine.checkpoint import create_tiny, load
from services.inference.cpu_engine.server import EngineApp, EngineSettings


async def _call(app: EngineApp, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """One request through the ASGI interface; the client stays connected until the app answers."""
    pending = [{"type": "http.request", "body": json.dumps(body).encode() if body is not None else b""}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.timeout(30)
def test_503_until_the_model_is_attached(tmp_path: Path) -> None:
    create_tiny(tmp_path, seed=0)
    app = EngineApp(EngineSettings(str(tmp_path), ("tiny",)))

    async def scenario() -> None:
        assert (await _call(app, "GET", "/health"))[0] == 503
        assert (await _call(app, "GET", "/v1/models"))[0] == 503
        assert (await _call(app, "POST", "/v1/completions", {"prompt": "x"}))[0] == 503
        app.attach(load(tmp_path))
        assert (await _call(app, "GET", "/health"))[0] == 200
        status, body = await _call(app, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 3

    try:
        asyncio.run(scenario())
    finally:
        app.shutdown()


