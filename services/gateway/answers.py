"""The shapes of the management API's answers, for the OpenAPI document (the services build them).

Request bodies are not here: they are contracts (:mod:`contracts`), and the document takes their
schemas from those types.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def _text(description: str = "", *, nullable: bool = False) -> Schema:
    schema: Schema = {"type": ["string", "null"] if nullable else "string"}
    if description:
        schema["description"] = description
    return schema


TRAIN_PEER: Schema = {"$ref": "#/components/schemas/TrainPeer"}

ERROR: Schema = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}
STATUS: Schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
NODE_STATE: Schema = {
    "type": "object",
    "required": ["state"],
    "properties": {
        "state": {"enum": ["POW", "INFERENCE", "TRAIN", "STOPPED"]},
        "version": {"type": "string"},
        "poc_status": _text("PoC v2 status of the engines (pow-v2.md §2.7); null outside INFERENCE.",
                            nullable=True),
        "inference_healthy": {"type": ["boolean", "null"]},
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
POCV2_INIT: Schema = {
    "type": "object", "required": ["status", "backends", "n_groups", "results"],
    "properties": {"status": {"type": "string"}, "backends": {"type": "integer"},
                   "n_groups": {"type": "integer"}, "results": {"type": "array"},
                   "errors": {"type": ["array", "null"]}},
}
POCV2_GENERATE: Schema = {
    "type": "object", "required": ["status", "request_id"],
    "description": "queued: request_id is `port:uuid` and queued_count; completed (wait): the result.",
    "properties": {"status": {"enum": ["queued", "completed"]}, "request_id": {"type": "string"},
                   "queued_count": {"type": "integer"}},
}
POCV2_JOB: Schema = {
    "type": "object", "required": ["status", "request_id"],
    "properties": {"status": {"enum": ["queued", "running", "completed", "failed", "cancelled"]},
                   "request_id": {"type": "string"}, "error": {"type": "string"}},
}
POCV2_STATUS: Schema = {
    "type": "object", "required": ["status", "backends"],
    "properties": {"status": {"enum": ["GENERATING", "MIXED", "IDLE", "NO_BACKENDS"]},
                   "backends": {"type": "array"}},
}
POCV2_STOP: Schema = {"type": "object", "required": ["status"],
                      "properties": {"status": {"type": "string"}, "results": {"type": "array"}}}
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
        "state": {"enum": ["STARTING", "RUNNING", "STOPPING", "FINISHED", "STOPPED", "FAILED"]},
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

#: Names under which the OpenAPI document lists answer schemas (``#/components/schemas/<name>``).
NAMED: dict[str, Schema] = {
    "Error": ERROR, "Status": STATUS, "NodeState": NODE_STATE, "Identity": IDENTITY, "Health": HEALTH,
    "Ready": READY, "GpuDevice": GPU_DEVICE, "GpuDevices": GPU_DEVICES, "GpuDriver": GPU_DRIVER,
    "PowStatus": POW_STATUS, "PowAnswer": POW_ANSWER, "PowQueued": POW_QUEUED, "UpStatus": UP_STATUS,
    "TrainStatus": TRAIN_STATUS, "TrainPeerList": TRAIN_PEER_LIST,
}
