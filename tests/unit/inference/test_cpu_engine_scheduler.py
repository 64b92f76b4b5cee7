"""Continuous batching with the real tiny model: results independent of the batch, exact replays."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import pytest

from services.inference.cpu_engine.checkpoint import LoadedModel, create_tiny, load
from services.inference.cpu_engine.sampling import SamplingParams, TokenOut
from services.inference.cpu_engine.scheduler import Scheduler
from services.inference.cpu_engine.sequence import Emission


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path: Path = tmp_path_factory.mktemp("tiny")
    create_tiny(path, seed=0)
    return load(path)


class Collector:
    """Gathers emissions per sequence; ``wait`` returns once the given ones have finished."""

    def __init__(self) -> None:
        self.emissions: dict[int, list[Emission]] = defaultdict(list)
        self.cond = threading.Condition()
        self.running_seen: list[int] = []
        self.scheduler: Scheduler | None = None

    def __call__(self, batch: list[tuple[int, Emission]]) -> None:
        with self.cond:
            if self.scheduler is not None:
                self.running_seen.append(self.scheduler.num_running)
            for seq_id, em in batch:
                self.emissions[seq_id].append(em)
            self.cond.notify_all()

    def done(self, seq_id: int) -> bool:
        ems = self.emissions.get(seq_id)
        return ems is not None and ems[-1].finish_reason is not None

    def wait(
        self, ids: list[int], timeout: float = 30.0
    ) -> dict[int, tuple[str, list[TokenOut], str | None]]:
        with self.cond:
            assert self.cond.wait_for(lambda: all(self.done(i) for i in ids), timeout)
            return {
                i: (
                    "".join(e.text for e in self.emissions[i]),
                    [t for e in self.emissions[i] for t in e.tokens],
                    self.emissions[i][-1].finish_reason,
                )
                for i in ids
            }


def _scheduler(tiny: LoadedModel, max_num_seqs: int = 64) -> tuple[Scheduler, Collector]:
    collector = Collector()
    sched = Scheduler(tiny, collector, max_num_seqs=max_num_seqs, seed=0)
    collector.scheduler = sched
    sched.start()
    return sched, collector


def _prompt(tiny: LoadedModel, text: str) -> list[int]:
    return tiny.tokenizer.encode(text, add_bos=True)


@pytest.mark.timeout(60)
def test_results_do_not_depend_on_the_batch(tiny: LoadedModel) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=24, logprobs=True, top_logprobs=3)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, logprobs=True, top_logprobs=2)
    sched, col = _scheduler(tiny)
    try:
        sched.submit(1, _prompt(tiny, "alone"), greedy)
        sched.submit(2, _prompt(tiny, "seeded"), seeded)
        alone = col.wait([1, 2])
        sched.submit(3, _prompt(tiny, "alone"), greedy)
        sched.submit(4, _prompt(tiny, "seeded"), seeded)
        for i in range(5, 12):  # other traffic, different lengths and settings
            sched.submit(i, _prompt(tiny, "noise " * i), SamplingParams(max_tokens=5 + i, seed=i))
        crowded = col.wait(list(range(3, 12)))
    finally:
        sched.stop()
    assert crowded[3] == alone[1]
    assert crowded[4] == alone[2]
    assert alone[1][1][0].logprob is not None and len(alone[1][1][0].top) == 3


@pytest.mark.timeout(60)
def test_forced_replay_reports_the_same_logprobs(tiny: LoadedModel) -> None:
    sched, col = _scheduler(tiny)
    originals = {}
    try:
        for i in range(1, 13):
            params = SamplingParams(
                temperature=1.2, seed=100 + i, max_tokens=40, logprobs=True, top_logprobs=4
            )
            sched.submit(i, _prompt(tiny, f"prompt {i}"), params)
        originals = col.wait(list(range(1, 13)))
        for i, (text, tokens, _) in originals.items():
            forced = tiny.tokenizer.encode(text, parse_special=False)
            # Sampling only makes valid UTF-8, so the text re-encodes to exactly the sampled tokens.
            assert forced == [t.id for t in tokens]
            params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=4)
            sched.submit(100 + i, _prompt(tiny, f"prompt {i}"), params, forced=forced)
        replays = col.wait([100 + i for i in originals])
    finally:
        sched.stop()
    for i, (text, tokens, _) in originals.items():
        r_text, r_tokens, reason = replays[100 + i]
        assert r_text == text and reason == "stop"
        assert r_tokens == tokens  # ids, logprobs and top logprobs, bit for bit


@pytest.mark.timeout(60)
def test_seeded_sampling_repeats(tiny: LoadedModel) -> None:
    sched, col = _scheduler(tiny)
    try:
        for i, seed in enumerate([5, 5, 6], start=1):
            sched.submit(i, _prompt(tiny, "same"), SamplingParams(temperature=1.0, seed=seed, max_tokens=30))
        out = col.wait([1, 2, 3])
    finally:
        sched.stop()
    assert out[1] == out[2]
    assert out[1][0] != out[3][0]


@pytest.mark.timeout(60)
def test_slots_are_capped_and_cancel_frees_them(tiny: LoadedModel) -> None:
    sched, col = _scheduler(tiny, max_num_seqs=2)
    long = [ord("x")] * 1500
    try:
        sched.submit(1, _prompt(tiny, "a"), SamplingParams(), forced=long)
        sched.submit(2, _prompt(tiny, "b"), SamplingParams(), forced=long)
        for i in range(3, 6):
            sched.submit(i, _prompt(tiny, "c"), SamplingParams(temperature=0.0, max_tokens=4))
        with col.cond:
            assert col.cond.wait_for(lambda: col.emissions.get(1) and col.emissions.get(2), 10)
            assert sched.num_waiting == 3
        sched.cancel(1)
        sched.cancel(2)
        col.wait([3, 4, 5])
    finally:
        sched.stop()
    assert max(col.running_seen) == 2
    assert not col.done(1) and not col.done(2)
    assert sched.generation_tokens < 1500
    assert sched.num_running == 0 and sched.num_waiting == 0
