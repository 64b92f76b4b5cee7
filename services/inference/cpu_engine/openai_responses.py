"""OpenAI-shaped response objects (whole responses and SSE chunks) built from engine emissions.

Logprob tokens are decimal token ids (``"1234"``, ``bytes`` its UTF-8), as the network's engine writes
them for every request and its validators require; values are clamped at -9999.0 (a masked token). The
alternatives are built as vLLM builds them: the chosen token first, then ``torch.topk`` order without
repeating it; chat keeps the first ``top_logprobs`` of those, the completions format every entry up to
rank ``logprobs`` (so the chosen token plus the top ones). ``return_token_ids`` adds the prompt's ids and
each choice's generated ids, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from .openai_requests import ParsedRequest
from .sampling import LOGPROB_FLOOR, TokenOut
from .sequence import Emission


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _alternatives(tok: TokenOut) -> dict[int, float]:
    """The chosen token, then the top ones (a dict, so a chosen token among them is listed once)."""
    entries = {tok.id: tok.logprob if tok.logprob is not None else 0.0}
    for tid, lp in tok.top:
        entries.setdefault(tid, lp)
    return entries


def _chat_entry(tid: int, logprob: float) -> dict[str, Any]:
    text = str(tid)
    return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode())}


class ResponseBuilder:
    """Shapes one request's output; tracks text offsets across streamed chunks."""

    def __init__(self, req: ParsedRequest, model_name: str) -> None:
        self.req = req
        self.model_name = model_name
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        self._offset = 0  # legacy text_offset: the length of the token strings so far
        self._first_chunk = True

    def _chat_logprobs(self, tokens: list[TokenOut]) -> dict[str, Any]:
        keep = self.req.params.logprobs or 0
        content = []
        for t in tokens:
            entry = _chat_entry(t.id, t.logprob if t.logprob is not None else 0.0)
            shown = list(_alternatives(t).items())[:keep]
            entry["top_logprobs"] = [_chat_entry(tid, lp) for tid, lp in shown]
            content.append(entry)
        return {"content": content}

    def _completion_logprobs(self, tokens: list[TokenOut]) -> dict[str, Any]:
        keep = self.req.params.logprobs or 0
        texts: list[str] = []
        lps: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for t in tokens:
            text = str(t.id)
            texts.append(text)
            lps.append(_lp(t.logprob if t.logprob is not None else 0.0))
            tops.append({str(tid): _lp(lp) for tid, lp in list(_alternatives(t).items())[: keep + 1]})
            offsets.append(self._offset)
            self._offset += len(text)
        return {"text_offset": offsets, "token_logprobs": lps, "tokens": texts, "top_logprobs": tops}

    def _logprobs(self, tokens: list[TokenOut]) -> dict[str, Any] | None:
        if self.req.params.logprobs is None:
            return None
        return self._chat_logprobs(tokens) if self.req.chat else self._completion_logprobs(tokens)

    def _token_ids(self, tokens: list[TokenOut]) -> list[int] | None:
        return [t.id for t in tokens] if self.req.return_token_ids else None

    def usage(self, completion_tokens: int) -> dict[str, Any]:
        prompt = len(self.req.prompt)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        }

    def _envelope(self, choices: list[dict[str, Any]], obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "choices": choices}

    def full(self, emissions: list[Emission]) -> dict[str, Any]:
        """The non-streaming response for everything a request emitted."""
        tokens = [t for e in emissions for t in e.tokens]
        text = "".join(e.text for e in emissions)
        last = emissions[-1] if emissions else Emission("", [])
        choice: dict[str, Any] = {"index": 0}
        if self.req.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(tokens)
        choice["finish_reason"] = last.finish_reason
        choice["stop_reason"] = last.stop_reason
        choice["token_ids"] = self._token_ids(tokens)
        if not self.req.chat:
            choice["prompt_token_ids"] = self.req.prompt if self.req.return_token_ids else None
        body = self._envelope([choice], self.object)
        body["usage"] = self.usage(len(tokens))
        if self.req.chat:
            body["prompt_token_ids"] = self.req.prompt if self.req.return_token_ids else None
        return body

    def role_chunk(self) -> dict[str, Any]:
        """The first chat chunk: the assistant role, no content yet (and the prompt's ids if asked)."""
        delta = {"role": "assistant", "content": ""}
        chunk = self._envelope(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], "chat.completion.chunk"
        )
        if self.req.return_token_ids:
            chunk["prompt_token_ids"] = self.req.prompt
        self._first_chunk = False
        return chunk

    def chunk(self, emission: Emission) -> dict[str, Any]:
        """One SSE chunk for one emission (the last one carries ``finish_reason``)."""
        choice: dict[str, Any] = {"index": 0}
        if self.req.chat:
            choice["delta"] = {"content": emission.text}
        else:
            choice["text"] = emission.text
        choice["logprobs"] = self._logprobs(emission.tokens) if emission.tokens else None
        choice["finish_reason"] = emission.finish_reason
        choice["stop_reason"] = emission.stop_reason
        if self.req.return_token_ids:
            choice["token_ids"] = self._token_ids(emission.tokens)
            if not self.req.chat and self._first_chunk:
                choice["prompt_token_ids"] = self.req.prompt
        self._first_chunk = False
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return self._envelope([choice], obj)

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        body = self._envelope([], obj)
        body["usage"] = self.usage(completion_tokens)
        return body
