"""The CPU engine's answers to the golden validation requests equal the reference (spec §5)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from services.inference.cpu_engine.checkpoint import LoadedModel, load
from services.inference.cpu_engine.openai_requests import EngineContext, parse
from services.inference.cpu_engine.openai_responses import ResponseBuilder
from services.inference.cpu_engine.scheduler import Scheduler
from services.inference.cpu_engine.sequence import Emission
from services.inference.validation.request import PROCESSED
from tests.support import infval


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load(infval.MODEL_DIR, "float32")


@pytest.fixture(scope="module")
def answer(loaded: LoadedModel) -> Iterator[Any]:
    """``answer(body)`` -> the engine's chat answer, computed by the real scheduler on the golden model."""
    done: dict[int, list[Emission]] = {}
    cond = threading.Condition()

    def deliver(batch: list[tuple[int, Emission]]) -> None:
        with cond:
            for seq_id, emission in batch:
                done.setdefault(seq_id, []).append(emission)
            cond.notify_all()

    scheduler = Scheduler(loaded, deliver)
    scheduler.start()
    ctx = EngineContext(loaded.tokenizer, loaded.max_model_len, loaded.config.vocab_size, PROCESSED)
    ids = iter(range(1, 1 << 30))

    def run(body: dict[str, Any]) -> dict[str, Any]:
        req = parse(body, ctx, chat=True)
        seq_id = next(ids)
        scheduler.submit(seq_id, req.prompt, req.params, req.forced)
        with cond:
            assert cond.wait_for(lambda: done.get(seq_id) and done[seq_id][-1].finish_reason, 60)
        return ResponseBuilder(req, infval.SERVED_NAME).full(done[seq_id])

    yield run
    scheduler.stop()


@pytest.mark.parametrize("name", infval.case_names())
def test_golden_case(answer: Any, name: str) -> None:
    c = infval.case(name)
    body = answer(infval.validation_body(c))
    choice = body["choices"][0]
    assert body["prompt_token_ids"] == c["prompt_ids"]
    assert choice["finish_reason"] == "stop" and choice["token_ids"] == c["enforced_ids"]
    infval.check_against_reference(c, choice["logprobs"]["content"])


def test_forcing_does_not_change_the_distribution(answer: Any) -> None:
    """A free answer and the validator's replay of it report identical numbers at every position."""
    c = infval.case("t08_topp09_processed")
    free = {**c["request"], "logprobs": True, "top_logprobs": 5, "max_tokens": 24}
    original = answer(free)["choices"][0]["logprobs"]["content"]
    forced = {**free, "seed": 1234, "enforced_tokens": {"tokens": [
        {"token": e["token"], "top_tokens": [t["token"] for t in e["top_logprobs"]]} for e in original]}}
    assert answer(forced)["choices"][0]["logprobs"]["content"][: len(original)] == original
