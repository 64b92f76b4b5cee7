"""OpenAI-shaped response objects (whole responses and SSE chunks) built from engine emissions.

Chat logprobs follow the chat API (``choices[].logprobs.content[]`` with ``token``, ``logprob``,
``bytes``, ``top_logprobs``); completions follow the legacy API (``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset``), whose ``top_logprobs`` maps also carry the sampled token.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from .openai_requests import ParsedRequest
from .sampling import TokenOut
from .sequence import Emission
from .tokenizer import ByteTokenizer


class ResponseBuilder:
    """Shapes one request's output; tracks text offsets across streamed chunks."""

    def __init__(self, req: ParsedRequest, model_name: str, tok: ByteTokenizer) -> None:
        self.req = req
        self.model_name = model_name
        self.tok = tok
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        self._chars_started = 0  # characters begun so far (for legacy text_offset)

    def _entry(self, tid: int, logprob: float) -> dict[str, Any]:
        text = self.tok.token_text(tid)
        raw = self.tok.token_bytes(tid) or text.encode("utf-8")
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _chat_logprobs(self, tokens: list[TokenOut]) -> dict[str, Any]:
        content = []
        for t in tokens:
            entry = self._entry(t.id, t.logprob if t.logprob is not None else 0.0)
            entry["top_logprobs"] = [self._entry(tid, lp) for tid, lp in t.top]
            content.append(entry)
        return {"content": content}

    def _completion_logprobs(self, tokens: list[TokenOut]) -> dict[str, Any]:
        texts: list[str] = []
        lps: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for t in tokens:
            raw = self.tok.token_bytes(t.id)
            continuation = bool(raw) and raw[0] & 0xC0 == 0x80
            offsets.append(self._chars_started - 1 if continuation else self._chars_started)
            self._chars_started += sum(1 for b in raw if b & 0xC0 != 0x80)
            texts.append(self.tok.token_text(t.id))
            logprob = t.logprob if t.logprob is not None else 0.0
            lps.append(logprob)
            top = {self.tok.token_text(tid): lp for tid, lp in t.top}
            top[self.tok.token_text(t.id)] = logprob
            tops.append(top)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _logprobs(self, tokens: list[TokenOut]) -> dict[str, Any] | None:
        if not self.req.params.logprobs:
            return None
        return self._chat_logprobs(tokens) if self.req.chat else self._completion_logprobs(tokens)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = len(self.req.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def _envelope(self, choices: list[dict[str, Any]], obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }

    def full(self, emissions: list[Emission]) -> dict[str, Any]:
        """The non-streaming response for everything a request emitted."""
        tokens = [t for e in emissions for t in e.tokens]
        text = "".join(e.text for e in emissions)
        finish = emissions[-1].finish_reason if emissions else None
        choice: dict[str, Any] = {"index": 0}
        if self.req.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(tokens)
        choice["finish_reason"] = finish
        choice["stop_reason"] = None
        body = self._envelope([choice], self.object)
        body["usage"] = self.usage(len(tokens))
        return body

    def role_chunk(self) -> dict[str, Any]:
        """The first chat chunk: the assistant role, no content yet."""
        delta = {"role": "assistant", "content": ""}
        return self._envelope(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], "chat.completion.chunk"
        )

    def chunk(self, emission: Emission) -> dict[str, Any]:
        """One SSE chunk for one emission (the last one carries ``finish_reason``)."""
        choice: dict[str, Any] = {"index": 0}
        if self.req.chat:
            choice["delta"] = {"content": emission.text} if emission.text or emission.tokens else {}
        else:
            choice["text"] = emission.text
        choice["logprobs"] = self._logprobs(emission.tokens) if emission.tokens else None
        choice["finish_reason"] = emission.finish_reason
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return self._envelope([choice], obj)

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        body = self._envelope([], obj)
        body["usage"] = self.usage(completion_tokens)
        return body
