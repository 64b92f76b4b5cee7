"""Inference request bodies: starting the engine(s)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec

from contracts.fields import Argument, Name

#: vLLM's ``--dtype`` values (the client sends "float16" or "auto"); null means auto.
Dtype = Literal["auto", "bfloat16", "float", "float16", "float32", "half"]
DTYPES: tuple[str, ...] = get_args(Dtype)


class InferenceUp(msgspec.Struct):
    """Start the inference engine(s); additional_args are engine flags passed verbatim. Unknown fields
    are ignored."""

    model: Annotated[Name, msgspec.Meta(description="A model name or a local directory.")]
    dtype: Dtype | None = "auto"
    additional_args: list[Argument] | None = []
