"""Chat prompts from the model's own Jinja chat template, rendered the way vLLM renders them.

vLLM renders a chat with transformers' ``apply_chat_template``: the template of the model directory, in a
sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the special tokens as variables,
and each message's text parts joined with newlines. Rendering the same template under the same rules
gives the same prompt text, hence the same ids, on both engines; nothing in a template can reach the
host (the sandbox allows no attribute access to internals and no imports).

:data:`CHAT_TEMPLATE` is the Llama 3 header format our tiny models ship in their ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from node.errors import InvalidRequest

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training): rendered as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def message_text(content: Any, field: str) -> str:
    """The text of one message's ``content``: a string, or ``{"type": "text"}`` parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise InvalidRequest(f"{field}[{i}] must be a text part {{'type': 'text', 'text': str}}")
            texts.append(text)
        return "\n".join(texts)
    raise InvalidRequest(f"{field} must be a string or a list of text parts")


def conversation(messages: Any) -> list[dict[str, Any]]:
    """The messages as the template sees them: each a dict with a string ``role`` and text ``content``."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'")
        out.append({**msg, "content": message_text(msg.get("content"), f"messages[{i}].content")})
    return out


def render_chat(messages: Any, template: str | None, *, add_generation_prompt: bool = True,
                special: dict[str, str | None] | None = None) -> str:
    """The prompt text for ``messages`` (special tokens spelled out, for the tokenizer to parse)."""
    if not template:
        raise InvalidRequest("this model has no chat template: use /v1/completions", param="messages")
    chat = conversation(messages)
    try:
        return _compiled(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                          **(special or {}))
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidRequest(f"the chat template refused the messages: {exc}", param="messages") from exc
