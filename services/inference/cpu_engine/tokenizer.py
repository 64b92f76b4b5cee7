"""A byte-level tokenizer that reads (and writes) the Hugging Face ``tokenizer.json`` format.

The ``tokenizers`` package is not a dependency, and our models need nothing more than one token per
byte: a BPE model whose vocabulary is the 256 GPT-2 byte symbols, no merges, plus added special tokens.
With no merges every UTF-8 byte is its own token, so encode/decode round-trip any text exactly and a
text has exactly one tokenisation -- which is what makes ``enforced_str`` replay the original tokens.

A byte-level BPE vocabulary with merges (Hugging Face Qwen3 checkpoints) is accepted too: the engine
still encodes byte by byte (a valid tokenisation, every byte symbol is in the vocabulary) and never
samples a merged token, so the one-tokenisation property holds; merged ids still decode to their bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


class ByteTokenizer:
    """Text <-> token ids, one id per UTF-8 byte plus special tokens that are never split."""

    def __init__(
        self, byte_ids: Sequence[int], specials: dict[str, int], merged: dict[int, bytes] | None = None
    ) -> None:
        if len(byte_ids) != 256:
            raise ConfigError(f"tokenizer must map all 256 bytes, got {len(byte_ids)}")
        self.byte_ids = list(byte_ids)
        self.specials = dict(specials)
        merged = merged or {}
        self.vocab_size = max([*self.byte_ids, *self.specials.values(), *merged]) + 1
        self._bytes_of: list[bytes | None] = [None] * self.vocab_size
        self._merged: list[bytes | None] = [None] * self.vocab_size
        for tid, raw in merged.items():
            self._merged[tid] = raw
        for b, tid in enumerate(self.byte_ids):
            self._bytes_of[tid] = bytes([b])
        self._special_of: dict[int, str] = {tid: name for name, tid in self.specials.items()}
        names = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(n) for n in names)) if names else None
        self.bos_id = self.specials.get(BOS)
        self.eos_ids = frozenset(self.specials[n] for n in (EOS, EOT) if n in self.specials)

    @property
    def chatml(self) -> bool:
        """Whether chats use the ChatML (``<|im_start|>``, Qwen) format rather than Llama 3 headers."""
        return CHATML_START in self.specials

    def add_eos(self, ids: Iterable[int]) -> None:
        """Also stop on ``ids`` (the model config's ``eos_token_id``), when they are special tokens."""
        self.eos_ids = self.eos_ids | frozenset(i for i in ids if i in self._special_of)

    @classmethod
    def from_file(cls, path: Path) -> ByteTokenizer:
        """Load a byte-level BPE ``tokenizer.json`` (merged tokens are kept for decoding only)."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer.json: cannot read {path}: {exc}") from exc
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ConfigError("tokenizer.json: model.type must be 'BPE'")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise ConfigError("tokenizer.json: model.vocab must be an object")
        specials: dict[str, int] = {}
        for entry in doc.get("added_tokens") or []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), int):
                specials[str(entry["content"])] = entry["id"]
        byte_of_symbol = {sym: b for b, sym in enumerate(byte_symbols())}
        byte_ids = [-1] * 256
        merged: dict[int, bytes] = {}
        for sym, tid in vocab.items():
            if sym in specials:
                continue
            if not isinstance(tid, int) or not sym or any(c not in byte_of_symbol for c in sym):
                raise ConfigError(f"tokenizer.json: model.vocab entry {sym!r} is not made of byte symbols")
            if len(sym) == 1:
                byte_ids[byte_of_symbol[sym]] = tid
            else:
                merged[tid] = bytes(byte_of_symbol[c] for c in sym)
        if -1 in byte_ids:
            raise ConfigError("tokenizer.json: model.vocab must cover all 256 byte symbols")
        return cls(byte_ids, specials, merged)

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``parse_special`` special-token strings become their ids."""
        ids: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        if not parse_special or self._special_re is None:
            ids.extend(self._encode_plain(text))
            return ids
        pos = 0
        for match in self._special_re.finditer(text):
            ids.extend(self._encode_plain(text[pos : match.start()]))
            ids.append(self.specials[match.group()])
            pos = match.end()
        ids.extend(self._encode_plain(text[pos:]))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        table = self.byte_ids
        return [table[b] for b in text.encode("utf-8")]

    def token_bytes(self, tid: int) -> bytes:
        """The text bytes of one token: special tokens contribute none (they are skipped in text)."""
        if not 0 <= tid < self.vocab_size:
            return b""
        raw = self._bytes_of[tid] or self._merged[tid]
        return raw if raw is not None else b""

    def byte_of(self, tid: int) -> int | None:
        """The byte a token stands for, or None for special / unused ids."""
        raw = self._bytes_of[tid] if 0 <= tid < self.vocab_size else None
        return raw[0] if raw is not None else None

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        parts: list[bytes] = []
        for tid in ids:
            if not skip_special and tid in self._special_of:
                parts.append(self._special_of[tid].encode("utf-8"))
            else:
                parts.append(self.token_bytes(tid))
        return b"".join(parts).decode("utf-8", errors="replace")

    def token_text(self, tid: int) -> str:
        """How a token is shown in logprobs: its text, its special name, or ``bytes:\\xNN`` when the
        byte alone is not valid UTF-8 (a unique spelling, so top-logprob maps never collide)."""
        if tid in self._special_of:
            return self._special_of[tid]
        raw = self.token_bytes(tid)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
