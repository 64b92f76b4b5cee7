"""The OpenAI request bodies the CPU engine honours, declared the way vLLM's OpenAI server declares them.

The CPU engine stands in for vLLM, so it must accept what vLLM accepts and refuse what vLLM refuses.
vLLM validates with pydantic models in lax mode; using the same library with the same field types gives
the same coercions (``"logprobs": 1`` is true, ``"max_tokens": "5"`` is 5, ``"top_p": "0.5"`` is 0.5)
and the same refusals, instead of a hand-written imitation that drifts. Only the fields the engine acts
on are declared; every other field is ignored, as vLLM ignores fields it does not know. The rules vLLM
checks on the raw body before its models run are repeated in :func:`check_raw`.

Reference: vLLM's ``ChatCompletionRequest`` / ``CompletionRequest`` (entrypoints/openai/*/protocol.py)
and ``SamplingParams._verify_args``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from node.errors import InvalidRequest

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0)]
#: ``top_logprobs: null`` means the same as omitted.
TopLogprobs = Annotated[int, BeforeValidator(lambda v: 0 if v is None else v)]


class OpenAIError(InvalidRequest):
    """A 400 in vLLM's error shape: ``type`` and ``param`` travel in the details."""

    def __init__(self, message: str, *, param: str | None, type: str = "BadRequestError") -> None:
        super().__init__(message, param=param, type=type)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Common(_Body):
    model: str | None = None
    n: int | None = 1
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool | None = None
    vllm_xargs: dict[str, Any] | None = None
    # The network's fields (see services.inference.validation.request), checked there; any JSON here.
    enforced_str: Any = None
    enforced_tokens: Any = None
    logprobs_mode: Any = None


class ChatBody(_Common):
    messages: list[dict[str, Any]]
    logprobs: bool | None = False
    top_logprobs: TopLogprobs = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True


class CompletionBody(_Common):
    prompt: list[TokenId] | list[list[TokenId]] | str | list[str] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    add_special_tokens: bool = True


def check_raw(data: dict[str, Any], *, chat: bool) -> None:
    """vLLM's checks on the raw body (before its models coerce anything)."""
    if data.get("stream_options") and not data.get("stream"):
        raise OpenAIError("Stream options can only be defined when `stream=True`.", param="stream_options")
    name = "top_logprobs" if chat else "logprobs"  # numbers only here: no strings, unlike elsewhere
    top = data.get(name)
    if top is None:
        return
    if not isinstance(top, int | float):
        raise OpenAIError(f"`{name}` must be an integer.", param=name)
    if top < 0 and top != -1:
        raise OpenAIError(f"`{name}` must be a positive value or -1.", param=name)
    if chat and (top == -1 or top > 0) and not data.get("logprobs"):
        raise OpenAIError("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
