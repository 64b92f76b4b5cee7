"""A stopped round commits nothing more and lets go of the CPU at a fine grain (issue 12, case 3)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from contracts.pow import ProofBatch
from node.errors import Overloaded
from services.pow.cancel import Cancelled
from services.pow.compute import discover_groups
from services.pow.journal import Journal
from services.pow.outbox import Outbox
from services.pow.params import PowParams
from services.pow.round import RoundSpec, batch_for
from services.pow.runner import GENERATING, Runner
from tests.support.pow import CASE, init_dict
from tests.support.waiting import wait_until

URL = "http://127.0.0.1:9/v1/poc-batches"


def test_a_set_signal_abandons_the_model_build() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        discover_groups(CASE["block_hash"], PowParams.from_dict(CASE["params"]), "cpu", cancel=stop)


def test_nothing_is_committed_once_cancel_returns(tmp_path: Path) -> None:
    spec = RoundSpec.from_body(init_dict(URL, r_target=10.0))  # every nonce is valid: every batch commits
    outbox, journal = Outbox(tmp_path / "outbox.db"), Journal(tmp_path)
    runner = Runner(spec, GENERATING, outbox, journal, "cpu")
    runner.start()
    try:
        wait_until(lambda: outbox.last_id() >= 3, 60, message="no batch was generated")
        runner.cancel()
        committed, saved = outbox.last_id(), journal.load_round()
        runner.join(30)
        assert outbox.last_id() == committed
        assert journal.load_round() == saved
        assert not runner.error
        with pytest.raises(Exception, match="not running"):
            runner.submit(None)  # type: ignore[arg-type]
    finally:
        runner.stop()
        outbox.close()


def test_the_next_round_waits_for_the_old_one_to_let_go(tmp_path: Path) -> None:
    outbox, journal = Outbox(tmp_path / "outbox.db"), Journal(tmp_path)
    old = Runner(RoundSpec.from_body(init_dict(URL)), GENERATING, outbox, journal, "cpu")
    old.start()
    wait_until(lambda: old.loaded, 60)
    old.cancel()
    new = Runner(RoundSpec.from_body(init_dict(URL, block_height=2)), GENERATING, outbox, journal, "cpu",
                 after=old)
    new.start()
    try:
        wait_until(lambda: new.loaded, 60)
        assert not any(t.is_alive() for t in old._threads)
    finally:
        new.stop()
        outbox.close()


def test_a_full_validation_queue_is_429_and_journals_nothing_more(tmp_path: Path) -> None:
    """The round is not started here: batches stay queued, as behind a model that is still loading."""
    spec = RoundSpec.from_body(init_dict(URL))
    outbox, journal = Outbox(tmp_path / "outbox.db"), Journal(tmp_path)
    runner = Runner(spec, GENERATING, outbox, journal, "cpu")
    try:
        def batch(nonces: list[int]) -> ProofBatch:
            return batch_for({"public_key": CASE["public_key"], "block_hash": CASE["block_hash"],
                              "block_height": spec.block_height, "nonces": nonces,
                              "dist": [0.5] * len(nonces), "node_id": 0}, spec)

        runner.submit(batch([1, 2]), max_batches=3, max_nonces=5)
        runner.submit(batch([3, 4]), max_batches=3, max_nonces=5)
        with pytest.raises(Overloaded, match="MLNODE_POW_MAX_QUEUED_NONCES 5"):
            runner.submit(batch([5, 6]), max_batches=3, max_nonces=5)  # 6 nonces > 5
        runner.submit(batch([5]), max_batches=3, max_nonces=5)
        with pytest.raises(Overloaded, match="3 batches"):
            runner.submit(batch([]), max_batches=3, max_nonces=5)
        assert runner.queued() == 3 and len(journal.pending()) == 3
    finally:
        runner.stop()
        outbox.close()
