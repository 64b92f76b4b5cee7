"""The OpenAPI 3.1 description of the management API, built from the tables the gateway runs on.

Service routes come from :data:`~services.gateway.resources.service_routes.ROUTES` (the table that
creates them), request bodies from each row's contract (``msgspec.json.schema_components`` of the very
types that check them) and node routes from :data:`NODE_ROUTES` here. A unit test compares the document with
the routes of the live Falcon app, so a route added without documentation fails the build.

Not described: the ``/v1/*`` OpenAI routes on this port and every path of the inference port — they
belong to the engine behind the proxy, not to this API.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import msgspec

from services.gateway import answers as schemas
from services.gateway.answers import Schema
from services.gateway.resources.service_routes import ROUTES, Route

TEXT_METRICS = "text/plain; version=0.0.4"


@dataclass(frozen=True)
class Doc:
    """What one operation answers: its 200 body, and the other statuses it may send."""

    summary: str
    response: Schema | None
    errors: dict[int, str]
    #: When set, the 200 body has this media type instead of JSON (and ``response`` is ignored).
    media: str | None = None
    #: Statuses whose body has the 200 schema (``/health`` answers 503 with the same shape).
    same_shape: tuple[int, ...] = ()


_SERVICE_ERRORS = {
    400: "Bad body or wrong phase; `detail` names the field or the reason.",
    409: "Another service holds the node: `Cannot run X because MLNode is currently in Y mode. ...`",
    503: "The service is unreachable (its process is restarting) or cannot serve now.",
    504: "The service did not answer within MLNODE_BUS_TIMEOUT.",
}

NODE_ROUTES: dict[tuple[str, str], Doc] = {
    ("GET", "/api/v1/state"): Doc("The node state (one service at a time) and the version.",
                                  schemas.NODE_STATE, {}),
    ("POST", "/api/v1/stop"): Doc("Stop whatever runs (PoW, inference, training); idempotent, no body.",
                                  schemas.STATUS, {}),
    ("GET", "/api/v1/identity"): Doc("The node's CURVE public key (peers and operators pin it).",
                                     schemas.IDENTITY, {}),
    ("GET", "/health"): Doc("Every process answers (200) or not (503, `down` names them).", schemas.HEALTH,
                            {503: "Unhealthy: a process does not answer."}, same_shape=(503,)),
    ("GET", "/livez"): Doc("Same as /health.", schemas.HEALTH, {503: "Unhealthy: a process does not answer."},
                           same_shape=(503,)),
    ("GET", "/readyz"): Doc("The active service can do its job (or, stopped, every process answers).",
                            schemas.READY, {503: "Not ready."}, same_shape=(503,)),
    ("GET", "/api/v1/gpu/devices"): Doc("GPUs seen through NVML; an empty list without GPUs.",
                                        schemas.GPU_DEVICES, {}),
    ("GET", "/api/v1/gpu/driver"): Doc("Driver, CUDA driver and NVML versions.", schemas.GPU_DRIVER,
                                       {503: "NVML is unavailable (no GPU driver on this host)."}),
    ("GET", "/metrics"): Doc("Prometheus metrics of the whole node (text format 0.0.4).", None, {},
                             media=TEXT_METRICS),
    ("GET", "/api/v1/metrics"): Doc("Same as /metrics.", None, {}, media=TEXT_METRICS),
    ("GET", "/api/v1/openapi.json"): Doc("This document.", {"type": "object"}, {}),
}

#: Summary and 200 body of every service route, by (method, path).
SERVICE_DOCS: dict[tuple[str, str], tuple[str, Schema]] = {
    ("POST", "/api/v1/pow/init"): ("Load the PoC model for a round; phase idle.", schemas.POW_ANSWER),
    ("POST", "/api/v1/pow/init/generate"): ("Start (or flip to) generation for a round.", schemas.POW_ANSWER),
    ("POST", "/api/v1/pow/init/validate"): ("Start (or flip to) validation; an identical InitDto keeps "
                                            "the loaded model.", schemas.POW_ANSWER),
    ("POST", "/api/v1/pow/phase/generate"): ("Flip the loaded round to generation.", schemas.POW_ANSWER),
    ("POST", "/api/v1/pow/phase/validate"): ("Flip the loaded round to validation.", schemas.POW_ANSWER),
    ("POST", "/api/v1/pow/validate"): ("Queue a batch; the verdict is POSTed to {url}/validated.",
                                       schemas.POW_QUEUED),
    ("GET", "/api/v1/pow/status"): ("The round's status and counters.", schemas.POW_STATUS),
    ("POST", "/api/v1/pow/stop"): ("Stop the round (results already found are still delivered).",
                                   schemas.POW_ANSWER),
    ("POST", "/api/v1/inference/up"): ("Start the engine(s); answers when serving or failed (503 with the "
                                       "engine's last log lines).", schemas.STATUS),
    ("POST", "/api/v1/inference/up/async"): ("Start the engine(s) and answer at once.", schemas.STATUS),
    ("GET", "/api/v1/inference/up/status"): ("Progress of the last start.", schemas.UP_STATUS),
    ("POST", "/api/v1/inference/down"): ("Stop the engines; idempotent.", schemas.STATUS),
    ("POST", "/api/v1/inference/pow/init/generate"): (
        "PoC v2: start a generation loop on every healthy engine (group_id/n_groups by port order); "
        "artifacts go to {url}/generated.", schemas.POCV2_INIT),
    ("POST", "/api/v1/inference/pow/generate"): (
        "PoC v2: artifacts of explicit nonces, or their validation (verdict to {url}/validated); queued "
        "on one engine round-robin, or answered when done with `wait`.", schemas.POCV2_GENERATE),
    ("GET", "/api/v1/inference/pow/generate/{request_id}"): (
        "PoC v2: a queued job by its `port:uuid` id; results are kept 300 s.", schemas.POCV2_JOB),
    ("GET", "/api/v1/inference/pow/status"): (
        "PoC v2: per engine IDLE or GENERATING with config and stats, aggregated.", schemas.POCV2_STATUS),
    ("POST", "/api/v1/inference/pow/stop"): (
        "PoC v2: stop every loop, drop queued jobs (results already computed are still delivered).",
        schemas.POCV2_STOP),
    ("POST", "/api/v1/train/start"): ("Start DiLoCo training; answers status 'Training started' and "
                                      "`notes` (400 when already running, on a bad field, or a "
                                      "multi-node run without registered peers).", schemas.TRAIN_STATUS),
    ("POST", "/api/v1/train/stop"): ("Stop training (400 when not running).", schemas.TRAIN_STATUS),
    ("GET", "/api/v1/train/status"): ("Whether training runs, plus progress.", schemas.TRAIN_STATUS),
    ("POST", "/api/v1/train/peers"): ("Register a task's peers (works in any node mode; no 409).",
                                      schemas.TRAIN_PEER_LIST),
    ("GET", "/api/v1/train/peers"): ("List registered peers (`?task_id=` for one task; no 409).",
                                     schemas.TRAIN_PEER_LIST),
    ("POST", "/api/v1/train/peers/remove"): ("Forget one peer (404 if not registered; no 409).",
                                             schemas.TRAIN_PEER_LIST),
}


#: Statuses some service routes answer beyond :data:`_SERVICE_ERRORS`.
_UNPROCESSABLE = {422: "Unknown `params` key, or the decode scheme (not supported)."}
_NOT_SERVED = {409: "Another service holds the node, or `params.model` is not served."}
SERVICE_EXTRA_ERRORS: dict[tuple[str, str], dict[int, str]] = {
    ("POST", "/api/v1/inference/pow/init/generate"): {
        **_UNPROCESSABLE, **_NOT_SERVED,
        502: "Every engine refused (`detail.errors` per port, e.g. `Already generating`)."},
    ("POST", "/api/v1/inference/pow/generate"): {
        **_UNPROCESSABLE, **_NOT_SERVED,
        429: "Queue full: more than 100000 nonces would be queued on the engine.",
        503: "No engine serves, or (with `wait`) a chunk of engine work failed or timed out."},
    ("GET", "/api/v1/inference/pow/generate/{request_id}"): {
        400: "The id is not `port:uuid`.", 404: "Unknown or expired request id."},
    ("POST", "/api/v1/train/peers/remove"): {404: "That node is not registered for that task."},
}


def operations() -> dict[tuple[str, str], Doc]:
    """Every documented (method, path) with its :class:`Doc` — node routes and service routes."""
    found = dict(NODE_ROUTES)
    for row in ROUTES:
        found[(row.method, row.path)] = _service_doc(row)
    return found


def _service_doc(row: Route) -> Doc:
    summary, response = SERVICE_DOCS.get((row.method, row.path), (f"{row.service}: {row.kind}", {}))
    errors = {**_SERVICE_ERRORS, **SERVICE_EXTRA_ERRORS.get((row.method, row.path), {})}
    if not row.guarded:
        errors.pop(409)  # exempt from the 409 rule
    return Doc(summary, response, errors)


def request_bodies() -> dict[tuple[str, str], Schema]:
    """The ``$ref`` of each route's body contract, and every contract's schema by name."""
    rows = [row for row in ROUTES if row.body is not None]
    refs, _components = _contracts()
    return {(row.method, row.path): refs[row.body] for row in rows if row.body is not None}


@functools.lru_cache(maxsize=1)
def _contracts() -> tuple[dict[Any, Schema], dict[str, Schema]]:
    kinds = tuple(dict.fromkeys(row.body for row in ROUTES if row.body is not None))
    refs, components = msgspec.json.schema_components(kinds, ref_template="#/components/schemas/{name}")
    return dict(zip(kinds, refs, strict=True)), components


@functools.lru_cache(maxsize=4)
def document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once per version; treat it as read-only)."""
    bodies = request_bodies()
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), doc in sorted(operations().items(), key=lambda item: (item[0][1], item[0][0])):
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, doc, bodies.get((method, path)))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MLNode management API",
            "version": version,
            "description": (
                "Driven by the Network Node. Bodies are JSON with or without a Content-Type header; "
                "errors are {\"detail\": reason}. The /v1/* routes and the inference port are proxied "
                "to the engine and described by it."
            ),
        },
        "paths": paths,
        "components": {"schemas": {**_contracts()[1],
                                   **{name: _refs(s, skip=s) for name, s in schemas.NAMED.items()}}},
    }


