"""The network's fields as both engines read them: forced ids in both forms, the mode and its guess."""

from __future__ import annotations

import pytest

from services.inference.validation.request import (
    PROCESSED,
    RAW,
    FieldError,
    guess_mode,
    parse_mode,
    resolve,
)

VOCAB = 512


def _tokenize(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


def _resolve(**fields: object) -> tuple[tuple[int, ...] | None, str]:
    got = resolve(fields, tokenize=_tokenize, vocab_size=VOCAB, default_mode=PROCESSED)
    return got.forced, got.mode


def test_the_networks_object_form() -> None:
    tokens = {"tokens": [{"token": "12", "top_tokens": ["12", "7"]}, {"token": "3", "top_tokens": []}]}
    assert _resolve(enforced_tokens=tokens, logprobs_mode=RAW) == ((12, 3), RAW)


def test_the_list_form_and_text_keep_working() -> None:
    assert _resolve(enforced_tokens=[5, 0, 7]) == ((5, 0, 7), RAW)  # no top tokens to guess from
    assert _resolve(enforced_str="ab") == ((97, 98), PROCESSED)  # the engine's default mode
    assert _resolve(enforced_tokens=[1], enforced_str="ignored")[0] == (1,)  # ids win over text
    assert _resolve() == (None, PROCESSED)
    assert _resolve(enforced_tokens=None, enforced_str=None) == (None, PROCESSED)


def test_non_numeric_token_strings_are_tokenized_first_id_taken() -> None:
    assert _resolve(enforced_tokens={"tokens": [{"token": "hi"}, {"token": " 9 "}]}, logprobs_mode=RAW)[0] \
        == (ord("h"), 9)


def test_the_mode_guess_of_the_networks_engine() -> None:
    """Masked slots of a processed answer are padded with the lowest ids: > 10 % of >= 10 ids below 4."""
    assert guess_mode([0, 1, 50, 60, 70, 80, 90, 100, 110, 120]) == PROCESSED
    assert guess_mode([0, 50, 60, 70, 80, 90, 100, 110, 120, 130]) == RAW  # exactly 10 %: not more
    assert guess_mode([0, 1, 2]) == RAW  # too few ids to tell
    padded = {"tokens": [{"token": "40", "top_tokens": ["40", "201", "1", "3", "4"]}] * 2}
    assert _resolve(enforced_tokens=padded) == ((40, 40), PROCESSED)
    assert _resolve(enforced_tokens=padded, logprobs_mode=RAW)[1] == RAW  # a mode that is sent wins


@pytest.mark.parametrize("fields, param", [
    ({"enforced_tokens": [-1]}, "enforced_tokens[0]"),
    ({"enforced_tokens": [VOCAB]}, "enforced_tokens[0]"),
    ({"enforced_tokens": [True]}, "enforced_tokens[0]"),
    ({"enforced_tokens": [1.0]}, "enforced_tokens[0]"),
    ({"enforced_tokens": "12"}, "enforced_tokens"),
    ({"enforced_tokens": {"tokens": "12"}}, "enforced_tokens.tokens"),
    ({"enforced_tokens": {"token": "12"}}, "enforced_tokens.tokens"),
    ({"enforced_tokens": {"tokens": [12]}}, "enforced_tokens.tokens[0]"),
    ({"enforced_tokens": {"tokens": [{"token": "-4"}]}}, "enforced_tokens.tokens[0].token"),
    ({"enforced_tokens": {"tokens": [{"token": ""}]}}, "enforced_tokens.tokens[0].token"),
    ({"enforced_tokens": {"tokens": [{"token": "1", "top_tokens": "2"}]}},
     "enforced_tokens.tokens[0].top_tokens"),
    ({"enforced_tokens": {"tokens": [{"token": "1", "top_tokens": [None]}]}},
     "enforced_tokens.tokens[0].top_tokens[0]"),
    ({"enforced_str": 5}, "enforced_str"),
    ({"logprobs_mode": "raw_logits"}, "logprobs_mode"),
    ({"logprobs_mode": 1}, "logprobs_mode"),
])
def test_what_can_never_be_served_is_refused_naming_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(FieldError) as caught:
        resolve(fields, tokenize=_tokenize, vocab_size=VOCAB)
    assert caught.value.param == param and param in str(caught.value)


def test_parse_mode() -> None:
    assert parse_mode(None) is None and parse_mode(RAW) == RAW and parse_mode(PROCESSED) == PROCESSED
