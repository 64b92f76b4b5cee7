"""The step agreement driven message by message over an in-memory network with a clock.

Every message crosses the network as the bytes a peer link would carry and is decoded with the
group's own decoder, so the typed contract (:mod:`contracts.collective`) is what the ranks exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from contracts.collective import AnyMessage, Commit, Prepare, StepMessage
from services.train.collective.agreement import Decision, Hooks, StepAgreement, answer_after, answer_left

_decoder = msgspec.msgpack.Decoder(AnyMessage)

# -- the agreement protocol, driven message by message ---------------------------------------------


class Net:
    """In-memory delivery between StepAgreements, with a clock, dead ranks and droppable messages.

    A rank hears a peer when a message or heartbeat of it arrives; a ``cut`` link loses everything and
    a ``paused`` rank (a blocked event loop) neither ticks nor beats, its inbox waiting for ``resume``.
    The data of a ballot completes once every member of its view has started it, while ``data_ok``.
    A finished rank answers as PeerGroup does, from the agreement's own ``applied`` decision.
    """

    def __init__(self, world: int, *, data_ok: bool = True) -> None:
        self.now = 0.0
        self.dead: set[int] = set()
        self.paused: set[int] = set()
        self.cut: set[tuple[int, int]] = set()
        self.data_ok = data_ok
        self.queue: list[tuple[int, int, bytes]] = []
        self.held: list[tuple[int, int, bytes]] = []
        self.heard: dict[tuple[int, int], float] = {}
        self.starts: dict[tuple[int, int], set[int]] = {}
        self.ranks = {r: self._agreement(r, world) for r in range(world)}

    def _agreement(self, me: int, world: int) -> StepAgreement:
        def send(dest: int, message: StepMessage) -> None:
            assert message.r == me
            self.queue.append((me, dest, msgspec.msgpack.encode(message)))

        def start_data(ballot: tuple[int, int], view: tuple[int, ...]) -> None:
            started = self.starts.setdefault(ballot, set())
            started.add(me)
            if self.data_ok and set(view) <= started:
                for rank in view:
                    if self.ranks[rank].started == ballot and rank not in self.dead:
                        self.ranks[rank].data_complete(ballot)

        def silent_for(peer: int) -> float:  # never heard (ourselves included): silent since 0
            return self.now - self.heard.get((me, peer), 0.0)

        hooks = Hooks(send, silent_for, start_data, set, lambda: self.now)
        return StepAgreement(5, me, range(world), range(world), hooks, timeout=1.0, join_timeout=4.0)

    def deliver(self, drop: Callable[[int, int, dict[str, Any]], bool] = lambda s, d, h: False) -> None:
        while self.queue:
            sender, dest, wire = self.queue.pop(0)
            header = msgspec.msgpack.decode(wire)
            if {sender, dest} & self.dead or (sender, dest) in self.cut or drop(sender, dest, header):
                continue
            if dest in self.paused:
                self.held.append((sender, dest, wire))
                continue
            self.heard[(dest, sender)] = self.now
            target = self.ranks[dest]
            message = _decoder.decode(wire)
            assert isinstance(message, StepMessage) and message.r == sender
            if target.finished:  # what PeerGroup answers for a step it is done with
                done = target.applied
                reply = answer_left(dest, message) if done is None else answer_after(done, dest, message)
                if reply is not None:
                    self.queue.append((dest, sender, msgspec.msgpack.encode(reply)))
            else:
                target.handle(sender, message)  # type: ignore[arg-type]

    def resume(self, rank: int) -> None:
        """Unblock a paused rank: it first works through what arrived meanwhile, like an event loop."""
        self.paused.discard(rank)
        self.queue[:0] = [m for m in self.held if m[1] == rank]
        self.held = [m for m in self.held if m[1] != rank]
        self.deliver()

    def advance(
        self, seconds: float, drop: Callable[[int, int, dict[str, Any]], bool] = lambda s, d, h: False
    ) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += 0.05
            live = [r for r in self.ranks if r not in self.dead | self.paused]
            for rank in live:  # heartbeats
                for peer in self.ranks:
                    if peer != rank and (rank, peer) not in self.cut and peer not in self.paused:
                        self.heard[(peer, rank)] = self.now
            for rank in live:
                self.ranks[rank].tick()
            self.deliver(drop)


def test_agreement_happy_path_decides_the_same_view_everywhere() -> None:
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()
    net.deliver()
    decisions = {a.decision for a in net.ranks.values()}
    assert decisions == {Decision((1, 0), (1, 0), (0, 1, 2))}
    assert all(a.included for a in net.ranks.values())


def test_a_commit_that_reached_one_member_before_the_coordinator_died_reaches_the_rest() -> None:
    net = Net(4)
    for agreement in net.ranks.values():
        agreement.begin()
    # Everything flows until rank 0 commits; its commit reaches rank 3 only, and rank 0 dies.
    # Rank 3's forwards are lost too, so ranks 1 and 2 must find out from rank 3 through the protocol.
    net.deliver(drop=lambda s, d, h: h["t"] == "commit" and ((s == 0 and d != 3) or s == 3))
    net.dead.add(0)
    decided = net.ranks[3].decision
    assert decided is not None and decided.ranks == (0, 1, 2, 3)
    assert net.ranks[1].decision is None and net.ranks[2].decision is None
    net.advance(3.0)
    # Rank 1 took over, learned from rank 3's promise that the step was decided, and re-issued it.
    for rank in (1, 2):
        decision = net.ranks[rank].decision
        assert decision is not None and (decision.ballot, decision.ranks) == (decided.ballot, decided.ranks)
        assert decision.auth == (2, 1)  # re-issued by the new coordinator, not the old commit
        assert net.ranks[rank].included


def test_a_member_that_promised_a_newer_ballot_ignores_an_older_commit() -> None:
    net = Net(3)
    agreement = net.ranks[2]
    agreement.begin()
    agreement.handle(1, Prepare(r=1, step=5, ballot=(3, 1), view=(1, 2)))
    stale = Decision((1, 0), (1, 0), (0, 1, 2))
    agreement.handle(0, Commit(r=0, step=5, decision=stale))
    assert agreement.decision is None


def test_a_silent_member_is_suspected_and_the_coordinator_proposes_without_it() -> None:
    net = Net(3, data_ok=False)
    for agreement in net.ranks.values():
        agreement.begin()
    net.deliver()
    net.dead.add(2)
    net.data_ok = True  # without rank 2 the data of a new ballot completes
    net.advance(2.0)
    for rank in (0, 1):
        decision = net.ranks[rank].decision
        assert decision is not None and decision.ranks == (0, 1) and decision.ballot == (2, 0)


def decided(net: Net) -> set[tuple[tuple[int, int], tuple[int, ...]]]:
    """The (data ballot, ranks) of every rank's decision; one element when they all agree."""
    return {(a.decision.ballot, a.decision.ranks) for a in net.ranks.values() if a.decision is not None}


