"""Inference request bodies: starting the engine(s)."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

from contracts.fields import Argument, ModelName

#: vLLM's ``--dtype`` values (the client sends "float16" or "auto"); null means auto.
Dtype = Literal["auto", "bfloat16", "float", "float16", "float32", "half"]
DTYPES: tuple[str, ...] = get_args(Dtype)


class InferenceUp(msgspec.Struct):
    """Start the inference engine(s). additional_args are engine flags the node's engine-argument policy
    takes (full names from an allowlist; a refusal is a 400 naming the flag). Unknown fields are
    ignored."""

    model: ModelName
    dtype: Dtype | None = "auto"
    additional_args: list[Argument] | None = []


class UpAnswer(msgspec.Struct):
    """What ``up`` (``{"status": "OK"}`` once serving), ``up/async`` (``starting``) and ``down`` answer."""

    status: str
    model: str | msgspec.UnsetType = msgspec.UNSET
    engine: str | msgspec.UnsetType = msgspec.UNSET
    detail: str | msgspec.UnsetType = msgspec.UNSET


class UpStatus(msgspec.Struct):
    """``GET /api/v1/inference/up/status``: progress of the last start."""

    status: Literal["not_started", "in_progress", "completed", "failed", "cancelled"]
    is_starting: bool
    is_running: bool
    elapsed_seconds: float
    error: str | None
    model: str | msgspec.UnsetType | None = msgspec.UNSET
