"""Turning OpenAI-style JSON bodies into a prompt, sampling parameters and optional forced tokens.

The body is validated by :mod:`.openai_schema` with vLLM's own coercions and refusals; the checks vLLM
makes while building its sampling parameters (``SamplingParams._verify_args``, the vocabulary checks of
``SamplingParams.verify``) and its ``max_tokens`` rule (``get_max_tokens``: clamped to the room the prompt
leaves) follow here. The network's fields (``logprobs_mode``, ``enforced_tokens``, ``enforced_str``; top
level, or in ``vllm_xargs`` as vLLM takes them) are read by :mod:`services.inference.validation.request`,
the same code the vLLM plugin runs. Every refusal is a 400 in vLLM's error shape naming the field
(``param``); unknown fields are ignored, as vLLM does (validators add their own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from services.inference.validation.request import FIELDS, FieldError, resolve

from .chat_template import render_chat
from .openai_schema import ChatBody, CompletionBody, OpenAIError, check_raw
from .sampling import MAX_TOP_LOGPROBS, SamplingParams
from .tokenizer import Tokenizer

#: pydantic's names for the branches of a union, which vLLM leaves out of ``param`` too.
_BRANCH_MARKERS = ("[", "str", "int", "float", "bool", "list", "dict", "none")
#: vLLM clamps each logit bias to this magnitude.
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class EngineContext:
    """What parsing needs to know about the served model."""

    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    default_mode: str


@dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    prompt: list[int]
    params: SamplingParams
    forced: tuple[int, ...] | None
    stream: bool
    include_usage: bool
    return_token_ids: bool


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


def _bounded(value: float | None, default: float, field: str, lo: float, hi: float, *,
             lo_open: bool = False) -> float:
    """A float sampling parameter inside vLLM's range (``lo_open``: ``lo`` itself excluded)."""
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
    return tuple(dict.fromkeys(stops))


def _in_vocab(ids: list[int], field: str, vocab_size: int) -> list[int]:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise OpenAIError(f"{field} holds token id {t}, outside [0, {vocab_size})", param=field)
    return ids


def _prompt_ids(prompt: Any, add_special_tokens: bool, ctx: EngineContext) -> list[int]:
    """One prompt (n = 1): a string or token ids, maybe wrapped in a one-element list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return ctx.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return _in_vocab(list(prompt), "prompt", ctx.vocab_size)
    raise OpenAIError("prompt must be a string or a non-empty list of token ids (one prompt)", param="prompt")


def completion_prompt(body: dict[str, Any], ctx: EngineContext) -> list[int]:
    """The prompt of a ``/tokenize`` body (completions bodies go through :func:`parse`)."""
    return _prompt_ids(body.get("prompt"), body.get("add_special_tokens", True) is not False, ctx)


def chat_prompt(body: dict[str, Any], ctx: EngineContext) -> list[int]:
    """The ids of a chat: the model's template rendered, then tokenized without added specials (vLLM)."""
    tok = ctx.tokenizer
    text = render_chat(body.get("messages"), tok.chat_template,
                       add_generation_prompt=body.get("add_generation_prompt", True) is not False,
                       special={"bos_token": tok.bos_token, "eos_token": tok.eos_token})
    return tok.encode(text, add_special_tokens=body.get("add_special_tokens", False) is True)


def _logprobs(value: int, field: str) -> int:
    """How many alternatives per token: vLLM's default ``max_logprobs`` (20) bounds it; -1 (the whole
    vocabulary) is beyond that bound too."""
    if value == -1 or value > MAX_TOP_LOGPROBS:
        raise OpenAIError(f"Requested {field} of {value}, which is greater than max allowed: "
                          f"{MAX_TOP_LOGPROBS}", param=field)
    if value < 0:
        raise OpenAIError(f"{field} must be non-negative, got {value}.", param=field)
    return value


def _max_tokens(asked: int | None, field: str, prompt_len: int, ctx: EngineContext, chat: bool) -> int:
    """vLLM's ``get_max_tokens``: what was asked, at most the room the prompt leaves in the context."""
    if prompt_len > ctx.max_model_len:
        raise OpenAIError(f"Input length ({prompt_len}) exceeds model's maximum context length "
                          f"({ctx.max_model_len}).", param="messages" if chat else "prompt")
    room = ctx.max_model_len - prompt_len
    if asked is not None and asked < 1:
        raise OpenAIError(f"{field} must be at least 1, got {asked}.", param=field)
    value = room if asked is None else min(asked, room)
    if value < 1:
        raise OpenAIError(f"max_tokens must be at least 1, got {value}.", param=field)
    return value


