"""JSON Schemas of the management API, and the small validator the gateway checks bodies with.

One set of dicts serves two readers: :func:`validate` rejects a bad body at the gateway with a 400 that
names the field (before any bus traffic), and :mod:`services.gateway.openapi` publishes the very same
dicts as the OpenAPI document, so the description cannot drift from what is enforced.

The validator knows a subset of JSON Schema — ``type`` (one name or a list), ``required``,
``properties``, ``additionalProperties`` (bool or schema), ``items``, ``minimum``, ``maximum``,
``minLength``, ``maxItems`` and ``enum`` — plus the documentation-only keywords in :data:`DOC_KEYWORDS`.
Deliberately strict where the services are strict: an ``integer`` is a JSON integer (not ``1.0``, not
``true``) and a ``number`` must be finite. Request schemas keep ``additionalProperties`` open wherever
the Network Node may add fields; the services decide semantics (divisibility, phases, URLs).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from node.errors import InvalidRequest

Schema = dict[str, Any]

INT64_MAX = 2**63 - 1
#: Keywords :func:`validate` enforces; a schema using anything else must use only DOC_KEYWORDS.
CHECKED_KEYWORDS = frozenset({"type", "required", "properties", "additionalProperties", "items",
                              "minimum", "maximum", "minLength", "maxItems", "enum"})
#: Keywords that only describe (the OpenAPI document shows them; nothing checks them).
DOC_KEYWORDS = frozenset({"title", "description", "format", "examples", "default"})

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _int(minimum: int = 0, maximum: int = INT64_MAX, description: str = "") -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if description:
        schema["description"] = description
    return schema


def _number(description: str = "") -> Schema:
    schema: Schema = {"type": "number"}
    if description:
        schema["description"] = description
    return schema


def _text(description: str = "", *, nullable: bool = False) -> Schema:
    schema: Schema = {"type": ["string", "null"] if nullable else "string"}
    if description:
        schema["description"] = description
    return schema


# --- request bodies ----------------------------------------------------------------------------

POW_PARAMS: Schema = {
    "type": "object",
    "description": "PoC v1 model shape (pow-v1.md); the pow service checks divisibility and support.",
    "required": ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier",
                 "multiple_of", "norm_eps", "rope_theta", "use_scaled_rope", "seq_len"],
    "properties": {
        "dim": _int(1), "n_layers": _int(1), "n_heads": _int(1), "n_kv_heads": _int(1),
        "vocab_size": _int(1), "multiple_of": _int(1), "seq_len": _int(1),
        "ffn_dim_multiplier": _number("Integers are accepted where floats are meant."),
        "norm_eps": _number(), "rope_theta": _number(),
        "use_scaled_rope": {"type": "boolean", "description": "Only false is supported by PoC v1."},
    },
    "additionalProperties": True,
}

INIT_DTO: Schema = {
    "type": "object",
    "description": "A PoC round as the Network Node sends it (field order and number forms as sent).",
    "required": ["block_hash", "block_height", "public_key", "batch_size", "r_target", "fraud_threshold",
                 "params", "node_id", "node_count", "url"],
    "properties": {
        "block_hash": {"type": "string", "minLength": 1},
        "block_height": _int(0),
        "public_key": {"type": "string", "minLength": 1},
        "batch_size": _int(1, description="A hint; the node picks its own batch size."),
        "r_target": {"type": "number", "minimum": 0, "description": "Distances below this are valid (> 0)."},
        "fraud_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "params": POW_PARAMS,
        "node_id": _int(-1, description="Starts at 1, may be >= node_count; -1 (unset) is refused with "
                                        "'Node ID and node count must be set'."),
        "node_count": _int(-1, description="-1 (unset) is refused like node_id."),
        "url": {"type": "string", "minLength": 1, "format": "uri",
                "description": "Callback base: results go to {url}/generated and {url}/validated."},
    },
    "additionalProperties": True,
}

PROOF_BATCH: Schema = {
    "type": "object",
    "description": "One participant's claimed nonces and distances, to validate against the loaded round.",
    "required": ["public_key", "block_hash", "block_height", "nonces", "dist"],
    "properties": {
        "public_key": {"type": "string", "minLength": 1},
        "block_hash": {"type": "string", "minLength": 1},
        "block_height": _int(0),
        "nonces": {"type": "array", "items": _int(0), "maxItems": 100_000},
        "dist": {"type": "array", "items": _number(), "maxItems": 100_000},
        "node_id": {"type": "integer", "minimum": -INT64_MAX, "maximum": INT64_MAX, "default": 0},
    },
    "additionalProperties": True,
}

#: vLLM's ``--dtype`` values (the client sends "float16" or "auto"); null means auto.
DTYPES = ("auto", "bfloat16", "float", "float16", "float32", "half")

INFERENCE_UP: Schema = {
    "type": "object",
    "description": "Start the inference engine(s); additional_args are engine flags passed verbatim.",
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "dtype": {"type": ["string", "null"], "enum": [*DTYPES, None], "default": "auto"},
        "additional_args": {"type": ["array", "null"], "items": {"type": "string"}, "default": []},
    },
    "additionalProperties": True,
}

_SECTION: Schema = {"type": ["object", "null"], "additionalProperties": True}

TRAIN_START: Schema = {
    "type": "object",
    "description": "The original trainer's request; the train service reports fields it ignored.",
    "properties": {
        "train_config": {
            "type": ["object", "null"],
            "properties": {name: _SECTION for name in ("train", "data", "optim", "diloco", "ckpt", "model")},
            "additionalProperties": True,
        },
        "train_env": {
            "type": ["object", "null"],
            "description": "String values (TASK_ID, GLOBAL_ADDR, GLOBAL_RANK, ...); integers are tolerated.",
            "additionalProperties": {"type": ["string", "integer", "null"]},
        },
    },
    "additionalProperties": True,
}

_TASK_ID: Schema = {"type": "string", "minLength": 1, "description": "The task's id (train_env TASK_ID)."}

TRAIN_PEER: Schema = {
    "type": "object",
    "description": "One node of a training task: the key it proves on the peer link, where it listens.",
    "required": ["node_id", "public_key", "address"],
    "properties": {
        "node_id": {"type": "string", "minLength": 1},
        "public_key": _text("CURVE public key: 40 Z85 or 64 hex characters (GET /api/v1/identity)."),
        "address": _text("host:port its peer listener is reachable at ([v6]:port for IPv6)."),
        "rank": {"type": ["integer", "null"], "minimum": 0, "description": "GLOBAL_RANK, when known."},
    },
    "additionalProperties": False,
}

TRAIN_PEERS: Schema = {
    "type": "object",
    "description": "Register (add or update) a task's peers; replace=true drops the ones not listed. "
                   "This node's own entry may be listed: it sets the port its listener binds.",
    "required": ["task_id", "peers"],
    "properties": {
        "task_id": _TASK_ID,
        "peers": {"type": "array", "items": TRAIN_PEER, "maxItems": 4096},
        "replace": {"type": "boolean", "default": False},
    },
    "additionalProperties": False,
}

TRAIN_PEER_REMOVE: Schema = {
    "type": "object",
    "description": "Forget one peer of a task; its connections stop being heard at once.",
    "required": ["task_id", "node_id"],
    "properties": {"task_id": _TASK_ID, "node_id": {"type": "string", "minLength": 1}},
    "additionalProperties": False,
}

#: Request-body schema of every route that reads a body, by (method, path).
REQUEST_BODIES: dict[tuple[str, str], Schema] = {
    ("POST", "/api/v1/pow/init"): INIT_DTO,
    ("POST", "/api/v1/pow/init/generate"): INIT_DTO,
    ("POST", "/api/v1/pow/init/validate"): INIT_DTO,
    ("POST", "/api/v1/pow/validate"): PROOF_BATCH,
    ("POST", "/api/v1/inference/up"): INFERENCE_UP,
    ("POST", "/api/v1/inference/up/async"): INFERENCE_UP,
    ("POST", "/api/v1/train/start"): TRAIN_START,
    ("POST", "/api/v1/train/peers"): TRAIN_PEERS,
    ("POST", "/api/v1/train/peers/remove"): TRAIN_PEER_REMOVE,
}

# --- responses -----------------------------------------------------------------------------------

ERROR: Schema = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}
STATUS: Schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
NODE_STATE: Schema = {
    "type": "object",
    "required": ["state"],
    "properties": {
        "state": {"enum": ["POW", "INFERENCE", "TRAIN", "STOPPED"]},
        "version": {"type": "string"},
        "poc_status": {"type": "string"},
        "inference_healthy": {"type": "boolean"},
        "loaded_model": _text(nullable=True),
    },
}
IDENTITY: Schema = {
    "type": "object",
    "required": ["public_key", "public_key_hex"],
    "properties": {"public_key": _text("CURVE public key, Z85 (40 characters)."),
                   "public_key_z85": {"type": "string"},
                   "public_key_hex": _text("The same key as 64 hex characters."),
                   "key_type": {"enum": ["curve25519"]}},
}
HEALTH: Schema = {
    "type": "object",
    "required": ["status", "service_state", "gpu", "managers"],
    "properties": {
        "status": {"enum": ["healthy", "unhealthy"]},
        "service_state": {"type": "string"},
        "gpu": {"type": "object"},
        "managers": {"type": "object", "additionalProperties": {"type": "object"}},
        "down": {"type": "array", "items": {"type": "string"},
                 "description": "Processes that did not answer."},
    },
}
READY: Schema = {"type": "object", "required": ["ready"],
                 "properties": {"ready": {"type": "boolean"}, "service_state": {"type": "string"}}}
_NULLABLE_INT: Schema = {"type": ["integer", "null"]}
GPU_DEVICE: Schema = {
    "type": "object",
    "required": ["index", "name", "total_memory_mb", "free_memory_mb", "used_memory_mb",
                 "utilization_percent", "temperature_c", "is_available", "error_message"],
    "properties": {
        "index": {"type": "integer"}, "name": {"type": "string"},
        "total_memory_mb": {"type": "integer"}, "free_memory_mb": {"type": "integer"},
        "used_memory_mb": {"type": "integer"}, "utilization_percent": _NULLABLE_INT,
        "temperature_c": _NULLABLE_INT, "is_available": {"type": "boolean"},
        "error_message": _text(nullable=True),
    },
}
GPU_DEVICES: Schema = {"type": "object", "required": ["devices", "count"],
                       "properties": {"devices": {"type": "array", "items": GPU_DEVICE},
                                      "count": {"type": "integer", "minimum": 0}}}
GPU_DRIVER: Schema = {"type": "object", "required": ["driver_version", "cuda_driver_version", "nvml_version"],
                      "properties": {"driver_version": {"type": "string"},
                                     "cuda_driver_version": {"type": "string"},
                                     "nvml_version": {"type": "string"}}}
POW_STATUS: Schema = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["IDLE", "NOT_LOADED", "LOADING", "GENERATING", "VALIDATING", "STOPPED", "MIXED"]},
        "is_model_initialized": {"type": "boolean"},
        "nonces_computed": {"type": "integer"}, "valid_found": {"type": "integer"},
        "nonces_per_second": {"type": "number"}, "batches_validated": {"type": "integer"},
        "fraud_detected": {"type": "integer"}, "outbox": {"type": "object"},
    },
}
POW_ANSWER: Schema = {"type": "object", "required": ["status"],
                      "properties": {"status": {"type": "string"}, "pow_status": POW_STATUS}}
POW_QUEUED: Schema = {"type": "object", "required": ["status"],
                      "properties": {"status": {"type": "string"}, "queued": {"type": "integer"},
                                     "nonces": {"type": "integer"}}}
UP_STATUS: Schema = {
    "type": "object",
    "required": ["status", "is_starting", "is_running", "elapsed_seconds", "error"],
    "properties": {
        "status": {"enum": ["not_started", "in_progress", "completed", "failed", "cancelled"]},
        "is_starting": {"type": "boolean"}, "is_running": {"type": "boolean"},
        "elapsed_seconds": {"type": "number"}, "error": _text(nullable=True),
    },
}
TRAIN_STATUS: Schema = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"type": ["boolean", "string"],
                   "description": "train/status: whether training runs; start/stop: the outcome."},
        "state": {"enum": ["STARTING", "RUNNING", "FINISHED", "STOPPED", "FAILED"]},
        "notes": {"type": "array", "items": {"type": "string"},
                  "description": "Request fields accepted but not honoured."},
        "task_id": {"type": "string"}, "rank": {"type": "integer"}, "world_size": {"type": "integer"},
        "outer_step": {"type": "integer"}, "inner_step": {"type": "integer"},
        "total_steps": {"type": "integer"}, "loss": {"type": ["number", "null"]},
        "loss_ema": {"type": ["number", "null"]},
        "contributors": {"type": "array", "items": {"type": "integer"}},
        "peers": {"type": "array", "items": TRAIN_PEER},
        "bytes_sent": {"type": "integer"}, "bytes_received": {"type": "integer"},
        "bytes_exchanged": {"type": "integer"},
        "weights_digest": _text("sha256 of the global weights (float32, parameter order) after the "
                                "last outer step; equal on every node of a run.", nullable=True),
        "error": _text(nullable=True),
    },
}
TRAIN_PEER_LIST: Schema = {
    "type": "object",
    "description": "One task's peers (?task_id=) or, without it, every task's under 'tasks'.",
    "properties": {
        "task_id": {"type": "string"},
        "peers": {"type": "array", "items": TRAIN_PEER},
        "tasks": {"type": "array", "items": {"type": "object"}},
    },
}

#: Names under which the OpenAPI document lists shared schemas (``#/components/schemas/<name>``).
NAMED: dict[str, Schema] = {
    "InitDto": INIT_DTO, "PowParams": POW_PARAMS, "ProofBatch": PROOF_BATCH, "InferenceUp": INFERENCE_UP,
    "TrainStart": TRAIN_START, "Error": ERROR, "Status": STATUS, "NodeState": NODE_STATE,
    "Identity": IDENTITY, "Health": HEALTH, "Ready": READY, "GpuDevice": GPU_DEVICE,
    "GpuDevices": GPU_DEVICES, "GpuDriver": GPU_DRIVER, "PowStatus": POW_STATUS, "PowAnswer": POW_ANSWER,
    "PowQueued": POW_QUEUED, "UpStatus": UP_STATUS, "TrainStatus": TRAIN_STATUS,
    "TrainPeer": TRAIN_PEER, "TrainPeers": TRAIN_PEERS, "TrainPeerRemove": TRAIN_PEER_REMOVE,
    "TrainPeerList": TRAIN_PEER_LIST,
}


# --- the validator -------------------------------------------------------------------------------

def check_body(method: str, path: str, body: Any) -> None:
    """Validate ``body`` against the route's request schema (routes without one accept anything)."""
    schema = REQUEST_BODIES.get((method, path))
    if schema is not None:
        validate(body, schema)


