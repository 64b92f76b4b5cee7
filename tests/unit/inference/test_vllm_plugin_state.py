"""The plugin's pure parts: the resolved request entry workers read, and the guard on vLLM's version."""

from __future__ import annotations

import sys
import types

import pytest

from services.inference.validation.request import PROCESSED, RAW, FieldError
from services.inference.vllm_plugin import patches
from services.inference.vllm_plugin.request_state import (
    KEY,
    RowRequest,
    default_mode,
    network_fields,
    resolved_extra_args,
    row_request,
)


def _tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_top_level_fields_win_over_vllm_xargs() -> None:
    assert network_fields({"enforced_str": "a", "other": 1}, {"enforced_tokens": [1], "stream": True}) == {
        "enforced_str": "a", "enforced_tokens": [1]}
    assert network_fields({"logprobs_mode": RAW}, {"logprobs_mode": PROCESSED}) == {
        "logprobs_mode": PROCESSED}
    assert network_fields(None, None) == {}


def test_the_api_server_resolves_once_and_workers_read_the_entry() -> None:
    extra = {"kv_transfer_params": {"x": 1}, "enforced_tokens": {"tokens": [{"token": "7"}, {"token": "hi"}]},
             "logprobs_mode": RAW}
    resolved = resolved_extra_args(extra, tokenize=_tokenize, vocab_size=512, mode=PROCESSED)
    assert resolved == {"kv_transfer_params": {"x": 1}, KEY: {"forced": [7, ord("h")], "mode": RAW}}
    assert row_request(resolved, PROCESSED) == RowRequest((7, ord("h")), RAW)
    plain = resolved_extra_args(None, tokenize=_tokenize, vocab_size=512, mode=RAW)
    assert plain == {KEY: {"forced": None, "mode": RAW}}  # the engine's default travels too
    assert row_request(None, RAW) == RowRequest(None, RAW) and row_request(plain, PROCESSED).mode == RAW
    assert RowRequest(None, PROCESSED).ordinary and not RowRequest((1,), PROCESSED).ordinary


def test_refusals_name_the_field() -> None:
    with pytest.raises(FieldError, match=r"enforced_tokens\.tokens\[0\]\.token"):
        resolved_extra_args({"enforced_tokens": {"tokens": [{"token": "900"}]}}, tokenize=_tokenize,
                            vocab_size=512, mode=PROCESSED)
    with pytest.raises(ValueError, match="mode"):
        row_request({KEY: {"forced": None, "mode": "raw_logits"}}, PROCESSED)
    with pytest.raises(ValueError, match="forced"):
        row_request({KEY: {"forced": ["1"], "mode": RAW}}, PROCESSED)


def test_the_default_mode_setting() -> None:
    assert default_mode({}) == PROCESSED and default_mode({"MLNODE_LOGPROBS_MODE": RAW}) == RAW
    with pytest.raises(RuntimeError, match="MLNODE_LOGPROBS_MODE"):
        default_mode({"MLNODE_LOGPROBS_MODE": "processed_logits"})


def test_an_unknown_vllm_version_refuses_to_start_naming_it() -> None:
    patches.check_version("0.32.0")
    patches.check_version("0.32.0+cpu")
    for version in ("0.32.1", "0.31.2", "0.33.0rc1", "1.0.0"):
        with pytest.raises(patches.IncompatibleVLLM, match=rf"runs vLLM {version.replace('.', '[.]')}"):
            patches.check_version(version)


def test_a_target_with_another_signature_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("mlnode_fake_target")

    class Target:
        def method(self, a: int, b: int) -> int:
            return a + b

    module.Target = Target  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlnode_fake_target", module)
    doubled = patches.Patch("mlnode_fake_target:Target", "method", ("self", "a", "b"),
                            lambda original: lambda self, a, b: 2 * original(self, a, b))
    doubled.install()
    doubled.install()  # a process that loads plugins twice patches once
    assert Target().method(1, 2) == 6
    changed = patches.Patch("mlnode_fake_target:Target", "method", ("self", "a"), lambda original: original)
    monkeypatch.setattr(Target, "method", lambda self, a, b, c=0: a)
    with pytest.raises(patches.IncompatibleVLLM, match="takes"):
        changed.install()
    missing = patches.Patch("mlnode_fake_target:Target", "gone", ("self",), lambda original: original)
    with pytest.raises(patches.IncompatibleVLLM, match=r"no mlnode_fake_target:Target\.gone"):
        missing.install()
