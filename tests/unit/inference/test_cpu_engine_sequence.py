"""Sequence bookkeeping (stop strings, held-back text) and the UTF-8 sampling masks."""

from __future__ import annotations

import torch

from services.inference.cpu_engine.sampling import SamplingParams, TokenMasks, TokenOut, utf8_pending
from services.inference.cpu_engine.sequence import Sequence
from services.inference.cpu_engine.tokenizer import BOS, EOS, EOT, ByteTokenizer

TOK = ByteTokenizer(list(range(256)), {BOS: 256, EOS: 257, EOT: 258})


def _seq(max_tokens: int, stop: tuple[str, ...] = ()) -> Sequence:
    return Sequence(1, [256], SamplingParams(max_tokens=max_tokens, stop=stop), TOK)


def _feed(seq: Sequence, data: bytes) -> list[tuple[str, int, str | None]]:
    out = []
    for b in data:
        em = seq.accept(TokenOut(b))
        if em is not None:
            out.append((em.text, len(em.tokens), em.finish_reason))
    return out


def test_stop_string_is_held_back_then_cut() -> None:
    seq = _seq(max_tokens=50, stop=("END",))
    assert _feed(seq, b"abEN") == [("a", 1, None), ("b", 1, None)]
    assert _feed(seq, b"D") == [("", 0, "stop")]
    assert bytes(seq.text) == b"ab" and [t.id for t in seq.out] == [ord("a"), ord("b")]


def test_false_stop_prefix_is_released() -> None:
    seq = _seq(max_tokens=50, stop=("END",))
    assert _feed(seq, b"ENx") == [("ENx", 3, None)]


def test_multibyte_characters_are_released_whole() -> None:
    seq = _seq(max_tokens=50)
    assert _feed(seq, "中🙂".encode()) == [("中", 3, None), ("🙂", 4, None)]


def test_eos_and_length_finish() -> None:
    seq = _seq(max_tokens=50, stop=("xyz",))
    _feed(seq, b"ax")
    em = seq.accept(TokenOut(258))
    assert em is not None and (em.text, em.finish_reason) == ("x", "stop")
    assert len(seq.out) == 2  # the end-of-sequence token is not part of the output
    seq = _seq(max_tokens=3)
    assert _feed(seq, b"abc") == [("a", 1, None), ("b", 1, None), ("c", 1, "length")]


def test_forced_tokens_ignore_stop_and_eos() -> None:
    seq = Sequence(1, [256], SamplingParams(stop=("b",)), TOK, forced=[ord("a"), ord("b"), 258, ord("c")])
    assert _feed(seq, bytes([ord("a"), ord("b")])) == [("a", 1, None), ("b", 1, None)]
    em = seq.accept(TokenOut(258))
    assert em is not None and em.text == "" and em.finish_reason is None
    assert _feed(seq, b"c") == [("c", 1, "stop")]


def test_utf8_pending_tracks_unfinished_characters() -> None:
    pending = b""
    for b in "é".encode():
        pending = utf8_pending(pending, b)
    assert pending == b""
    assert utf8_pending(b"", 0xF0) == b"\xf0"
    assert utf8_pending(b"\xf0\x9f", 0x99) == b"\xf0\x9f\x99"
    assert utf8_pending(b"\xe4", ord("a")) == b""  # a broken character is dropped, not carried


def test_masks_only_allow_bytes_that_keep_text_valid() -> None:
    masks = TokenMasks(TOK, 272)

    def allowed(mask: torch.Tensor) -> set[int]:
        return {int(i) for i in torch.nonzero(mask == 0).flatten()}

    start = allowed(masks.for_state(b"", 10))
    assert set(range(128)) <= start and {0xC2, 0xF4, 257, 258} <= start
    assert not {0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFF, 256, 259} & start
    assert allowed(masks.for_state(b"", 1)) == set(range(128)) | {257, 258}
    assert max(allowed(masks.for_state(b"", 2)) - {257, 258}) == 0xDF
    assert allowed(masks.for_state(b"\xe0", 5)) == set(range(0xA0, 0xC0))
    assert allowed(masks.for_state(b"\xed", 5)) == set(range(0x80, 0xA0))
    assert allowed(masks.for_state(b"\xf0\x90", 5)) == set(range(0x80, 0xC0))