def validate(value: Any, schema: Schema, where: str = "") -> None:
    """Raise :class:`InvalidRequest` naming the first part of ``value`` that ``schema`` refuses."""
    _check_type(value, schema, where)
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        options = ", ".join(o if isinstance(o, str) else json.dumps(o) for o in schema["enum"])
        raise InvalidRequest(f"{_name(where)} must be one of {options}; got {_show(value)}")
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        _check_range(value, schema, where)
    elif isinstance(value, str):
        minimum = schema.get("minLength")
        if minimum is not None and len(value) < minimum:
            what = "a non-empty string" if minimum == 1 else f"at least {minimum} characters long"
            raise InvalidRequest(f"{_name(where)} must be {what}")
    elif isinstance(value, list):
        _check_array(value, schema, where)
    elif isinstance(value, dict):
        _check_object(value, schema, where)


def _check_type(value: Any, schema: Schema, where: str) -> None:
    wanted = schema.get("type")
    if wanted is None:
        return
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    for name in names:
        if _json_type(value) == name or (name == "number" and _json_type(value) == "integer"):
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequest(f"{_name(where)} must be a finite number, got {_show(value)}")
            return
    expected = " or ".join("null" if n == "null" else ("an " if n[0] in "aeiou" else "a ") + n for n in names)
    if where == "" and "object" in names:
        expected = expected.replace("an object", "a JSON object")
    raise InvalidRequest(f"{_name(where)} must be {expected}, got {_json_type(value)}")


