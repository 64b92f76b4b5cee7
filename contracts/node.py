"""Answers of the node's own routes (state, versions, health, identity, GPUs, errors).

The gateway builds these values and the OpenAPI document publishes their schemas, so what a route
promises and what it sends are one declaration. Fields the Network Node reads are spelled as it reads
them (``network-node-today.md`` §1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from contracts.pow_v2 import PocStatus

NodeMode = Literal["POW", "INFERENCE", "TRAIN", "STOPPED"]


class Error(Struct):
    """Every refusal and failure: one line saying why (a structured detail where a route says so)."""

    detail: Annotated[str | list[Any] | dict[str, Any], Meta(
        description="The reason; PoC v2 fan-outs answer a list of per-engine errors.")]


class Status(Struct):
    status: str


class NodeState(Struct, omit_defaults=False):
    """``GET /api/v1/state``: one service at a time, and what the Network Node reads besides."""

    state: NodeMode
    version: Annotated[str, Meta(min_length=1, description="The MLNode's version (never empty).")]
    poc_status: Annotated[PocStatus | None, Meta(
        description="PoC v2 status of the engines (pow-v2.md §2.7); null outside INFERENCE.")] = None
    inference_healthy: bool | None = None
    loaded_model: Annotated[str | None, Meta(
        description="The model of the inference/up now serving; null when no engine serves.")] = None
    poc_validation_inference: Annotated[bool, Meta(
        description="True while an engine serves: it keeps serving inference while it validates PoC v2.",
    )] = False


class Versions(Struct, omit_defaults=False):
    """``GET /api/v1/versions``: answered in every state."""

    version: Annotated[str, Meta(min_length=1)]
    vllm_version: Annotated[str | None, Meta(
        description="vLLM's version when the node's engine is vLLM; null otherwise.")]
    poc_validation_inference: bool


class Identity(Struct):
    public_key: Annotated[str, Meta(description="CURVE public key, Z85 (40 characters).")]
    public_key_z85: str
    public_key_hex: Annotated[str, Meta(description="The same key as 64 hex characters.")]
    key_type: Literal["curve25519"]


class Health(Struct, omit_defaults=True):
    """``/health`` and ``/livez`` (also the 503 body)."""

    status: Literal["healthy", "unhealthy"]
    service_state: str
    gpu: dict[str, Any]
    managers: dict[str, dict[str, Any]]
    down: Annotated[list[str] | None, Meta(description="Processes that did not answer.")] = None


class Ready(Struct):
    ready: bool
    service_state: str


class GpuDevice(Struct):
    index: int
    name: str
    total_memory_mb: int
    free_memory_mb: int
    used_memory_mb: int
    utilization_percent: int | None
    temperature_c: int | None
    is_available: bool
    error_message: str | None


class GpuDevices(Struct):
    devices: list[GpuDevice]
    count: Annotated[int, Meta(ge=0)]


class GpuDriver(Struct):
    driver_version: str
    cuda_driver_version: str
    nvml_version: str
