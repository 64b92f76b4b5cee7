"""Enforced-decoding arguments: what the plugin accepts, and the 400 reasons for what it does not."""

from __future__ import annotations

import pytest

from services.inference.vllm_plugin.enforced_args import MAX_ENFORCED_TOKENS, Enforced, parse_enforced


def test_no_arguments_means_ordinary_decoding() -> None:
    assert parse_enforced(None) is None
    assert parse_enforced({}) is None
    assert parse_enforced({"other": 1, "enforced_str": None}) is None


def test_tokens_win_over_text_like_the_cpu_engine() -> None:
    assert parse_enforced({"enforced_tokens": [5, 0, 7], "enforced_str": "x"}) == Enforced(tokens=(5, 0, 7))
    assert parse_enforced({"enforced_str": "héllo"}) == Enforced(text="héllo")
    assert parse_enforced({"enforced_str": ""}) == Enforced(text="")


@pytest.mark.parametrize(("args", "reason"), [
    ({"enforced_tokens": "1,2"}, "list of token ids"),
    ({"enforced_tokens": [1, -2]}, "non-negative integers"),
    ({"enforced_tokens": [1, 2.0]}, "non-negative integers"),
    ({"enforced_tokens": [True]}, "non-negative integers"),
    ({"enforced_tokens": ["3"]}, "non-negative integers"),
    ({"enforced_tokens": [0] * (MAX_ENFORCED_TOKENS + 1)}, "at most"),
    ({"enforced_str": 42}, "must be a string"),
    ({"enforced_str": ["a"]}, "must be a string"),
])
def test_bad_values_name_the_field(args: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_enforced(args)
