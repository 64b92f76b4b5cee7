"""The OpenAPI document and the live Falcon app agree: every route documented, nothing made up."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import falcon
import falcon.testing
import pytest
from openapi_spec_validator import validate

from node import __version__, config
from node.identity import ensure_node_keys
from services.gateway import openapi
from services.gateway.app import PortRouter
from services.gateway.body import json_depth
from services.gateway.resources.service_routes import ROUTES


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PortRouter]:
    state = tmp_path_factory.mktemp("gw")
    settings = config.load({"MLNODE_STATE_DIR": str(state)})
    ensure_node_keys(settings.keys_dir)  # what `mlnode up` does before the gateway starts
    router = PortRouter(settings)
    yield router
    router.services.close()


def app_routes(app: falcon.asgi.App) -> set[tuple[str, str]]:
    """(method, path) of every responder the app has (Falcon's default OPTIONS/405 ones excluded)."""
    found: set[tuple[str, str]] = set()
    # Falcon has no public route listing; its compiled router's tree is the source of truth.
    stack: list[Any] = list(app._router._roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.resource is None:
            continue
        for method in falcon.constants.COMBINED_METHODS:
            if hasattr(node.resource, f"on_{method.lower()}"):
                found.add((method, node.uri_template))
    return found


def test_every_route_of_the_app_is_documented_and_vice_versa(router: PortRouter) -> None:
    doc = openapi.document("test")
    documented = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert app_routes(router.api) == documented
    assert ("GET", "/metrics") in documented and ("POST", "/api/v1/pow/init/generate") in documented


def test_service_routes_have_explicit_docs_and_body_schemas() -> None:
    for row in ROUTES:
        assert (row.method, row.path) in openapi.SERVICE_DOCS, f"{row.method} {row.path} has no docs entry"
        has_schema = (row.method, row.path) in openapi.request_bodies()
        assert has_schema == (row.body is not None), f"{row.method} {row.path}: body={row.body}"
    routes = {(r.method, r.path) for r in ROUTES}
    assert set(openapi.SERVICE_DOCS) == routes
    assert set(openapi.request_bodies()) <= routes


def test_document_is_well_formed_openapi_31() -> None:
    doc = openapi.document("1.2.3")
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == "1.2.3"
    components = doc["components"]["schemas"]
    ids = []
    for path, ops in doc["paths"].items():
        assert path.startswith("/")
        for method, op in ops.items():
            ids.append(op["operationId"])
            successes = [s for s in op["responses"] if s.startswith("2")]
            assert op["summary"] and len(successes) == 1, (method, path)
            for status, response in op["responses"].items():
                assert response["description"]
                if status == "204":
                    assert "content" not in response and response["headers"]
                    continue
                (media,) = response["content"]
                assert media.startswith(("application/json", "text/plain"))
            params = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
            assert params == set(re.findall(r"\{([^}]+)\}", path)), (method, path)
            if (method.upper(), path) in openapi.request_bodies():
                assert op["requestBody"]["content"]["application/json"]["schema"]
    assert len(ids) == len(set(ids))

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    targets = set(refs(doc))
    assert "#/components/schemas/InitDto" in targets and "#/components/schemas/PowParams" in targets
    for target in targets:
        assert target.removeprefix("#/components/schemas/") in components, target
    init_op = doc["paths"]["/api/v1/pow/init/generate"]["post"]
    assert init_op["requestBody"]["required"] is True
    assert set(init_op["responses"]) == {"200", "400", "403", "408", "409", "413", "415", "503", "504"}
    assert doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {
        "text/plain; version=0.0.4": {"schema": {"type": "string"}}}
    assert set(doc["paths"]["/api/v1/models/download"]["post"]["responses"]) == {
        "202", "400", "403", "408", "409", "413", "415", "429", "503", "504"}


def test_document_is_valid_openapi_by_the_specification_validator() -> None:
    validate(openapi.document("1.2.3"))  # raises on any violation (an undeclared path parameter, say)


def test_answers_are_contracts_not_hand_written_schemas() -> None:
    """Every JSON answer refers to a component generated from a contract type."""
    doc = openapi.document("1")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema is not None and path != "/api/v1/openapi.json":
                    assert set(schema) == {"$ref"}, (method, path, status, schema)


def test_the_app_serves_the_document(router: PortRouter) -> None:
    client = falcon.testing.TestClient(router.api)
    resp = client.simulate_get("/api/v1/openapi.json")
    assert resp.status_code == 200
    assert resp.json == openapi.document(router.settings.version_tag or __version__)


def test_a_bad_body_is_refused_by_the_gateway_before_any_bus_traffic(
    router: PortRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No service runs here: the 400 can only come from the gateway's own validation."""
    asked: list[tuple[str, str]] = []

    async def call(service: str, kind: str, *_args: Any, **_kwargs: Any) -> Any:
        asked.append((service, kind))

    monkeypatch.setattr(router.services, "call", call)
    client = falcon.testing.TestClient(router.api)
    resp = client.simulate_post("/api/v1/pow/init/generate", body=b'{"block_hash": "AB"}')
    assert (resp.status_code, resp.json) == (400, {"detail": "block_height is required"})
    resp = client.simulate_post("/api/v1/pow/validate", body=b'{"public_key": "k"}')
    assert (resp.status_code, resp.json) == (400, {"detail": "block_hash is required"})
    resp = client.simulate_post("/api/v1/pow/validate", body=b'{"public_key": 7}')
    assert (resp.status_code, resp.json) == (400, {"detail": "public_key must be a string, got integer"})
    resp = client.simulate_post("/api/v1/inference/up/async", body=b'{"model": ["m"]}')
    assert (resp.status_code, resp.json) == (400, {"detail": "model must be a string, got array"})
    resp = client.simulate_post("/api/v1/inference/up", body=b"[" * 100_000 + b"]" * 100_000)
    assert (resp.status_code, resp.json) == (
        400, {"detail": "request body nests 100000 levels deep; at most 32 are allowed"})
    resp = client.simulate_post("/api/v1/train/start", body=b'{"train_config": ' * 50_000 + b"}" * 50_000)
    assert resp.status_code == 400 and "nests 50000 levels deep" in resp.json["detail"]
    shallow = b'{"model": "m", "additional_args": ["[[[[", "{{{{"]}'  # brackets in strings do not nest
    resp = client.simulate_post("/api/v1/train/start", body=b'{"train_config": "[[[[[[' + b"[" * 64 + b'"}')
    assert resp.status_code == 400 and "nests" not in resp.json["detail"]
    assert json_depth(shallow) == 2
    assert asked == []
