"""Turning OpenAI-style JSON bodies into a prompt, sampling parameters and optional forced tokens.

The body is validated by :mod:`.openai_schema` with vLLM's own coercions and refusals; the checks vLLM
makes while building its sampling parameters (ranges, the context length) follow here. Every refusal
is a 400 in vLLM's error shape naming the field (``param``); unknown fields are ignored, as vLLM does
(validators add their own, e.g. ``use_deterministic_hash``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .chat_template import render_chat
from .openai_schema import ChatBody, CompletionBody, OpenAIError, check_raw
from .sampling import MAX_TOP_LOGPROBS, SamplingParams
from .tokenizer import ByteTokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: pydantic's names for the branches of a union, which vLLM leaves out of ``param`` too.
_BRANCH_MARKERS = ("[", "str", "int", "float", "bool", "list", "dict", "none")


@dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    prompt: list[int]
    params: SamplingParams
    forced: list[int] | None
    stream: bool
    include_usage: bool
    top_logprobs: int


def _refusal(exc: ValidationError) -> OpenAIError:
    """One pydantic error as vLLM's validation answer: ``param`` is ``body.<field>``."""
    errors = exc.errors()
    first = errors[0]
    parts = [str(p) for p in first["loc"] if isinstance(p, int) or not str(p).startswith(_BRANCH_MARKERS)]
    loc = ".".join(parts)
    return OpenAIError(f"{len(errors)} validation error(s): {loc}: {first['msg']}", param=f"body.{loc}",
                       type="Bad Request")


def _validated(body: Any, *, chat: bool) -> ChatBody | CompletionBody:
    if not isinstance(body, dict):
        raise OpenAIError("request body must be a JSON object", param="body", type="Bad Request")
    check_raw(body, chat=chat)
    try:
        return ChatBody.model_validate(body) if chat else CompletionBody.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc) from None


def _in_range(value: float | None, default: float, field: str, lo: float, hi: float,
              lo_open: bool = False) -> float:
    """vLLM's SamplingParams ranges: temperature in [0, 2], top_p in (0, 1]."""
    if value is None:
        return default
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        opening = "(" if lo_open else "["
        raise OpenAIError(f"{field} must be in {opening}{lo}, {hi}], got {value}.", param=field)
    return float(value)


def _stop(value: str | list[str] | None) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if any(not s for s in stops):
        raise OpenAIError("stop cannot contain an empty string.", param="stop")
    return tuple(stops)


def _token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise OpenAIError(f"{field} must be a list of token ids", param=field)
    for t in value:
        if not 0 <= t < vocab_size:
            raise OpenAIError(f"{field} holds token id {t}, outside [0, {vocab_size})", param=field)
    return list(value)


def _prompt_ids(prompt: Any, add_bos: bool, tok: ByteTokenizer) -> list[int]:
    """One prompt (n = 1): a string or token ids, maybe wrapped in a one-element list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt, add_bos=add_bos)
    if isinstance(prompt, list) and prompt:
        return _token_ids(prompt, "prompt", tok.vocab_size)
    raise OpenAIError("prompt must be a string or a non-empty list of token ids (one prompt)", param="prompt")


def completion_prompt(body: dict[str, Any], tok: ByteTokenizer) -> list[int]:
    """The prompt of a ``/tokenize`` body (completions bodies go through :func:`parse`)."""
    return _prompt_ids(body.get("prompt"), body.get("add_special_tokens", True) is not False, tok)


def chat_prompt(body: dict[str, Any], tok: ByteTokenizer) -> list[int]:
    add_generation_prompt = body.get("add_generation_prompt", True) is not False
    text = render_chat(body.get("messages"), add_generation_prompt=add_generation_prompt, chatml=tok.chatml)
    return tok.encode(text)


def _positive(value: int | None, default: int, field: str) -> int:
    if value is None:
        return default
    if value < 1:
        raise OpenAIError(f"{field} must be at least 1, got {value}.", param=field)
    return value


def _logprobs(value: int, field: str) -> int:
    """How many alternatives per token: vLLM's default ``max_logprobs`` (20) bounds it; -1 (the whole
    vocabulary) is beyond that bound too."""
    if value == -1 or value > MAX_TOP_LOGPROBS:
        raise OpenAIError(f"Requested {field} of {value}, which is greater than max allowed: "
                          f"{MAX_TOP_LOGPROBS}", param=field)
    if value < 0:
        raise OpenAIError(f"{field} must be non-negative, got {value}.", param=field)
    return value


def parse(body: Any, tok: ByteTokenizer, max_model_len: int, *, chat: bool) -> ParsedRequest:
    """Validate a ``/v1/completions`` (chat=False) or ``/v1/chat/completions`` body."""
    req = _validated(body, chat=chat)
    if req.n is not None and req.n < 1:
        raise OpenAIError(f"n must be at least 1, got {req.n}.", param="n")
    if req.n not in (None, 1):  # vLLM would answer several choices; this engine answers one
        raise OpenAIError("n must be 1 on the CPU engine", param="n")
    if isinstance(req, ChatBody):
        prompt = chat_prompt(body, tok)
        want_logprobs = bool(req.logprobs)
        top = _logprobs(req.top_logprobs, "top_logprobs") if want_logprobs else 0
        key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = _positive(asked, max(1, max_model_len - len(prompt)), key)
    else:
        prompt = _prompt_ids(req.prompt, req.add_special_tokens, tok)
        want_logprobs = req.logprobs is not None
        top = _logprobs(req.logprobs, "logprobs") if req.logprobs is not None else 0
        key = "max_tokens"
        default_max = max(1, min(COMPLETIONS_DEFAULT_MAX_TOKENS, max_model_len - len(prompt)))
        max_tokens = _positive(req.max_tokens, default_max, key)
    forced = _forced(req, tok)
    if len(prompt) >= max_model_len:
        raise OpenAIError(
            f"prompt is {len(prompt)} tokens; this model's maximum context length is {max_model_len} tokens",
            param="messages" if chat else "prompt",
        )
    wanted = len(forced) if forced is not None else max_tokens
    if len(prompt) + wanted > max_model_len:
        field = ("enforced_tokens" if req.enforced_tokens is not None else "enforced_str") if forced else key
        raise OpenAIError(
            f"{field}: this model's maximum context length is {max_model_len} tokens, "
            f"but {len(prompt) + wanted} were requested "
            f"({len(prompt)} in the prompt, {wanted} in the completion)",
            param=field,
        )
    stream = bool(req.stream)
    include_usage = bool(stream and req.stream_options and req.stream_options.include_usage)
    params = SamplingParams(
        temperature=_in_range(req.temperature, 1.0, "temperature", 0.0, 2.0),
        top_p=_in_range(req.top_p, 1.0, "top_p", 0.0, 1.0, lo_open=True),
        seed=req.seed,
        max_tokens=max_tokens,
        stop=_stop(req.stop),
        logprobs=want_logprobs,
        top_logprobs=top,
    )
    return ParsedRequest(chat, prompt, params, forced, stream, include_usage, top)


def _forced(req: ChatBody | CompletionBody, tok: ByteTokenizer) -> list[int] | None:
    """``enforced_tokens`` (exact ids) wins over ``enforced_str`` (plain text, byte tokens only)."""
    if req.enforced_tokens is not None:
        return _token_ids(req.enforced_tokens, "enforced_tokens", tok.vocab_size)
    if req.enforced_str is not None:
        return tok.encode(req.enforced_str, parse_special=False)
    return None
