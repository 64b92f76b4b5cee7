"""A registered training peer that breaks the protocol: speaks for another rank, claims rank 0 without
being registered as it, refuses steps it has no standing to abort, sends malformed messages, floods.

Every attacker is a real rank of the group (its own loop, CURVE key and peer links, registered with the
honest ranks), sending through its real link whatever the test makes it say. The honest ranks must drop
it where it broke the rules (and only it), and reduce the next step bit-identically, to the mean of the
ranks that took part.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import torch

from bus.peers import PeerMessage
from contracts.collective import Ask, Facts, Heartbeat, Refuse, Rejoin
from node.errors import Unavailable
from node.identity import KeyPair
from services.train.collective.group import Member, Reduced
from services.train.compression import Codec, compressed_mean
from tests.support.peer_ranks import Rank, bits, connect, dropped_keys, make_ranks
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
SHAPES = [(37, 129), (5000,)]


def payloads(world: int, seed: int = 0) -> dict[int, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {r: [torch.randn(shape, generator=gen) for shape in SHAPES] for r in range(world)}


def assert_mean(results: list[Reduced], data: dict[int, list[torch.Tensor]], ranks: tuple[int, ...]) -> None:
    expected = compressed_mean({r: data[r] for r in ranks}, Codec("none"))
    for result in results:
        assert result.ranks == ranks
        assert bits(result.tensors) == bits(expected)


def say(liar: Rank, to: list[Rank], *bodies: Any, payload: Any = None) -> None:
    """``liar`` sends each of ``bodies`` (any msgpack-able values) over its real links to each of ``to``."""
    for rank in to:
        sent = liar.do(lambda rank=rank: [liar.group.link.send(rank.keys.public, b, payload) for b in bodies])
        assert all(sent)


def wait_dropped(ranks: list[Rank], liar: Rank, reason: str) -> None:
    """Every one of ``ranks`` dropped ``liar`` (and nobody else), for ``reason``."""
    for rank in ranks:
        wait_until(lambda rank=rank: liar.keys.public in dropped_keys(rank), 10,
                   message=f"rank {rank.rank} did not drop the liar: {dropped_keys(rank)}")
        assert reason in dropped_keys(rank)[liar.keys.public], dropped_keys(rank)
        assert set(dropped_keys(rank)) == {liar.keys.public}


def ready(**change: Any) -> dict[str, Any]:
    facts = {"n": 9782, "c": "none"}
    return {"t": "ready", "r": 2, "step": 0, "lineage": "genesis", "facts": facts, **change}


def proposal(kind: str, ballot: list[int], view: list[int]) -> dict[str, Any]:
    return {"t": kind, "r": 2, "step": 0, "ballot": ballot, "view": view}


NOBODY = {"auth": [1, 2], "ballot": [1, 2], "ranks": []}
MALFORMED = {
    "an undecodable frame": (msgspec.Raw(b"\xc1\xc1"), None, "broken frame"),
    "not a message": (7, None, "malformed"),
    "unknown type": ({"t": "launch", "r": 2}, None, "malformed"),
    "unknown field": ({"t": "hb", "r": 2, "extra": 1}, None, "malformed"),
    "wrong type": (ready(step="0"), None, "malformed"),
    "negative step": (ready(step=-1), None, "malformed"),
    "step beyond any run": (ready(step=2**60), None, "malformed"),
    "huge lineage": (ready(lineage="x" * 10_000), None, "malformed"),
    "someone else's ballot": (proposal("prepare", [5, 0], [0, 1, 2]), None, "proposed by rank 0"),
    "a rank outside the world": (proposal("prepare", [5, 2], [0, 2, 7]), None, "names rank 7"),
    "an unsorted view": (proposal("start", [5, 2], [2, 0, 1]), None, "ascending"),
    "a decision for nobody": ({"t": "commit", "r": 2, "step": 0, "decision": NOBODY}, None, "malformed"),
    "a payload on a heartbeat": ({"t": "hb", "r": 2}, b"x" * 1024, "carries a payload"),
    "another rank's voice": ({"t": "hb", "r": 1}, None, "claims rank 1"),
    "a voice from outside": ({"t": "hb", "r": 3}, None, "names rank 3"),
}


@pytest.mark.parametrize(("body", "payload", "reason"), MALFORMED.values(), ids=MALFORMED)
def test_a_peer_that_breaks_the_protocol_is_dropped_and_the_others_go_on(body: Any, payload: Any,
                                                                        reason: str) -> None:
    ranks = make_ranks(3, timeout=0.5)
    try:
        liar, honest = ranks[2], ranks[:2]
        say(liar, honest, body, payload=payload)
        wait_dropped(honest, liar, reason)
        # Nothing it says is heard any more, even what would be fine; the step goes on without it.
        say(liar, honest, Heartbeat(r=2))
        liar.reduce(0, payloads(3)[2])
        data = payloads(3)
        assert_mean([f.result(30) for f in [r.reduce(0, data[r.rank]) for r in honest]], data, (0, 1))
    finally:
        for rank in ranks:
            rank.close()


def test_a_peer_registered_without_a_rank_cannot_claim_rank_0() -> None:
    """Rank 0 is the preferred coordinator: only the registry gives it. A key registered without a rank
    that speaks as rank 0 is dropped; ranks 1 and 2 are a majority of three and go on."""
    keys = [KeyPair.generate() for _ in range(3)]
    ranks = [Rank(r, 3, keys[r], timeout=0.5) for r in range(3)]
    try:
        liar, honest = ranks[0], ranks[1:]
        endpoints = [rank.group.endpoint for rank in ranks]
        connect(honest, [Member(keys[0].public, endpoints[0], None),
                         *(Member(keys[r].public, endpoints[r], r) for r in (1, 2))])
        connect([liar], [Member(keys[r].public, endpoints[r], r) for r in range(3)])
        data = payloads(3)
        liar.reduce(0, data[0])  # it runs the real protocol, as rank 0
        assert_mean([f.result(30) for f in [r.reduce(0, data[r.rank]) for r in honest]], data, (1, 2))
        wait_dropped(honest, liar, "claims rank 0")
    finally:
        for rank in ranks:
            rank.close()


def refuse_every_ready(liar: Rank, facts: Facts) -> None:
    """``liar`` takes part like any rank, but answers each rank's step with a ``refuse`` of ``facts``."""
    link = liar.group.link
    inner = link._handler
    tasks: set[asyncio.Task[None]] = set()
    told: set[tuple[str, int]] = set()

    def handler(msg: PeerMessage) -> None:
        inner(msg)
        doc = msgspec.msgpack.decode(msg.body)
        # The first message of a step from each rank (a ready may be lost while links open) gets a refuse,
        # credited: held back, not lost, while the connection is opening.
        if doc.get("t") in ("ready", "prepare", "start", "ask") and (msg.key, doc["step"]) not in told:
            told.add((msg.key, doc["step"]))
            refuse = Refuse(r=liar.rank, step=doc["step"], facts=facts)
            tasks.add(asyncio.get_running_loop().create_task(link.send_credited(msg.key, refuse, timeout=10)))

    link._handler = handler