def _operation(method: str, path: str, doc: Doc, body_schema: Schema | None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_').replace('.', '_')}",
        "summary": doc.summary,
        "tags": [_tag(path)],
        "responses": {"200": _response("OK", doc.response, doc.media)},
    }
    for status, description in sorted(doc.errors.items()):
        body = doc.response if status in doc.same_shape else schemas.ERROR
        op["responses"][str(status)] = _response(description, body, None)
    if body_schema is not None:
        contract = _contracts()[1][body_schema["$ref"].rsplit("/", 1)[1]]
        op["requestBody"] = {
            "required": bool(contract.get("required")),
            "description": "JSON; a missing Content-Type means JSON.",
            "content": {"application/json": {"schema": _refs(body_schema)}},
        }
    return op


def _response(description: str, schema: Schema | None, media: str | None) -> dict[str, Any]:
    if media is not None:
        return {"description": description, "content": {media: {"schema": {"type": "string"}}}}
    return {"description": description, "content": {"application/json": {"schema": _refs(schema or {})}}}


def _tag(path: str) -> str:
    parts = path.strip("/").split("/")
    service = parts[2] if len(parts) >= 4 and parts[:2] == ["api", "v1"] else ""
    return service if service in ("pow", "inference", "train") else "node"


def _refs(schema: Any, skip: Any = None) -> Any:
    """A copy of ``schema`` with every named sub-schema (other than ``skip``) as a ``$ref``."""
    if isinstance(schema, dict):
        if schema is not skip:
            for name, named in schemas.NAMED.items():
                if schema is named:
                    return {"$ref": f"#/components/schemas/{name}"}
        return {key: _refs(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_refs(item) for item in schema]
    return schema