def test_a_coordinator_still_missing_its_own_data_repeats_start_to_a_member_that_lost_it() -> None:
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()

    def lost(sender: int, dest: int, header: dict[str, Any]) -> bool:
        return header["t"] == "start" and dest == 2 and net.now < 1.5  # e.g. a connection re-opened

    net.deliver(drop=lost)
    # Rank 0 waits for rank 2's data, rank 2 for the start; both alive. Past the timeout, but well
    # before rank 2 would give up on its coordinator (5 s), a repeated start must have gone through.
    net.advance(2.0, drop=lost)
    assert decided(net) == {((1, 0), (0, 1, 2))}
    assert all(a.included for a in net.ranks.values())


def test_a_coordinator_whose_member_moved_to_a_newer_ballot_is_told_so_and_learns_the_outcome() -> None:
    net = Net(3, data_ok=False)  # rank 0 is slow: no exchange completes until it is gone
    net.cut.add((0, 1))  # rank 1 never hears rank 0 (its connection is still being re-opened)
    net.paused.add(0)  # rank 0 reaches the all-reduce a little later
    net.ranks[1].begin()
    net.ranks[2].begin()
    net.deliver(drop=lambda s, d, h: (s, d) == (1, 2) and h["t"] == "ready")  # rank 2 never hears it
    net.advance(0.3)
    net.resume(0)
    net.ranks[0].begin()
    net.advance(1.2)
    # Rank 1 gave up on rank 0 and runs ballot [2, 1] with rank 2, but rank 0's [2, 0] took rank 2
    # over: rank 2 is alive and will never report done for [2, 1].
    one, two = net.ranks[1], net.ranks[2]
    assert two.promised == (2, 0) and two.coordinator == 0
    assert one.proposal is None and one.coordinator == 0  # a nack told rank 1: it stopped waiting
    net.dead.add(0)  # rank 0 dies mid-exchange; rank 2 goes on alone, never having had rank 1's ready
    net.data_ok = True
    net.advance(2.0)
    assert two.decision is not None and two.decision.ranks == (2,)
    assert one.finished and not one.included  # rank 1 asked rank 2 how the step ended


def test_data_reported_done_before_a_newer_promise_is_decided_again_so_no_rank_diverges() -> None:
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()

    def stall_zero(sender: int, dest: int, header: dict[str, Any]) -> bool:
        if header["t"] == "start" and dest == 2:
            net.paused.add(0)  # rank 0's loop blocks once it holds the result of ballot [1, 0]
        return False

    net.deliver(drop=stall_zero)
    # Every rank holds the result; the members' "done" wait in rank 0's inbox.
    assert all(a.completed == {(1, 0)} for a in net.ranks.values()) and not decided(net)
    net.advance(1.5)  # the survivors give up on rank 0 and rank 1 takes over
    net.resume(0)  # rank 0 wakes up to every member's done for ballot [1, 0], and decides it
    net.advance(0.5)
    assert decided(net) == {((1, 0), (0, 1, 2))}  # the survivors decided the same average
    assert net.ranks[1].decision is not None and net.ranks[1].decision.auth == (2, 1)


def test_an_excluded_rank_is_left_out_whatever_it_says_and_the_step_goes_on() -> None:
    """A rank the group dropped (or whose payload cannot be averaged) stays out of the step, even when
    it keeps announcing itself: its messages are ignored and no view includes it."""
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()
    for rank in (0, 1):
        net.ranks[rank].exclude({2})
    net.deliver()
    net.advance(1.0)
    # Rank 2 is alive and its data would complete: only the exclusion keeps it out of the view.
    assert decided(net) == {((1, 0), (0, 1))}
    assert all(net.ranks[rank].included for rank in (0, 1))


def test_a_member_that_excluded_a_rank_tells_a_coordinator_that_did_not() -> None:
    """Only rank 1 saw rank 2 break the protocol: it does not join rank 0's view with rank 2 in it, it
    tells rank 0, which proposes again without rank 2."""
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()
    net.ranks[1].exclude({2})
    net.deliver()
    net.advance(1.0)
    for rank in (0, 1):
        decision = net.ranks[rank].decision
        assert decision is not None and decision.ranks == (0, 1) and net.ranks[rank].included