def _network_fields(req: ChatBody | CompletionBody) -> dict[str, Any]:
    """``vllm_xargs`` and the top-level fields (which win), as vLLM's plugin reads them."""
    fields = {k: v for k, v in (req.vllm_xargs or {}).items() if k in FIELDS}
    fields.update({k: getattr(req, k) for k in FIELDS if getattr(req, k) is not None})
    return fields


def parse(body: Any, ctx: EngineContext, *, chat: bool) -> ParsedRequest:
    """Validate a ``/v1/completions`` (chat=False) or ``/v1/chat/completions`` body."""
    req = _validated(body, chat=chat)
    if req.n is not None and req.n < 1:
        raise OpenAIError(f"n must be at least 1, got {req.n}.", param="n")
    if req.n not in (None, 1):  # vLLM would answer several choices; this engine answers one
        raise OpenAIError("n must be 1 on the CPU engine", param="n")
    if isinstance(req, ChatBody):
        prompt = chat_prompt(body, ctx)
        logprobs = _logprobs(req.top_logprobs, "top_logprobs") if req.logprobs else None
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    else:
        prompt = _prompt_ids(req.prompt, req.add_special_tokens, ctx)
        logprobs = _logprobs(req.logprobs, "logprobs") if req.logprobs is not None else None
        field, asked = "max_tokens", req.max_tokens
    max_tokens = _max_tokens(asked, field, len(prompt), ctx, chat)
    try:
        network = resolve(_network_fields(req), vocab_size=ctx.vocab_size, default_mode=ctx.default_mode,
                          tokenize=lambda text: ctx.tokenizer.encode(text, add_special_tokens=False))
    except FieldError as exc:
        raise OpenAIError(str(exc), param=exc.param) from None
    top_k = -1 if req.top_k is None else req.top_k
    if top_k < -1:
        raise OpenAIError(f"top_k must be 0 (disable), or at least 1, got {top_k}.", param="top_k")
    if req.min_tokens < 0:
        raise OpenAIError(f"min_tokens must be greater than or equal to 0, got {req.min_tokens}.",
                          param="min_tokens")
    if req.min_tokens > max_tokens:
        raise OpenAIError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                          f"got {req.min_tokens}.", param="min_tokens")
    repetition = req.repetition_penalty
    if repetition is not None and (not math.isfinite(repetition) or repetition <= 0):
        raise OpenAIError(f"repetition_penalty must be a finite number greater than zero, got {repetition}.",
                          param="repetition_penalty")
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise OpenAIError(f"logit_bias contains key(s) that cannot be converted to integer token IDs: "
                              f"{[key]!r}", param="logit_bias") from None
        _in_vocab([token], "logit_bias", ctx.vocab_size)
        bias.append((token, min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, value))))
    stream = bool(req.stream)
    params = SamplingParams(
        temperature=_bounded(req.temperature, 1.0, "temperature", 0.0, 2.0),
        top_p=_bounded(req.top_p, 1.0, "top_p", 0.0, 1.0, lo_open=True),
        top_k=max(0, top_k),
        min_p=_bounded(req.min_p, 0.0, "min_p", 0.0, 1.0),
        presence_penalty=_bounded(req.presence_penalty, 0.0, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_bounded(req.frequency_penalty, 0.0, "frequency_penalty", -2.0, 2.0),
        repetition_penalty=1.0 if repetition is None else float(repetition),
        seed=None if req.seed == -1 else req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=_stop(req.stop),
        stop_token_ids=tuple(dict.fromkeys(_in_vocab(list(req.stop_token_ids or []), "stop_token_ids",
                                                     ctx.vocab_size))),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=tuple(bias),
        logprobs=logprobs,
        logprobs_mode=network.mode,
    ).normalised()
    include_usage = bool(stream and req.stream_options and req.stream_options.include_usage)
    return ParsedRequest(chat, prompt, params, network.forced, stream, include_usage,
                         bool(req.return_token_ids))
