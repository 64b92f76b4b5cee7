"""The engine's tokenizer (Hugging Face ``tokenizers``): the ids vLLM makes, exact text, special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import ConfigError
from services.inference.cpu_engine.chat_template import CHAT_TEMPLATE
from services.inference.cpu_engine.tokenizer import (
    BOS,
    EOS,
    EOT,
    Tokenizer,
    byte_symbols,
    tokenizer_json,
)

GOLDEN = Path(__file__).resolve().parents[4] / "shared" / "golden"


def _write(path: Path, doc: dict[str, object], config: dict[str, object] | None = None) -> Path:
    (path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config or {"bos_token": BOS, "eos_token": EOT}),
                                                encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(_write(tmp_path_factory.mktemp("tok"), tokenizer_json(272)), (257, 258))


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
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: no merges
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text.replace(BOS, "").replace(EOS, "").replace(EOT, "")


def test_special_tokens_are_parsed_and_skipped_in_text(tok: Tokenizer) -> None:
    ids = tok.encode(f"{BOS}hi{EOT}")
    assert ids == [256, ord("h"), ord("i"), 258]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == f"{BOS}hi{EOT}"
    assert tok.encode("x", add_special_tokens=True) == [256, ord("x")]  # the post-processor's BOS
    assert tok.eos_token_id == 258 and tok.extra_stop_ids == (257,)
    assert {256, 257, 258} <= tok.special_ids


def test_the_stream_shows_a_character_once_it_is_complete(tok: Tokenizer) -> None:
    stream = tok.stream([256], skip_special_tokens=True)
    assert [stream.step(b) for b in "é!".encode()] == ["", "é", "!"]
    stream = tok.stream([256], skip_special_tokens=False)
    assert stream.step(258) == EOT


def test_merged_vocabularies_encode_as_hugging_face_does() -> None:
    """The golden Qwen3 tokenizer has merges: the chat prompt ids are the reference's own."""
    golden = json.loads((GOLDEN / "inference_validation.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_dir(GOLDEN / "infval-tiny-qwen3")
    case = golden["cases"][0]
    messages = case["request"]["messages"]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert tok.encode(text + "<|im_start|>assistant\n") == case["prompt_ids"]
    assert tok.eos_token_id == golden["eos_id"] and tok.chat_template is not None


def test_the_chat_template_file_wins_over_the_config(tmp_path: Path) -> None:
    _write(tmp_path, tokenizer_json(272), {"eos_token": EOT, "chat_template": CHAT_TEMPLATE})
    assert Tokenizer.from_dir(tmp_path).chat_template == CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "{{ messages[0]['content'] }}"


def test_an_unreadable_tokenizer_stops_the_load(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
