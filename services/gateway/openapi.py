"""The OpenAPI 3.1 description of the management API, built from the tables the gateway runs on.

Service routes come from :data:`~services.gateway.resources.service_routes.ROUTES` (the table that
creates them), node routes from :data:`NODE_ROUTES` here. Request bodies and answers alike are contracts
(:mod:`contracts`): the schemas are ``msgspec.json.schema_components`` of the very types that check the
requests and describe the answers, so nothing here is written twice. A unit test compares the document
with the routes of the live Falcon app, so a route added without documentation fails the build.

Not described: the ``/v1/*`` OpenAI routes and the engine paths (``/tokenize``, ...) on this port and
every path of the inference port — they belong to the engine behind the proxy, not to this API.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts import inference, models, pow, pow_v2, train
from contracts import node as node_contract
from services.gateway.resources.service_routes import ROUTES, Route

Schema = dict[str, Any]
TEXT_METRICS = "text/plain; version=0.0.4"
#: The OpenAPI document itself: any JSON object.
Document = dict[str, Any]


@dataclass(frozen=True)
class Doc:
    """What one operation answers: its success body (a contract type), and the other statuses."""

    summary: str
    response: Any
    errors: dict[int, str]
    #: When set, the success body has this media type instead of JSON (and ``response`` is ignored).
    media: str | None = None
    #: Statuses whose body has the success schema (``/health`` answers 503 with the same shape).
    same_shape: tuple[int, ...] = ()
    success: int = 200
    #: Response headers of a success (name -> description); a 204 has them and no body.
    headers: dict[str, str] = field(default_factory=dict)


_SERVICE_ERRORS = {
    400: "Bad body or wrong phase; `detail` names the field or the reason.",
    409: "Another service holds the node: `Cannot run X because MLNode is currently in Y mode. ...`",
    503: "The service is unreachable (its process is restarting) or cannot serve now.",
    504: "The service did not answer within MLNODE_BUS_TIMEOUT.",
}
_NS = "Decimal Unix nanoseconds."

NODE_ROUTES: dict[tuple[str, str], Doc] = {
    ("GET", "/api/v1/state"): Doc("The node state (one service at a time), the version, and what the "
                                  "Network Node reads besides (network-node-today.md §1).",
                                  node_contract.NodeState, {}),
    ("GET", "/api/v1/versions"): Doc("The MLNode's and vLLM's versions; answered in every state.",
                                     node_contract.Versions, {}),
    ("GET", "/api/v1/clock"): Doc("Liveness and clock probe: no body, the server's wall clock at entry and "
                                  "just before the answer (no token needed).", None, {}, success=204,
                                  headers={"X-Server-Recv-Ns": _NS, "X-Server-Send-Ns": _NS}),
    ("POST", "/api/v1/stop"): Doc("Stop whatever runs (PoW, inference, training); idempotent, no body.",
                                  node_contract.Status, {}),
    ("GET", "/api/v1/identity"): Doc("The node's CURVE public key (peers and operators pin it).",
                                     node_contract.Identity, {}),
    ("GET", "/health"): Doc("Every process answers (200) or not (503, `down` names them).",
                            node_contract.Health, {503: "Unhealthy: a process does not answer."},
                            same_shape=(503,)),
    ("GET", "/livez"): Doc("Same as /health (no token needed).", node_contract.Health,
                           {503: "Unhealthy: a process does not answer."}, same_shape=(503,)),
    ("GET", "/readyz"): Doc("The active service can do its job (or, stopped, every process answers); "
                            "no token needed.", node_contract.Ready, {503: "Not ready."}, same_shape=(503,)),
    ("GET", "/api/v1/gpu/devices"): Doc("GPUs seen through NVML; an empty list without GPUs.",
                                        node_contract.GpuDevices, {}),
    ("GET", "/api/v1/gpu/driver"): Doc("Driver, CUDA driver and NVML versions.", node_contract.GpuDriver,
                                       {503: "NVML is unavailable (no GPU driver on this host)."}),
    ("GET", "/metrics"): Doc("The operator's Prometheus metrics of the whole node (text format 0.0.4).", None,
                             {}, media=TEXT_METRICS),
    ("GET", "/api/v1/metrics"): Doc("The network's metrics schema v1 (network-node-today.md §4), nothing "
                                    "else.", None, {404: "GONKA_METRICS=off: not exported."},
                                    media=TEXT_METRICS),
    ("GET", "/api/v1/openapi.json"): Doc("This document.", Document, {}),
}

#: Summary and success body of every service route, by (method, path).
SERVICE_DOCS: dict[tuple[str, str], tuple[str, Any]] = {
    ("POST", "/api/v1/pow/init"): ("Load the PoC model for a round; phase idle.", pow.PowAnswer),
    ("POST", "/api/v1/pow/init/generate"): ("Start (or flip to) generation for a round.", pow.PowAnswer),
    ("POST", "/api/v1/pow/init/validate"): ("Start (or flip to) validation; an identical InitDto keeps "
                                            "the loaded model.", pow.PowAnswer),
    ("POST", "/api/v1/pow/phase/generate"): ("Flip the loaded round to generation.", pow.PowAnswer),
    ("POST", "/api/v1/pow/phase/validate"): ("Flip the loaded round to validation.", pow.PowAnswer),
    ("POST", "/api/v1/pow/validate"): ("Queue a batch; the verdict is POSTed to {url}/validated.",
                                       pow.PowQueued),
    ("GET", "/api/v1/pow/status"): ("The round's status and counters.", pow.PowStatus),
    ("POST", "/api/v1/pow/stop"): ("Stop the round (results already found are still delivered).",
                                   pow.PowAnswer),
    ("GET", "/api/v1/pow/outbox/dead"): (
        "Batches the receivers refused for good (4xx), newest first (`?limit=` 1-1000, default 100).",
        pow.DeadLetters),
    ("POST", "/api/v1/inference/up"): ("Start the engine(s); answers when serving or failed (503 with the "
                                       "engine's last log lines).", inference.UpAnswer),
    ("POST", "/api/v1/inference/up/async"): ("Start the engine(s) and answer at once.", inference.UpAnswer),
    ("GET", "/api/v1/inference/up/status"): ("Progress of the last start.", inference.UpStatus),
    ("POST", "/api/v1/inference/down"): ("Stop the engines; idempotent.", inference.UpAnswer),
    ("POST", "/api/v1/inference/pow/init/generate"): (
        "PoC v2: start a generation loop on every healthy engine (group_id/n_groups by port order); "
        "artifacts go to {url}/generated.", pow_v2.InitAnswer),
    ("POST", "/api/v1/inference/pow/generate"): (
        "PoC v2: artifacts of explicit nonces, or their validation (verdict to {url}/validated); queued "
        "on one engine round-robin, or answered when done with `wait`.", pow_v2.GenerateAnswer),
    ("GET", "/api/v1/inference/pow/generate/{request_id}"): (
        "PoC v2: a queued job by its `port:uuid` id; results are kept 300 s.", pow_v2.JobAnswer),
    ("GET", "/api/v1/inference/pow/status"): (
        "PoC v2: per engine IDLE or GENERATING with config and stats, aggregated.", pow_v2.StatusAnswer),
    ("POST", "/api/v1/inference/pow/stop"): (
        "PoC v2: stop every loop, drop queued jobs (results already computed are still delivered).",
        pow_v2.StopAnswer),
    ("POST", "/api/v1/train/start"): ("Start DiLoCo training; answers status 'Training started' and "
                                      "`notes` (400 when already running, on a bad field, or a "
                                      "multi-node run without registered peers).", train.TrainStatus),
    ("POST", "/api/v1/train/stop"): ("Stop training (400 when not running).", train.TrainStatus),
    ("GET", "/api/v1/train/status"): ("Whether training runs, plus progress.", train.TrainStatus),
    ("POST", "/api/v1/train/peers"): ("Register a task's peers (works in any node mode; no 409).",
                                      train.TrainPeerList),
    ("GET", "/api/v1/train/peers"): ("List registered peers (`?task_id=` for one task; no 409).",
                                     train.TrainPeerList),
    ("POST", "/api/v1/train/peers/remove"): ("Forget one peer (404 if not registered; no 409).",
                                             train.TrainPeerList),
    ("POST", "/api/v1/models/status"): ("Whether a model is in the cache: DOWNLOADED, DOWNLOADING (with "
                                        "progress), PARTIAL or NOT_FOUND (any node state).",
                                        models.ModelStatus),
    ("POST", "/api/v1/models/download"): ("Download a model into the cache in the background (202; "
                                          "DOWNLOADED when already complete, IGNORED with HF_HUB_OFFLINE).",
                                          models.DownloadStarted),
    ("DELETE", "/api/v1/models"): ("Delete a cached revision (every revision without hf_commit), or cancel "
                                   "its running download.", models.Deleted),
    ("GET", "/api/v1/models/list"): ("Every cached revision and whether it is complete.", models.ModelList),
    ("GET", "/api/v1/models/space"): ("Size of the cache and free space on its disk (GiB).", models.Space),
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
    ("POST", "/api/v1/models/download"): {
        409: "`Model <task_id> is already downloading`.",
        429: f"`Maximum concurrent downloads ({models.MAX_DOWNLOADS}) reached`."},
    ("DELETE", "/api/v1/models"): {404: "Not in the cache, or that revision is not.",
                                   409: "The model is being served (inference/down first)."},
    ("POST", "/api/v1/pow/validate"): {
        429: "Validation queue full (MLNODE_POW_MAX_QUEUED_BATCHES / MLNODE_POW_MAX_QUEUED_NONCES)."},
}
#: What the edge (services/gateway/edge.py, server.py) may answer on any management route.
EDGE_ERRORS = {
    403: "Cross-site request refused: a browser `Origin` not in MLNODE_ALLOWED_ORIGINS, or "
         "`Sec-Fetch-Site: cross-site`.",
    408: "The request head or body did not arrive within MLNODE_HEADER_TIMEOUT / MLNODE_BODY_TIMEOUT.",
    413: "The body is larger than MLNODE_MAX_BODY_BYTES, or than the bus carries once encoded.",
    415: "A form or plain-text Content-Type (the API takes JSON, or no Content-Type).",
    503: "Too many concurrent requests on this port (MLNODE_MAX_REQUESTS); never for a stop.",
}
_TAGS = ("pow", "inference", "train", "models")


def operations() -> dict[tuple[str, str], Doc]:
    """Every documented (method, path) with its :class:`Doc` — node routes and service routes."""
    found = dict(NODE_ROUTES)
    for row in ROUTES:
        found[(row.method, row.path)] = _service_doc(row)
    return found


def _service_doc(row: Route) -> Doc:
    summary, response = SERVICE_DOCS.get((row.method, row.path), (f"{row.service}: {row.kind}", None))
    errors = dict(_SERVICE_ERRORS)
    if not row.guarded:
        errors.pop(409)  # exempt from the 409 rule
    errors.update(SERVICE_EXTRA_ERRORS.get((row.method, row.path), {}))
    return Doc(summary, response, errors, success=row.success)


def request_bodies() -> dict[tuple[str, str], Schema]:
    """The ``$ref`` of each route's body contract."""
    refs, _components = _contracts()
    return {(row.method, row.path): refs[row.body] for row in ROUTES if row.body is not None}


