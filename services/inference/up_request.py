"""The body of ``inference/up``: validated once, so a bad request is a 400 and never a failed launch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.errors import InvalidRequest

#: The dtypes vLLM's ``--dtype`` accepts (the client sends "float16" or "auto").
DTYPES = frozenset({"auto", "half", "float16", "bfloat16", "float", "float32"})


@dataclass(frozen=True)
class UpRequest:
    model: str
    dtype: str = "auto"
    additional_args: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "additional_args": list(self.additional_args)}


def parse_up_request(body: Any) -> UpRequest:
    """Check the client's body; unknown fields are ignored, missing dtype/additional_args default."""
    if not isinstance(body, dict):
        raise InvalidRequest('request body must be a JSON object like {"model": "...", "dtype": "auto"}')
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model must be a non-empty string")
    dtype = body.get("dtype", "auto")
    if dtype is None:
        dtype = "auto"
    if not isinstance(dtype, str):
        raise InvalidRequest(f"dtype must be a string, got {type(dtype).__name__}")
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype must be one of {', '.join(sorted(DTYPES))}; got {dtype!r}")
    args = body.get("additional_args", [])
    if args is None:
        args = []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InvalidRequest("additional_args must be a list of strings")
    if any("\x00" in a for a in args) or "\x00" in model:
        raise InvalidRequest("model and additional_args must not contain NUL characters")
    return UpRequest(model=model, dtype=dtype, additional_args=tuple(args))
