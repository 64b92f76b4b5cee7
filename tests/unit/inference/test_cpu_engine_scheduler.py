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
    return tiny.tokenizer.encode(text, add_special_tokens=True)


@pytest.mark.timeout(60)
def test_results_do_not_depend_on_the_batch(tiny: LoadedModel) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=24, logprobs=3)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, logprobs=2)
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
@pytest.mark.parametrize("mode", ["processed_logprobs", "raw_logprobs"])
def test_forced_replay_reports_the_same_logprobs(tiny: LoadedModel, mode: str) -> None:
    """A validator's replay (the executor's ids forced, the same sampling parameters) reports exactly the
    executor's numbers: forcing picks the token after the distribution is taken."""
    sched, col = _scheduler(tiny)
    originals = {}
    settings = {}
    try:
        for i in range(1, 13):
            settings[i] = SamplingParams(temperature=0.6 + 0.1 * i, top_p=0.5 + 0.04 * i, top_k=i % 4 * 7,
                                         repetition_penalty=1.1, presence_penalty=0.2, seed=100 + i,
                                         max_tokens=40, logprobs=5, logprobs_mode=mode).normalised()
            sched.submit(i, _prompt(tiny, f"prompt {i}"), settings[i])
        originals = col.wait(list(range(1, 13)))
        for i, (_text, tokens, _) in originals.items():
            replay = SamplingParams(**{**settings[i].__dict__, "seed": 999})
            sched.submit(100 + i, _prompt(tiny, f"prompt {i}"), replay, forced=tuple(t.id for t in tokens))
        replays = col.wait([100 + i for i in originals])
    finally:
        sched.stop()
    assert any(lp == float("-inf") for _t, tokens, _r in originals.values() for t in tokens
               for _id, lp in t.top) == (mode == "processed_logprobs")  # top-p/top-k masks show
    for i, (text, tokens, reason) in originals.items():
        r_text, r_tokens, r_reason = replays[100 + i]
        assert (r_text, r_reason) == (text, reason)
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
        sched.submit(1, _prompt(tiny, "a"), SamplingParams(max_tokens=1500), forced=tuple(long))
        sched.submit(2, _prompt(tiny, "b"), SamplingParams(max_tokens=1500), forced=tuple(long))
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
