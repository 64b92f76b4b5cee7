"""The byte-level tokenizer: exact round trips, special tokens, and the tokenizer.json it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import ConfigError
from services.inference.cpu_engine.tokenizer import (
    BOS,
    EOT,
    ByteTokenizer,
    byte_symbols,
    tokenizer_json,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> ByteTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(272)), encoding="utf-8")
    return ByteTokenizer.from_file(path)


def test_byte_symbols_are_the_gpt2_table() -> None:
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert symbols[ord("A")] == "A"
    assert symbols[ord(" ")] == "\u0120"  # the familiar "Ġ"
    assert symbols[ord("\n")] == "\u010a"  # "Ċ"
    assert all(not s.isspace() for s in symbols)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "emoji 🙂🚀 mixed",
        "中文字符 and 日本語のテキスト",
        "",
        "tabs\tand\nnewlines\r\n",
        "\x00\x7f",
    ],
)
def test_round_trip(tok: ByteTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: no merges
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(text: str) -> None:
    tok = ByteTokenizer(list(range(256)), {BOS: 256})
    assert tok.decode(tok.encode(text, parse_special=False)) == text


def test_special_tokens_are_parsed_and_skipped_in_text(tok: ByteTokenizer) -> None:
    ids = tok.encode(f"{BOS}hi{EOT}", add_bos=False)
    assert ids == [256, ord("h"), ord("i"), 258]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == f"{BOS}hi{EOT}"
    assert tok.encode(EOT, parse_special=False) == list(EOT.encode())
    assert tok.encode("x", add_bos=True) == [256, ord("x")]
    assert tok.eos_ids == frozenset({257, 258})


def test_token_text_spells_partial_utf8_uniquely(tok: ByteTokenizer) -> None:
    assert tok.token_text(ord("a")) == "a"
    assert tok.token_text(0xF0) == "bytes:\\xf0"
    assert tok.token_text(258) == EOT
    assert tok.token_bytes(258) == b""


def test_merged_vocabularies_stay_byte_level(tmp_path: Path) -> None:
    doc = tokenizer_json(272)
    doc["model"]["merges"] = ["Ġ t"]
    doc["model"]["vocab"]["Ġt"] = 300
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    tok = ByteTokenizer.from_file(path)
    assert tok.encode(" t") == [tok.byte_ids[ord(" ")], tok.byte_ids[ord("t")]]
    assert tok.decode([300, tok.byte_ids[ord("o")]]) == " to"
    assert tok.byte_of(300) is None and tok.vocab_size == 301


def test_refuses_tokenizers_it_cannot_reproduce(tmp_path: Path) -> None:
    doc = tokenizer_json(272)
    doc["model"]["vocab"]["<not bytes>"] = 280
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ConfigError, match="byte symbols"):
        ByteTokenizer.from_file(path)
    doc = tokenizer_json(272)
    del doc["model"]["vocab"]["A"]
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ConfigError, match="256 byte symbols"):
        ByteTokenizer.from_file(path)
