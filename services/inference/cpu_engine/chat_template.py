"""The chat formats the engine knows, both as the Jinja template vLLM reads and as plain Python.

The engine renders chats in Python (no template engine at request time); the Jinja string written to
``tokenizer_config.json`` says the same thing so vLLM serving the same directory builds the same prompt.
Two formats exist: Llama 3 headers (our tiny models) and ChatML (Qwen checkpoints, chosen when the
tokenizer has ``<|im_start|>``).
"""

from __future__ import annotations

from typing import Any

from node.errors import InvalidRequest

from .tokenizer import BOS, CHATML_END, CHATML_START, END_HEADER, EOT, START_HEADER

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def message_text(content: Any, field: str) -> str:
    """The text of one message's ``content``: a string, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequest(f"{field}[{i}] must be a text part {{'type': 'text', 'text': str}}")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"{field} must be a string or a list of text parts")


def render_chat(messages: Any, *, add_generation_prompt: bool = True, chatml: bool = False) -> str:
    """The prompt text for ``messages`` (special tokens spelled out, to be parsed by the tokenizer)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    out = [] if chatml else [BOS]
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object")
        role = msg.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}")
        text = message_text(msg.get("content"), f"messages[{i}].content")
        if chatml:
            out.append(f"{CHATML_START}{role}\n{text}{CHATML_END}\n")
        else:
            out.append(f"{START_HEADER}{role}{END_HEADER}\n\n{text}{EOT}")
    if add_generation_prompt:
        out.append(f"{CHATML_START}assistant\n" if chatml else f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(out)
