"""A registered training peer that serves a state transfer which is not this node's model.

A rank that rejoins (restarted, left out, partitioned away) fetches the outer weights and momentum a peer
serves. The attacker is a real rank of the group that lies in what it serves: a header naming tensors of
its choosing (a 4 TiB one, one element more, another dtype, a tensor more), NaN values, or chunks off the
grid. The fetcher must refuse each before using it — the header before a byte is allocated — drop the
liar, and load the state of the next (honest) peer, bit for bit.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import torch

from contracts.collective import StateChunk, StateHeader, TensorSpec
from services.train.collective import state as state_module
from services.train.collective.tensors import TensorAssembler
from tests.support.peer_ranks import dropped_keys, layout, make_ranks, poisoned, rewrite_sends, serve

pytestmark = pytest.mark.timeout(60)

STATE = [torch.linspace(-1, 1, 3000), torch.ones(2, 2)]
FORGERIES: dict[str, tuple[TensorSpec, ...]] = {
    "a 4 TiB tensor": (TensorSpec("t0", "float64", (1 << 39,)), TensorSpec("t1", "float32", (2, 2))),
    "one element more": (TensorSpec("t0", "float32", (3001,)), TensorSpec("t1", "float32", (2, 2))),
    "another dtype": (TensorSpec("t0", "float64", (3000,)), TensorSpec("t1", "float32", (2, 2))),
    "a tensor more": (TensorSpec("t0", "float32", (3000,)), TensorSpec("t1", "float32", (2, 2)),
                      TensorSpec("t2", "float32", (1 << 30,))),
    "another name": (TensorSpec("t0", "float32", (3000,)), TensorSpec("evil", "float32", (2, 2))),
}


def lie_in_state_headers(tensors: tuple[TensorSpec, ...]) -> Any:
    def rewrite(message: Any, payload: Any) -> tuple[Any, Any]:
        if isinstance(message, StateHeader):
            return msgspec.structs.replace(message, tensors=tensors), payload
        return message, payload

    return rewrite


def poison_state_chunks(message: Any, payload: Any) -> tuple[Any, Any]:
    if isinstance(message, StateChunk) and message.tensor == 0 and message.chunk == 1:
        return message, poisoned(payload)
    return message, payload


def chunks_off_the_grid(message: Any, payload: Any) -> tuple[Any, Any]:
    if isinstance(message, StateChunk) and message.tensor == 0:
        return msgspec.structs.replace(message, chunk=message.chunk + 7), payload
    return message, payload


@pytest.mark.parametrize(
    ("lie", "reason"),
    [*((lie_in_state_headers(specs), "not this model's") for specs in FORGERIES.values()),
     (poison_state_chunks, "NaN"), (chunks_off_the_grid, "off its grid")],
    ids=[*FORGERIES, "nan-values", "chunks-off-the-grid"],
)
def test_a_forged_state_is_refused_before_use_and_the_honest_peers_state_loaded(
    lie: Any, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocated: list[tuple[TensorSpec, ...]] = []

    class Recording(TensorAssembler):  # the real assembler; we only note what it was asked to allocate
        def __init__(self, specs: Any, chunk_bytes: int) -> None:
            allocated.append(tuple(specs))
            super().__init__(specs, chunk_bytes)

    monkeypatch.setattr(state_module, "TensorAssembler", Recording)
    ranks = make_ranks(3, timeout=0.5)
    try:
        liar, honest, fetcher = ranks  # the liar is rank 0: asked first
        rewrite_sends(liar, lie)
        serve(liar, 4, STATE)
        serve(honest, 4, STATE)
        snapshot = fetcher.call(lambda: fetcher.group.fetch_state(layout(STATE), timeout=5))
        assert snapshot.outer_step == 4 and snapshot.names == ("t0", "t1")
        loaded = zip(snapshot.tensors, STATE, strict=True)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in loaded)
        assert snapshot.lineage == honest.group.lineage
        assert reason in dropped_keys(fetcher).get(liar.keys.public, ""), dropped_keys(fetcher)
        ours = tuple(layout(STATE)[0])
        assert set(allocated) <= {ours}, "something but this model's tensors was allocated"
        # Dropped: a second fetch goes straight to the honest peer and the liar is not even asked.
        again = fetcher.call(lambda: fetcher.group.fetch_state(layout(STATE), timeout=5))
        assert all(torch.equal(a, b) for a, b in zip(again.tensors, STATE, strict=True))
        assert 0 not in fetcher.do(fetcher.group.ranks)
    finally:
        for rank in ranks:
            rank.close()
