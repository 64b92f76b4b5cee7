"""When an answer ends and what text it shows: vLLM's stop rules and detokenizer, on the CPU engine."""

from __future__ import annotations

import json

import pytest

from services.inference.cpu_engine.chat_template import CHAT_TEMPLATE
from services.inference.cpu_engine.sampling import Sampler, SamplingParams, TokenOut
from services.inference.cpu_engine.sequence import Sequence, find_stop
from services.inference.cpu_engine.tokenizer import BOS, EOT, Tokenizer, tokenizer_json

VOCAB = 272
BOS_ID, EOS_ID, EOT_ID = 256, 257, 258


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(VOCAB)), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOT, "chat_template": CHAT_TEMPLATE}), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID, EOT_ID]}),
                                                 encoding="utf-8")
    return Tokenizer.from_dir(path)


def _seq(tok: Tokenizer, forced: tuple[int, ...] | None = None, **params: object) -> Sequence:
    p = SamplingParams(**{"max_tokens": 50, **params})  # type: ignore[arg-type]
    return Sequence(1, [BOS_ID], p, tok, Sampler(p, VOCAB, [BOS_ID]), forced=forced)


def _feed(seq: Sequence, ids: bytes | list[int]) -> list[tuple[str, int, str | None]]:
    out = []
    for t in ids:
        em = seq.accept(TokenOut(t))
        out.append((em.text, len(em.tokens), em.finish_reason))
    return out


def test_the_tokenizer_knows_the_ends_of_an_answer(tok: Tokenizer) -> None:
    assert tok.eos_token_id == EOT_ID and tok.extra_stop_ids == (EOS_ID,) and tok.end_id == EOT_ID


def test_stop_string_is_held_back_then_cut_and_its_tokens_stay(tok: Tokenizer) -> None:
    seq = _seq(tok, stop=("END",))
    assert _feed(seq, b"abEN") == [("", 1, None), ("", 1, None), ("a", 1, None), ("b", 1, None)]
    assert _feed(seq, b"D") == [("", 1, "stop")]
    assert seq.text == "ab" and seq.stop_reason == "END"
    assert [t.id for t in seq.out] == list(b"abEND")  # vLLM keeps the tokens, cuts the text


def test_include_stop_str_in_output_keeps_the_stop_text(tok: Tokenizer) -> None:
    seq = _seq(tok, stop=("END",), include_stop_str_in_output=True)
    assert "".join(t for t, _n, _f in _feed(seq, b"xEND")) == "xEND" and seq.finish_reason == "stop"


def test_false_stop_prefix_is_released(tok: Tokenizer) -> None:
    seq = _seq(tok, stop=("END",))
    texts = [t for t, _n, _f in _feed(seq, b"ENx")]
    assert texts == ["", "", "E"] and seq.text == "ENx"  # vLLM holds back len("END") - 1 characters
    assert seq.finish("length").text == "Nx"


def test_multibyte_characters_show_when_complete(tok: Tokenizer) -> None:
    seq = _seq(tok)
    assert [t for t, _n, _f in _feed(seq, "中🙂".encode())] == ["", "", "中", "", "", "", "🙂"]


def test_eos_ends_the_answer_and_is_an_output_token_without_text(tok: Tokenizer) -> None:
    seq = _seq(tok)
    assert _feed(seq, [ord("a"), EOT_ID]) == [("a", 1, None), ("", 1, "stop")]
    assert [t.id for t in seq.out] == [ord("a"), EOT_ID] and seq.stop_reason is None


def test_stop_ids_end_the_answer_and_say_which(tok: Tokenizer) -> None:
    seq = _seq(tok)
    assert _feed(seq, [ord("a"), EOS_ID])[-1] == ("", 1, "stop")  # the generation config's other end
    assert seq.stop_reason == EOS_ID
    seq = _seq(tok, stop_token_ids=(ord("z"),))
    assert _feed(seq, b"yz") == [("y", 1, None), ("", 1, "stop")] and seq.stop_reason == ord("z")
    seq = _seq(tok, ignore_eos=True)
    assert _feed(seq, [EOT_ID, EOS_ID, ord("q")])[-1][2] is None


def test_length_ends_the_answer(tok: Tokenizer) -> None:
    assert _feed(_seq(tok, max_tokens=3), b"abc") == [("a", 1, None), ("b", 1, None), ("c", 1, "length")]


def test_special_tokens_show_in_text_unless_skipped(tok: Tokenizer) -> None:
    seq = _seq(tok, skip_special_tokens=False)
    assert "".join(t for t, _n, _f in _feed(seq, [BOS_ID, ord("x")])) == f"{BOS}x"
    seq = _seq(tok)
    assert "".join(t for t, _n, _f in _feed(seq, [BOS_ID, ord("x")])) == "x"


def test_forced_ids_then_the_end_of_sequence_token(tok: Tokenizer) -> None:
    seq = _seq(tok, forced=(ord("a"), ord("b")))
    picks = []
    while seq.finish_reason is None:
        picks.append(seq.forced_token())
        seq.accept(TokenOut(picks[-1] or 0))
    assert picks == [ord("a"), ord("b"), EOT_ID] and seq.finish_reason == "stop" and seq.text == "ab"


def test_forced_ids_beyond_max_tokens_end_with_length(tok: Tokenizer) -> None:
    seq = _seq(tok, forced=tuple(b"abcdef"), max_tokens=4)
    for _ in range(4):
        seq.accept(TokenOut(seq.forced_token() or 0))
    assert seq.finish_reason == "length" and seq.text == "abcd"


def test_stop_strings_wait_for_min_tokens(tok: Tokenizer) -> None:
    seq = _seq(tok, stop=("a",), min_tokens=2)
    assert _feed(seq, b"aa")[-1][2] is None  # the 2nd token is not yet past min_tokens
    assert _feed(seq, b"a")[-1][2] == "stop"


def test_find_stop_takes_the_earliest_completion() -> None:
    assert find_stop("xxabcd", 2, ("cd", "bc"), keep=False) == ("bc", 3)
    assert find_stop("xxabcd", 2, ("cd",), keep=True) == ("cd", 6)
    assert find_stop("abcd", 1, ("ab",), keep=False) is None  # completed earlier: not new