@functools.lru_cache(maxsize=1)
def _contracts() -> tuple[dict[Any, Schema], dict[str, Schema]]:
    """Schemas of every request body, answer and the error, as shared components."""
    bodies = [row.body for row in ROUTES if row.body is not None]
    answers = [doc.response for doc in operations().values() if doc.response is not None]
    kinds = tuple(dict.fromkeys([*bodies, *answers, node_contract.Error]))
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
                "errors are {\"detail\": reason}. With MLNODE_API_TOKEN set, every route but /api/v1/clock, "
                "/livez and /readyz needs `Authorization: Bearer <token>` (else 401). The /v1/* routes, "
                "/tokenize, /detokenize, /version and the inference port are proxied to the engine and "
                "described by it."
            ),
        },
        "paths": paths,
        "components": {"schemas": _contracts()[1]},
    }


def _operation(method: str, path: str, doc: Doc, body_schema: Schema | None) -> dict[str, Any]:
    refs = _contracts()[0]
    op: dict[str, Any] = {
        "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_').replace('.', '_')}"
                       .replace("{", "").replace("}", ""),
        "summary": doc.summary,
        "tags": [_tag(path)],
        "responses": {str(doc.success): _response("OK", refs.get(doc.response), doc.media, doc.headers)},
    }
    names = re.findall(r"\{([^}]+)\}", path)
    if names:
        op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                            for name in names]
    errors = {**EDGE_ERRORS, **doc.errors}
    for status in EDGE_ERRORS.keys() & doc.errors.keys():
        errors[status] = f"{doc.errors[status]} Or: {EDGE_ERRORS[status]}"
    for status, description in sorted(errors.items()):
        body = refs.get(doc.response) if status in doc.same_shape else refs[node_contract.Error]
        op["responses"][str(status)] = _response(description, body, None, {})
    if body_schema is not None:
        contract = _contracts()[1][body_schema["$ref"].rsplit("/", 1)[1]]
        op["requestBody"] = {
            "required": bool(contract.get("required")),
            "description": "JSON; a missing Content-Type means JSON.",
            "content": {"application/json": {"schema": body_schema}},
        }
    return op


def _response(description: str, schema: Schema | None, media: str | None,
              headers: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if headers:
        out["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                          for name, text in headers.items()}
    if media is not None:
        out["content"] = {media: {"schema": {"type": "string"}}}
    elif schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _tag(path: str) -> str:
    parts = path.strip("/").split("/")
    service = parts[2] if len(parts) >= 3 and parts[:2] == ["api", "v1"] else ""
    return service if service in _TAGS else "node"