def test_one_peers_refuse_does_not_abort_a_step_of_three() -> None:
    """A refuse says "our payloads differ": a configuration error, loud when this rank is the odd one
    out. One peer's refuse cannot make it so in a world of three: it only leaves that peer out."""
    ranks = make_ranks(3, timeout=0.5)
    try:
        liar, honest = ranks[2], ranks[:2]
        refuse_every_ready(liar, Facts(n=1, c="int8"))
        data = payloads(3)
        liar.reduce(0, data[2])
        assert_mean([f.result(30) for f in [r.reduce(0, data[r.rank]) for r in honest]], data, (0, 1))
        assert all(not dropped_keys(rank) for rank in honest)  # a mismatch is not a fault: left out
        data = payloads(3, seed=1)  # and the next step goes on without it
        assert_mean([f.result(30) for f in [r.reduce(1, data[r.rank]) for r in honest]], data, (0, 1))
    finally:
        for rank in ranks:
            rank.close()


def test_a_refuse_that_names_our_own_facts_is_a_lie_and_gets_the_peer_dropped() -> None:
    ranks = make_ranks(3, timeout=0.5)
    try:
        liar, honest = ranks[2], ranks[:2]
        data = payloads(3)
        refuse_every_ready(liar, Facts(n=sum(t.numel() for t in data[2]), c="none"))
        liar.reduce(0, data[2])
        assert_mean([f.result(30) for f in [r.reduce(0, data[r.rank]) for r in honest]], data, (0, 1))
        # Dropped by whoever heard the lie while the step ran (one may have decided before it came).
        dropped = [dropped_keys(rank) for rank in honest]
        assert any("equal to ours" in d.get(liar.keys.public, "") for d in dropped), dropped
        assert all(set(d) <= {liar.keys.public} for d in dropped), dropped
    finally:
        for rank in ranks:
            rank.close()


def heard_everything(liar: Rank, honest: list[Rank]) -> None:
    """Return once each of ``honest`` has handled all ``liar`` sent it so far: a state request sent after
    it, on the same connection, comes back refused (nothing is published)."""
    for rank in honest:
        with pytest.raises(Unavailable, match="no state published"):
            liar.call(lambda rank=rank: liar.group.fetch_state([[]], rank=rank.rank, timeout=10))


def test_a_flood_of_messages_for_later_steps_is_bounded_and_the_steps_go_on() -> None:
    """Messages about steps a rank has not begun are parked, at most 64 per peer, and none more than two
    steps ahead of the rank; announced rejoins are kept for 16 steps at most. Flooding is no fault."""
    ranks = make_ranks(3, timeout=0.5)
    try:
        liar, honest = ranks[2], ranks[:2]

        def parked(rank: Rank) -> dict[int, int]:
            future = rank.do(lambda: {step: list(entries) for step, entries in rank.group._future.items()})
            return {step: n for step, entries in future.items() if (n := sum(e[0] == 2 for e in entries))}

        say(liar, honest, *([Ask(r=2, step=1)] * 1500 + [Rejoin(r=2, step=100 + s) for s in range(500)]))
        heard_everything(liar, honest)
        for rank in honest:
            assert sum(parked(rank).values()) == 64
            assert len(rank.do(lambda rank=rank: dict(rank.group._rejoiners))) == 16
        for step in range(2):
            data = payloads(3, seed=step)
            futures = [rank.reduce(step, data[rank.rank]) for rank in ranks]
            assert_mean([f.result(30) for f in futures], data, (0, 1, 2))  # a flood is not a fault
        say(liar, honest, *(Ask(r=2, step=2000 + i) for i in range(100)))  # far beyond step 1
        heard_everything(liar, honest)
        assert all(not parked(rank) for rank in honest)
        data = payloads(3, seed=2)
        futures = [rank.reduce(2, data[rank.rank]) for rank in ranks]
        assert_mean([f.result(30) for f in futures], data, (0, 1, 2))
    finally:
        for rank in ranks:
            rank.close()
