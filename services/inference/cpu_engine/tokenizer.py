"""The model's tokenizer, through Hugging Face ``tokenizers`` -- the library vLLM itself uses -- so a prompt
becomes the same ids on both engines and generated ids become the same text.

The engine reads what vLLM reads from a model directory: ``tokenizer.json``, the special tokens and the
chat template of ``tokenizer_config.json`` (or ``chat_template.jinja``), the end-of-sequence ids of the
generation config. Text is produced incrementally with ``tokenizers``' own ``DecodeStream`` seeded with
the prompt, as vLLM's fast detokenizer does, so streamed text and whole answers agree with vLLM's.

This module also writes the ``tokenizer.json`` of our tiny models: a byte-level BPE whose vocabulary is
the 256 GPT-2 byte symbols (no merges) plus special tokens, which both engines load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers.decoders import DecodeStream

from node.errors import ConfigError

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
NAMED_SPECIALS = (BOS, EOS, EOT, START_HEADER, END_HEADER)
CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"


def byte_symbols() -> list[str]:
    """The GPT-2 byte-to-unicode table: printable Latin-1 bytes stand for themselves, the rest are
    shifted past 255 so that every byte has a visible, whitespace-free symbol."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return [table[b] for b in range(256)]


def special_token_names(vocab_size: int) -> list[str]:
    """The named specials, then reserved ones up to ``vocab_size`` (ids 256..vocab_size-1)."""
    count = vocab_size - 256
    if count < len(NAMED_SPECIALS):
        raise ConfigError(f"vocab_size must be at least {256 + len(NAMED_SPECIALS)}, got {vocab_size}")
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(count - len(NAMED_SPECIALS))]
    return [*NAMED_SPECIALS, *reserved]


def tokenizer_json(vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.json`` document for a byte-level vocabulary of ``vocab_size`` ids."""
    symbols = byte_symbols()
    specials = special_token_names(vocab_size)
    added = [
        {
            "id": 256 + i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in enumerate(specials)
    ]
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                bos,
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [256], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {sym: b for b, sym in enumerate(symbols)},
            "merges": [],
        },
    }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path.name}: cannot read {path}: {exc}") from exc
    return doc if isinstance(doc, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` when present (it wins, as in transformers), else the config's default."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> ids for one model directory, with the special tokens the engine stops on."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | None = None,
                 generation_eos: Sequence[int] = ()) -> None:
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        primary = backend.token_to_id(eos_token) if eos_token else None
        extra = [t for t in generation_eos if t != primary]
        #: vLLM's ``eos_token_id``: the tokenizer's end-of-sequence token (it always stops an answer).
        self.eos_token_id: int | None = primary
        #: The generation config's other end-of-sequence ids: vLLM adds them to every request's stop ids.
        self.extra_stop_ids: tuple[int, ...] = tuple(dict.fromkeys(extra))

    @property
    def end_id(self) -> int | None:
        """The token a forced answer ends with: the end-of-sequence token, else the first stop id."""
        return self.eos_token_id if self.eos_token_id is not None else next(iter(self.extra_stop_ids), None)

    @classmethod
    def from_dir(cls, path: Path, config_eos: Sequence[int] = ()) -> Tokenizer:
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the library raises its own exception type for a bad file
            raise ConfigError(f"tokenizer.json: cannot load {path / 'tokenizer.json'}: {exc}") from exc
        config = _read_json(path / "tokenizer_config.json")
        generation = path / "generation_config.json"
        eos = _ids(_read_json(generation).get("eos_token_id")) if generation.is_file() else list(config_eos)
        return cls(backend, eos_token=_token_content(config.get("eos_token")),
                   bos_token=_token_content(config.get("bos_token")),
                   chat_template=_chat_template(path, config), generation_eos=eos)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; special-token strings in it become their ids, as in vLLM."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def stream(self, prompt: Sequence[int], *, skip_special_tokens: bool) -> TextStream:
        return TextStream(self, prompt, skip_special_tokens)


class TextStream:
    """Incremental text of generated ids: ``step(id)`` returns the characters that id completes."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._stream = DecodeStream(ids=list(prompt), skip_special_tokens=skip_special_tokens)

    def step(self, token: int) -> str:
        try:
            return self._stream.step(self._backend, token) or ""
        except Exception:  # a non-monotonic prefix (rare byte-level case): restart, as vLLM does
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            return self._stream.step(self._backend, token) or ""
