"""Turning OpenAI-style JSON bodies into a prompt, sampling parameters and optional forced tokens.

Every malformed value raises InvalidRequest naming its field (the server answers 400 with it); unknown
fields are ignored, as validators add their own (``use_deterministic_hash`` ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from node.errors import InvalidRequest

from .chat_template import render_chat
from .sampling import MAX_TOP_LOGPROBS, SamplingParams
from .tokenizer import ByteTokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    prompt: list[int]
    params: SamplingParams
    forced: list[int] | None
    stream: bool
    include_usage: bool
    top_logprobs: int


def _present(body: dict[str, Any], key: str) -> bool:
    return body.get(key) is not None


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InvalidRequest(f"{key} must be {bound}, got {value}")
    return value


def _float(
    body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{key} must be a number")
    if value > hi or value < lo or (lo_open and value == lo):
        raise InvalidRequest(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return float(value)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be a boolean")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise InvalidRequest("stop must be a string or a list of strings")


def _token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRequest(f"{field} must be a list of token ids")
    for t in value:
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"{field} holds token id {t}, outside [0, {vocab_size})")
    return list(value)


def completion_prompt(body: dict[str, Any], tok: ByteTokenizer) -> list[int]:
    """The prompt of a completions / tokenize body: a string or token ids (one prompt, n = 1)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        add_bos = body.get("add_special_tokens", True) is not False
        return tok.encode(prompt, add_bos=add_bos)
    if isinstance(prompt, list) and prompt:
        return _token_ids(prompt, "prompt", tok.vocab_size)
    raise InvalidRequest("prompt must be a string or a non-empty list of token ids (one prompt)")


def chat_prompt(body: dict[str, Any], tok: ByteTokenizer) -> list[int]:
    add_generation_prompt = body.get("add_generation_prompt", True) is not False
    text = render_chat(body.get("messages"), add_generation_prompt=add_generation_prompt, chatml=tok.chatml)
    return tok.encode(text)


def parse(body: Any, tok: ByteTokenizer, max_model_len: int, *, chat: bool) -> ParsedRequest:
    """Validate a ``/v1/completions`` (chat=False) or ``/v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise InvalidRequest("model must be a string")
    prompt = chat_prompt(body, tok) if chat else completion_prompt(body, tok)
    if _int(body, "n", 1, 1, 1) != 1:
        raise InvalidRequest("n must be 1")
    if chat:
        want_logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
        if top and not want_logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true")
        key = "max_completion_tokens" if _present(body, "max_completion_tokens") else "max_tokens"
        default_max = max(1, max_model_len - len(prompt))
    else:
        completion_logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        want_logprobs = completion_logprobs is not None
        top = completion_logprobs or 0
        key = "max_tokens"
        default_max = max(1, min(COMPLETIONS_DEFAULT_MAX_TOKENS, max_model_len - len(prompt)))
    max_tokens = _int(body, key, default_max, 1)
    assert max_tokens is not None
    forced = _forced(body, tok)
    if len(prompt) >= max_model_len:
        raise InvalidRequest(
            f"prompt is {len(prompt)} tokens; this model's maximum context length is {max_model_len} tokens"
        )
    wanted = len(forced) if forced is not None else max_tokens
    if len(prompt) + wanted > max_model_len:
        field = (
            ("enforced_tokens" if _present(body, "enforced_tokens") else "enforced_str") if forced else key
        )
        raise InvalidRequest(
            f"{field}: this model's maximum context length is {max_model_len} tokens, "
            f"but {len(prompt) + wanted} were requested "
            f"({len(prompt)} in the prompt, {wanted} in the completion)"
        )
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object")
    include_usage = bool(stream and options and _bool(options, "include_usage"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequest("seed must be an integer")
    params = SamplingParams(
        temperature=_float(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
        max_tokens=max_tokens,
        stop=_stop(body),
        logprobs=want_logprobs,
        top_logprobs=top,
    )
    return ParsedRequest(chat, prompt, params, forced, stream, include_usage, top)


def _forced(body: dict[str, Any], tok: ByteTokenizer) -> list[int] | None:
    """``enforced_tokens`` (exact ids) wins over ``enforced_str`` (plain text, byte tokens only)."""
    if _present(body, "enforced_tokens"):
        return _token_ids(body["enforced_tokens"], "enforced_tokens", tok.vocab_size)
    if _present(body, "enforced_str"):
        text = body["enforced_str"]
        if not isinstance(text, str):
            raise InvalidRequest("enforced_str must be a string")
        return tok.encode(text, parse_special=False)
    return None
