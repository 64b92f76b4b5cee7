"""The peer protocol's typed messages (contracts/collective.py) and the group's edge that decodes them.

The contract refuses at decode what a message can get wrong on its own; the group refuses what only it
can know (the sender's registered rank, the world size) and drops the sender. Attacks over real links
are in tests/security/test_peer_*.py; here each rule is checked on its own.
"""

from __future__ import annotations

from typing import Any, get_args

import msgspec
import pytest
import torch

from bus.peers import PeerMessage
from contracts.collective import (
    AnyMessage,
    Ask,
    Chunk,
    Commit,
    Decision,
    DtypeName,
    Facts,
    Heartbeat,
    Prepare,
    Promise,
    Ready,
    StateHeader,
    Suspect,
    TensorSpec,
)
from node.identity import KeyPair
from services.train.collective.group import Member
from services.train.collective.tensors import DTYPES
from services.train.compression import Codec
from tests.support.peer_ranks import Rank, connect, dropped_keys, make_ranks

decoder = msgspec.msgpack.Decoder(AnyMessage)
pytestmark = pytest.mark.timeout(60)

MESSAGES = [
    Heartbeat(r=3),
    Ready(r=1, step=4, lineage="genesis", facts=Facts(n=10, c="int8")),
    Prepare(r=2, step=4, ballot=(3, 2), view=(0, 2, 5)),
    Promise(r=0, step=4, ballot=(3, 2), applied=Decision((3, 2), (2, 1), (0, 1)), accepted=None),
    Suspect(r=0, step=4, suspects=(1, 2), ballot=None),
    Commit(r=0, step=4, decision=Decision((3, 2), (3, 2), (0, 2))),
    Chunk(r=1, step=4, ballot=(3, 2), phase="ag", shard=1, chunk=17),
    StateHeader(r=1, id="abc", outer_step=2, inner_step=100, lineage="genesis",
                tensors=(TensorSpec("outer.w", "float32", (3, 4)),), chunk_bytes=1 << 20),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_travels_as_its_own_type(message: Any) -> None:
    assert decoder.decode(msgspec.msgpack.encode(message)) == message


def refused(doc: dict[str, Any]) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        decoder.decode(msgspec.msgpack.encode(doc))
    return str(caught.value)


def test_the_contract_refuses_what_a_message_gets_wrong_on_its_own() -> None:
    prepare = {"t": "prepare", "r": 2, "step": 4, "ballot": [3, 2], "view": [0, 2]}
    assert "proposed by rank 0" in refused({**prepare, "ballot": [3, 0]})  # a rank proposes only its own
    assert "ascending" in refused({**prepare, "view": [2, 0]})
    assert "ascending" in refused({**prepare, "view": [0, 2, 2]})
    assert "include the proposer" in refused({**prepare, "view": [0, 1]})
    assert "unknown field" in refused({**prepare, "extra": 1})
    assert "`int`" in refused({**prepare, "step": True})
    assert ">= 0" in refused({**prepare, "step": -1})
    assert "<= 9007199254740992" in refused({**prepare, "step": 2**60})
    assert "<= 4095" in refused({**prepare, "view": [0, 2, 5000]})
    assert "Invalid value 'nope'" in refused({"t": "nope", "r": 0})
    commit = {"t": "commit", "r": 0, "step": 1, "decision": {"auth": [1, 0], "ballot": [1, 0], "ranks": []}}
    assert "length >= 1" in refused(commit)
    assert "length <= 64" in refused({"t": "ready", "r": 0, "step": 0, "lineage": "x" * 65,
                                      "facts": {"n": 1, "c": "none"}})
    facts = {"n": 1, "c": "zstd"}
    assert "'zstd'" in refused({"t": "ready", "r": 0, "step": 0, "lineage": "g", "facts": facts})
    header = msgspec.to_builtins(MESSAGES[-1])
    assert "multiple of 8" in refused({**header, "chunk_bytes": 4097})
    assert "'complex64'" in refused({**header, "tensors": [["w", "complex64", [1]]]})
    assert "length <= 16" in refused({**header, "tensors": [["w", "float32", [1] * 17]]})


def test_the_contract_and_the_collective_name_the_same_dtypes() -> None:
    assert set(get_args(DtypeName)) == set(DTYPES)
    assert all(isinstance(DTYPES[name], torch.dtype) for name in get_args(DtypeName))


# -- the group's edge ------------------------------------------------------------------------------


def on_message(rank: Rank, key: str, message: Any, payload: Any = None) -> None:
    """Hand ``rank``'s group one message as its link would (from the authenticated ``key``)."""
    body = msgspec.Raw(msgspec.msgpack.encode(message))
    rank.do(lambda: rank.group._on_message(PeerMessage(key, body, payload)))


def test_a_peer_speaks_only_for_its_own_rank_and_a_rankless_one_claims_a_free_rank_but_never_0() -> None:
    keys = [KeyPair.generate() for _ in range(5)]
    me = Rank(1, 5, keys[1], timeout=5)
    try:
        nowhere = "tcp://127.0.0.1:9"
        registered = [Member(keys[0].public, nowhere, 0), Member(keys[1].public, me.group.endpoint, 1),
                      *(Member(k.public, nowhere, None) for k in keys[2:])]
        connect([me], registered)
        on_message(me, keys[0].public, Heartbeat(r=0))
        on_message(me, keys[2].public, Heartbeat(r=3))  # rankless: a free rank is learned
        assert me.do(me.group.ranks) == {0: keys[0].public, 3: keys[2].public}
        on_message(me, keys[3].public, Heartbeat(r=3))  # taken by the first claim
        on_message(me, keys[4].public, Heartbeat(r=0))  # rank 0 only from the registry (taken here too)
        on_message(me, keys[0].public, Ask(r=2, step=0))  # registered as 0, speaks as 2
        reasons = dropped_keys(me)
        assert "which is taken" in reasons[keys[3].public]
        assert "rank 0" in reasons[keys[4].public]
        assert "is rank 0 but claims rank 2" in reasons[keys[0].public]
        assert me.do(me.group.ranks) == {3: keys[2].public}  # dropped peers are nobody's rank any more
        # A registration that changes (here: rank 0 is registered anew) gives a dropped peer a fresh start.
        connect([me], [registered[1], Member(keys[0].public, "tcp://127.0.0.1:9", None)])
        assert dropped_keys(me) == {}
    finally:
        me.close()


def test_a_rankless_peer_cannot_claim_rank_0_even_when_no_one_has_it() -> None:
    keys = [KeyPair.generate() for _ in range(3)]
    me = Rank(1, 3, keys[1], timeout=5)
    try:
        connect([me], [Member(keys[0].public, "tcp://127.0.0.1:9", None), Member(keys[1].public, "x", 1)])
        on_message(me, keys[0].public, Heartbeat(r=0))
        assert "claims rank 0" in dropped_keys(me)[keys[0].public]
    finally:
        me.close()


@pytest.mark.parametrize(
    ("message", "payload", "reason"),
    [
        ({"t": "hb", "r": 2}, memoryview(b"12345678"), "carries a payload"),
        ({"t": "prepare", "r": 2, "step": 0, "ballot": [1, 2], "view": [2, 3]}, None, "names rank 3"),
        ({"t": "hb", "r": 3}, None, "names rank 3"),
        ([1, 2], None, "malformed"),
    ],
    ids=["payload", "rank-in-view", "sender-rank", "not-a-map"],
)
def test_the_edge_checks_ranks_against_the_world_and_payloads_against_the_type(
    message: Any, payload: Any, reason: str
) -> None:
    ranks = make_ranks(3, timeout=5)
    try:
        on_message(ranks[0], ranks[2].keys.public, message, payload)
        assert reason in dropped_keys(ranks[0])[ranks[2].keys.public]
    finally:
        for rank in ranks:
            rank.close()


def test_a_third_rank_with_another_compression_fails_loudly_and_the_majority_goes_on() -> None:
    """A mismatch of payload facts fails a rank only when the ranks that share its facts cannot make a
    quorum: the misconfigured rank of three fails with the reason, the two others decide without it."""
    ranks = make_ranks(3, timeout=0.5)
    try:
        ranks[2].group.codec = Codec("int8")
        futures = [rank.reduce(0, [torch.ones(3000) * (rank.rank + 1)]) for rank in ranks]
        for future in futures[:2]:
            result = future.result(30)
            assert result.ranks == (0, 1) and torch.equal(result.tensors[0], torch.full((3000,), 1.5))
        with pytest.raises(Exception, match=r"compression 'none' at step 0, this rank 'int8'"):
            futures[2].result(30)
    finally:
        for rank in ranks:
            rank.close()