def _check_range(value: float, schema: Schema, where: str) -> None:
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{_name(where)} must be >= {minimum}, got {_show(value)}")
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"{_name(where)} must be <= {maximum}, got {_show(value)}")


def _check_array(value: list[Any], schema: Schema, where: str) -> None:
    limit = schema.get("maxItems")
    if limit is not None and len(value) > limit:
        raise InvalidRequest(f"{_name(where)} has {len(value)} entries; at most {limit} are allowed")
    items = schema.get("items")
    if items is not None:
        for index, item in enumerate(value):
            validate(item, items, f"{where}[{index}]" if where else f"request body[{index}]")


def _check_object(value: dict[str, Any], schema: Schema, where: str) -> None:
    for key in schema.get("required", ()):
        if key not in value:
            raise InvalidRequest(f"{_join(where, key)} is required")
    properties: dict[str, Schema] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            validate(item, properties[key], _join(where, key))
        elif extra is False:
            raise InvalidRequest(f"{_join(where, key)} is not a known field")
        elif isinstance(extra, dict):
            validate(item, extra, _join(where, key))


def _same(value: Any, option: Any) -> bool:
    """Enum membership with JSON's notion of equality (``true`` is not ``1``, ``null`` only itself)."""
    if isinstance(value, bool) or value is None or isinstance(option, bool) or option is None:
        return value is option
    return bool(value == option)


def _join(where: str, key: str) -> str:
    part = key if _IDENTIFIER.match(key) else repr(key)[:60]
    if not where:
        return part
    return f"{where}.{part}" if _IDENTIFIER.match(key) else f"{where}[{part}]"


def _name(where: str) -> str:
    return where or "request body"


def _json_type(value: Any) -> str:
    for name in ("boolean", "null", "object", "array", "string", "integer", "number"):
        if isinstance(value, _JSON_TYPES[name]):
            return name
    return type(value).__name__


def _show(value: Any) -> str:
    """A short one-line rendering of a client value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
