"""Agreeing on who takes part in one collective step, so every survivor averages the same set of ranks.

Peers fail by going quiet, so the only failure detector is a timeout, and two nodes may time out on
different peers. To keep every survivor's result bit-identical, one coordinator (the lowest rank that
is alive) decides, and a small ballot protocol makes that decision safe when coordinators change:

1. **gather** — each rank announces ``ready`` and waits (bounded) for the ranks it expects.
2. **prepare/promise** — the coordinator proposes ballot ``(epoch, rank)`` with a view (the ranks it
   heard from); members promise to ignore older ballots. A member that already applied a decision
   for this step says so in its promise, and the new coordinator re-issues that decision instead. So
   does a member that reported ``done`` for an older ballot: if every member of that ballot's view who
   promised did so, the old coordinator may have decided it, and the new one re-issues it as well.
3. **start/done** — members exchange data for the ballot and report ``done`` when they hold the full
   result.
4. **commit** — once every member of the view is done, the coordinator commits; every member forwards
   the commit to the others before applying it, so a coordinator that dies mid-broadcast cannot leave
   survivors split. A commit older than a member's promise is ignored.

Any member that goes silent for ``timeout`` is suspected; suspicion reaches the coordinator (or elects
the next-lowest rank), which proposes a new ballot without it. A rank left out of a decided view learns
so and must resynchronise; so must a rank whose ``ready`` names another *lineage* (history of applied
decisions) than the coordinator's. Every phase message is idempotent and repeated now and then, so a
message lost with a re-opened connection only costs time. This module is pure logic: the caller
supplies sending, liveness, the data plane and a clock, which keeps every transition testable. The
messages are the typed ones of :mod:`contracts.collective`, decoded and checked by the caller (ranks
within the world, a proposer's ballot its own) before they reach :meth:`StepAgreement.handle`.

Heartbeats only prove that a peer is alive, not that it still works on this step, so no rank ever
waits on a peer without asking it: a member asks its coordinator (``ask``, or ``done`` once its data
is complete) every few ticks, and every rank answers what it knows — a decided rank with ``commit``,
a rank that left the step (see :func:`answer_after`; the caller answers for finished ranks) with
``leave``, a coordinator with its ``start`` or ``prepare``, anyone else with a ``nack`` naming the newer
ballot it follows. A rank never follows a coordinator it has already given up on for longer than
``timeout + join_timeout``; then it takes over (or hands over to the lowest rank it still trusts).

**Quorum.** A coordinator proposes only a view that holds a majority of the registered world
(``quorum``). Two views of one step therefore always share a rank, and the promise of that rank carries
what it applied or reported done, so a partition can never decide one step twice with different
contents: the majority side goes on, a minority side decides nothing and keeps knocking (``ready`` to
every peer) until the link heals; then a peer answers with the decision (or ``behind``, see
:meth:`StepAgreement.behind`) and the rank resynchronises from the majority's state. Where we go further
than hivemind/OpenDiLoCo, whose averaging groups simply proceed with whoever answers: their partitions
diverge silently. The price: without a majority (a two-node run with one node lost) nothing is decided.

Limits, by design: failure detection is by timeout, so a rank that is merely slow beyond ``timeout``
is treated as failed (it then resynchronises).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from contracts.collective import (
    QUESTIONS,
    Accepted,
    AgreementMessage,
    Ask,
    Ballot,
    Behind,
    Commit,
    Decision,
    Done,
    Facts,
    Leave,
    Nack,
    Prepare,
    Promise,
    Ready,
    Start,
    StepMessage,
    Suspect,
)
from node.logging import get_logger

log = get_logger(__name__)

__all__ = ["GENESIS", "Ballot", "Decision", "Hooks", "StepAgreement", "answer_after", "answer_behind",
           "answer_left", "ballot_key"]

#: Payload facts of a caller that has none to compare (the agreement itself never looks at them).
NO_FACTS = Facts(n=0, c="none")
#: The lineage of state that went through no decision yet.
GENESIS = "genesis"


def ballot_key(ballot: Ballot) -> tuple[int, int]:
    """Newer epochs win; within an epoch the lower rank wins (it is the preferred coordinator)."""
    return (ballot[0], -ballot[1])


@dataclass
class _Proposal:
    ballot: Ballot
    view: tuple[int, ...]
    since: float
    promises: set[int] = field(default_factory=set)
    adopted: Decision | None = None
    accepted: dict[int, Accepted | None] = field(default_factory=dict)
    running: bool = False
    dones: set[int] = field(default_factory=set)


@dataclass
class Hooks:
    """What the agreement needs from its owner."""

    send: Callable[[int, StepMessage], None]
    """Send a control message to a rank (fire and forget)."""
    silent_for: Callable[[int], float]
    """Seconds since anything was heard from a rank (counted from the step's start at most)."""
    start_data: Callable[[Ballot, tuple[int, ...]], None]
    """Begin exchanging data for a ballot (abandoning any other ballot's exchange)."""
    waiting_on: Callable[[], set[int]]
    """Ranks whose data the running exchange still waits for."""
    clock: Callable[[], float] = time.monotonic
    data_heard: Callable[[], float] = lambda: -math.inf
    """Clock time at which the running exchange last received data."""


class StepAgreement:
    """One rank's side of the agreement for one step; feed it messages and ticks until ``finished``."""

    def __init__(
        self,
        step: int,
        me: int,
        peers: Iterable[int],
        expected: Iterable[int],
        hooks: Hooks,
        *,
        timeout: float,
        join_timeout: float,
        lineage: str = GENESIS,
        quorum: int = 1,
    ) -> None:
        self.step = step
        #: Ranks a view needs before this rank proposes it: a majority of the registered world, so two
        #: sides of a partition can never both decide (see the module doc).
        self.quorum = quorum
        #: Clock time since which this rank reaches too few peers to propose (None: it does not).
        self.no_quorum_since: float | None = None
        self.lineage = lineage
        self.lineages: dict[int, str] = {}
        self.me = me
        self.peers = set(peers) - {me}
        self.expected = set(expected) & self.peers
        self.hooks = hooks
        self.timeout = timeout
        self.join_timeout = join_timeout
        now = hooks.clock()
        self.began = now
        self.ready: set[int] = {me}
        self.gathering = True
        self.gave_up: set[int] = set()
        self.suspected: set[int] = set()
        #: Ranks that may not take part in this step whatever they say (see :meth:`exclude`).
        self.barred: set[int] = set()
        self.promised: Ballot | None = None
        self.max_epoch = 0
        self.view: tuple[int, ...] = ()
        self.coordinator: int | None = None
        self.waiting_since = now
        #: The newest ballot a ``nack`` told us about (we follow its proposer without having promised).
        self.following: Ballot | None = None
        #: Who told us about ``following``; asked too while its proposer is one we gave up on.
        self.informant: int | None = None
        #: Ranks that asked about this step: they hear the outcome even if we never had their ``ready``.
        self.askers: set[int] = set()
        self.accepted: Accepted | None = None
        self.started: Ballot | None = None
        self._started_at = now
        self.completed: set[Ballot] = set()
        self.proposal: _Proposal | None = None
        self.decision: Decision | None = None
        self.excluded_reason: str | None = None
        self._facts = NO_FACTS
        self._announced = now

    # -- outcome ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.decision is not None or self.excluded_reason is not None

    @property
    def included(self) -> bool:
        """True when a decision was reached that averages this rank's data with the decided ranks."""
        return self.excluded_reason is None and self.decision is not None

    @property
    def applied(self) -> Decision | None:
        """The decision this rank applies, or None when it left the step: what it then answers a late
        message with (:func:`answer_after` of it, else :func:`answer_left`)."""
        return self.decision if self.included else None

    @property
    def waiting_for_quorum(self) -> bool:
        """True while this rank reaches too few ranks to propose and follows nobody."""
        return self.no_quorum_since is not None and self.proposal is None and self.coordinator == self.me

    def begin(self, facts: Facts = NO_FACTS) -> None:
        """Announce readiness to every peer (``facts``, what our payload is, ride along)."""
        self._facts = facts
        self._announced = self.hooks.clock()
        for rank in sorted(self.peers):
            self._send_ready(rank)
        self.tick()

    # -- inputs -------------------------------------------------------------------------------
    def handle(self, sender: int, message: AgreementMessage) -> None:
        """Process one message of this step from ``sender`` (decoded and checked by the caller)."""
        if self.finished or sender == self.me or sender in self.barred:
            return
        match message:
            case Ready():
                self._on_ready(sender, message.lineage)
            case Prepare():
                self._on_prepare(sender, message.ballot, message.view)
            case Promise():
                self._on_promise(sender, message.ballot, message.applied, message.accepted)
            case Nack():
                self._on_nack(sender, message.ballot)
            case Start():
                self._on_start(sender, message.ballot, message.view)
            case Done():
                self._on_done(sender, message.ballot)
            case Commit():
                self._on_commit(sender, message.decision)
            case Suspect():
                self._on_suspect(message.suspects, message.ballot)
            case Leave():
                self._on_leave(sender)
            case Ask():
                self._on_ask(sender, message.ballot)
            case Behind():
                self.behind(message.at)

    def data_complete(self, ballot: Ballot) -> None:
        """The data plane holds the full result of ``ballot``."""
        self.completed.add(ballot)
        if self.finished or self.started != ballot:
            return
        proposal = self.proposal
        if proposal is not None and proposal.ballot == ballot and proposal.running:
            self._accept(ballot)
            proposal.dones.add(self.me)
            self._check_dones()
        elif self.promised == ballot and self.coordinator == ballot[1]:
            self._accept(ballot)
            self._send(ballot[1], Done, ballot=ballot)

    def suspect(self, ranks: set[int]) -> None:
        """Treat ``ranks`` as failed for this step (e.g. they sent data that does not fit)."""
        if self.finished:
            return
        if self.gathering:
            self.suspected |= ranks - {self.me}
        else:
            self._suspect(ranks)

    def exclude(self, ranks: set[int]) -> None:
        """Leave ``ranks`` out of this step for good: suspected, and never taken back by what they say
        (a peer that was dropped, or whose payload cannot be averaged with ours)."""
        ranks = ranks - {self.me}
        self.barred |= ranks
        self.gave_up |= ranks
        self.suspect(ranks)
        if self.gathering and self.expected <= self.ready | self.gave_up:
            self._end_gather()

    def tick(self) -> None:
        """Act on timeouts and repeat the message of the current phase; call a few times per ``timeout``."""
        if self.finished:
            return
        now = self.hooks.clock()
        # A message queued on a connection that had to be re-opened is lost with it; every phase
        # message is idempotent, so each phase simply says its piece again now and then.
        resend = now - self._announced > self.timeout / 4
        if resend:
            self._announced = now
        if self.waiting_for_quorum:
            if resend:  # keep knocking: a healed link answers (a commit, a start, or a ready to retry with)
                for rank in sorted(self.peers - self.barred):
                    self._send_ready(rank)
            return
        if self.gathering:
            if resend:
                for rank in sorted(self.expected - self.ready - self.gave_up):
                    self._send_ready(rank)
            for rank in self.expected - self.ready - self.gave_up:
                if self.hooks.silent_for(rank) > self.timeout or now - self.began > self.join_timeout:
                    log.info("peer_not_ready", step=self.step, rank=rank)
                    self.gave_up.add(rank)
            if self.expected <= self.ready | self.gave_up:
                self._end_gather()
            return
        proposal = self.proposal
        if proposal is not None and not proposal.running:
            if now - proposal.since > self.timeout:
                self._suspect(set(proposal.view) - proposal.promises)
            elif resend:
                for rank in sorted(set(proposal.view) - proposal.promises):
                    self._send(rank, Prepare, ballot=proposal.ballot, view=proposal.view)
            return
        if proposal is not None and proposal.running:
            # Never count ourselves: we are not "silent" while our own data is still incomplete.
            quiet = {
                r
                for r in set(proposal.view) - {self.me}
                if r not in proposal.dones and self.hooks.silent_for(r) > self.timeout
            }
            quiet |= {r for r in self.hooks.waiting_on() if self.hooks.silent_for(r) > self.timeout}
            quiet |= self._data_stalled(now)
            if quiet:
                self._suspect(quiet)
            elif resend:
                for rank in sorted(set(proposal.view) - proposal.dones - {self.me}):
                    self._send(rank, Start, ballot=proposal.ballot, view=proposal.view)
            return
        if self.started is not None and self.started not in self.completed:
            quiet = {r for r in self.hooks.waiting_on() if self.hooks.silent_for(r) > self.timeout}
            quiet |= self._data_stalled(now)
            if quiet:
                self._suspect(quiet)
                return
        coordinator = self.coordinator
        if coordinator is None or coordinator == self.me:
            return
        patience = self.timeout + self.join_timeout
        if coordinator in self.suspected:
            # A nack sent us after a proposer we already gave up on: its members may still finish the
            # step (and tell us), but we never wait on it for good.
            if now - self.waiting_since > patience:
                log.warning("coordinator_abandoned", step=self.step, rank=coordinator)
                self._reelect()
            elif resend:
                informant = self.informant
                for rank in sorted({coordinator} | ({informant} if informant is not None else set())):
                    self._ask(rank)
            return
        stuck = self.started is None and now - self.waiting_since > patience
        if self.hooks.silent_for(coordinator) > self.timeout or stuck:
            self._suspect({coordinator})
        elif resend:
            self._ask(coordinator)

    # -- phases -------------------------------------------------------------------------------
    def _end_gather(self) -> None:
        self.gathering = False
        candidates = self.ready - self.suspected - self.barred
        coordinator = min(candidates)
        if coordinator == self.me:
            self._propose(candidates)
        else:
            self.coordinator = coordinator
            self.waiting_since = self.hooks.clock()

    def _propose(self, members: set[int]) -> None:
        # Ranks whose state descends from other decisions than ours would average apples with pears:
        # leave them out; they learn it from the start message and resynchronise.
        strangers = {
            r for r in members if r != self.me and self.lineages.get(r, self.lineage) != self.lineage
        }
        if strangers:
            log.warning("peers_diverged", step=self.step, ranks=sorted(strangers))
            members = members - strangers
        view = tuple(sorted((members - self.barred) | {self.me}))
        if len(view) < self.quorum:
            self._lose_quorum(view)
            return
        self._regain_quorum()
        self.max_epoch += 1
        ballot = (self.max_epoch, self.me)
        self.promised, self.view, self.coordinator = ballot, view, self.me
        self.proposal = _Proposal(ballot, view, self.hooks.clock(), promises={self.me})
        log.info("step_proposed", step=self.step, ballot=list(ballot), view=list(view))
        for rank in view:
            if rank != self.me:
                self._send(rank, Prepare, ballot=ballot, view=view)
        self._check_promises()

    def _lose_quorum(self, view: tuple[int, ...]) -> None:
        """Too few ranks reachable to decide: decide nothing, keep asking until the partition heals."""
        self.proposal = None
        self.coordinator = self.me
        if self.no_quorum_since is None:
            self.no_quorum_since = self.hooks.clock()
            log.warning("quorum_lost", step=self.step, reachable=list(view), quorum=self.quorum)

    def _regain_quorum(self) -> None:
        if self.no_quorum_since is not None:
            waited = round(self.hooks.clock() - self.no_quorum_since, 3)
            log.info("quorum_regained", step=self.step, waited_s=waited)
            self.no_quorum_since = None

    def behind(self, at: int) -> None:
        """A peer says the group already went past this step (its oldest remembered decision is ``at``)."""
        if not self.finished:
            self._exclude(f"the group is past step {self.step} (it remembers steps from {at} on)")

    def _check_promises(self) -> None:
        proposal = self.proposal
        if proposal is None or proposal.running or not set(proposal.view) <= proposal.promises:
            return
        if proposal.adopted is not None:
            adopted = proposal.adopted
            self._commit(Decision(proposal.ballot, adopted.ballot, adopted.ranks), skip=None)
            return
        carried = self._maybe_decided(proposal)
        if carried is not None:
            log.info("step_carried_over", step=self.step, ballot=list(carried.ballot),
                     view=list(carried.view))
            self._commit(Decision(proposal.ballot, carried.ballot, carried.view), skip=None)
            return
        proposal.running = True
        for rank in sorted((self.ready | set(proposal.view)) - {self.me}):
            self._send(rank, Start, ballot=proposal.ballot, view=proposal.view)
        self._start(proposal.ballot)

    def _maybe_decided(self, proposal: _Proposal) -> Accepted | None:
        """The newest ballot reported done that its old coordinator may have decided, if there is one.

        A ballot is decided only once every member of its view reported ``done``; a member that promised
        our newer ballot never reports it later. So if any promiser of that view did not report it, it
        cannot have been decided and we are free to start afresh; otherwise we must decide it again.
        """
        reports = {**proposal.accepted, self.me: self.accepted}
        newest = max(
            (a for r, a in reports.items() if a is not None and r in proposal.view),
            key=lambda a: ballot_key(a.ballot),
            default=None,
        )
        if newest is None:
            return None
        ballot, view = newest.ballot, newest.view
        if all((a := reports.get(r)) is not None and a.ballot == ballot for r in proposal.view if r in view):
            return newest
        return None

    def _accept(self, ballot: Ballot) -> None:
        if self.accepted is None or ballot_key(ballot) > ballot_key(self.accepted.ballot):
            self.accepted = Accepted(ballot, self.view)

    def _start(self, ballot: Ballot) -> None:
        if self.started == ballot:
            return
        self.started = ballot
        self._started_at = self.hooks.clock()
        self.hooks.start_data(ballot, self.view)
        if ballot in self.completed:
            self.data_complete(ballot)

    def _check_dones(self) -> None:
        proposal = self.proposal
        if proposal is not None and proposal.running and set(proposal.view) <= proposal.dones:
            self._commit(Decision(proposal.ballot, proposal.ballot, proposal.view), skip=None)

    def _commit(self, decision: Decision, skip: int | None) -> None:
        self.decision = decision
        for rank in sorted((self.ready | self.askers | set(self.view) | set(decision.ranks)) - {self.me}):
            if rank != skip:
                self._send(rank, Commit, decision=decision)
        if self.me not in decision.ranks:
            self.excluded_reason = f"step {self.step} was decided without rank {self.me}"
        elif decision.ballot not in self.completed:
            self.excluded_reason = f"rank {self.me} lacks the data of the ballot decided for step {self.step}"
        log.info(
            "step_decided",
            step=self.step,
            ballot=list(decision.ballot),
            ranks=list(decision.ranks),
            included=self.excluded_reason is None,
        )

    def _exclude(self, reason: str) -> None:
        self.excluded_reason = reason
        log.warning("step_excluded", step=self.step, rank=self.me, reason=reason)

    def _suspect(self, ranks: set[int]) -> None:
        new = ranks - self.suspected - {self.me}
        if not new:
            return
        log.warning("peers_suspected", step=self.step, ranks=sorted(new))
        self.suspected |= new
        self._reelect()

    def _data_stalled(self, now: float) -> set[int]:
        """Live ranks whose data stopped coming: treated like silent ones, so the step cannot hang.

        A chunk lost with a re-opened connection is never sent again, and its sender still heartbeats.
        """
        if self.started is None or self.started in self.completed:
            return set()
        if now - max(self._started_at, self.hooks.data_heard()) <= self.timeout + self.join_timeout:
            return set()
        stalled = self.hooks.waiting_on() - {self.me}
        if stalled:
            log.warning("data_stalled", step=self.step, ballot=list(self.started), ranks=sorted(stalled))
        return stalled

    def _newest(self) -> Ballot | None:
        """The newest ballot this rank promised or follows."""
        known = [b for b in (self.promised, self.following) if b is not None]
        return max(known, key=ballot_key, default=None)

    def _ask(self, rank: int) -> None:
        """Ask ``rank`` where the step stands; whatever state it is in, it answers (see the module doc)."""
        started, newest = self.started, self._newest()
        if started is not None and started in self.completed and started == newest:
            if rank == started[1]:
                self._accept(started)
            self._send(rank, Done, ballot=started)
        else:
            self._send(rank, Ask, ballot=newest)

    def _reelect(self) -> None:
        basis = set(self.view) if self.view else set(self.ready)
        candidates = (basis - self.suspected - self.barred) | {self.me}
        coordinator = min(candidates)
        if coordinator == self.me:
            self._propose(candidates)
            return
        self.coordinator = coordinator
        self.waiting_since = self.hooks.clock()
        newest = self._newest()  # the new coordinator must outbid what we promised the old one
        self._send(coordinator, Suspect, suspects=tuple(sorted(self.suspected)), ballot=newest)

    # -- message handlers ---------------------------------------------------------------------
    def _accepts(self, ballot: Ballot) -> bool:
        return self.promised is None or ballot_key(ballot) >= ballot_key(self.promised)

    def _adopt_ballot(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        self.promised = ballot
        if self.following is not None and ballot_key(self.following) <= ballot_key(ballot):
            self.following = None
        self.max_epoch = max(self.max_epoch, ballot[0])
        self.view = view
        self.coordinator = sender
        self.gathering = False
        self._regain_quorum()
        self.waiting_since = self.hooks.clock()
        if self.proposal is not None and self.proposal.ballot != ballot:
            self.proposal = None
        if self.me not in view:
            self._exclude(f"ballot {list(ballot)} of step {self.step} leaves rank {self.me} out")

    def _on_ready(self, sender: int, lineage: str) -> None:
        self.ready.add(sender)
        self.lineages[sender] = lineage
        proposal = self.proposal
        if proposal is not None and proposal.running and sender not in proposal.view:
            self._send(sender, Start, ballot=proposal.ballot, view=proposal.view)
        if self.gathering:
            self.tick()
        elif self.waiting_for_quorum:
            self.suspected.discard(sender)  # it is back: try again with it
            self._reelect()

    def _on_prepare(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        if not self._accepts(ballot):
            assert self.promised is not None
            self._send(sender, Nack, ballot=self.promised)
            return
        if self._refuses_view(sender, view):
            return
        self._adopt_ballot(sender, ballot, view)
        if not self.finished:
            self._send(sender, Promise, ballot=ballot, applied=None, accepted=self.accepted)

    def _on_promise(
        self, sender: int, ballot: Ballot, applied: Decision | None, accepted: Accepted | None = None
    ) -> None:
        proposal = self.proposal
        if proposal is None or proposal.ballot != ballot or proposal.running:
            return
        proposal.promises.add(sender)
        proposal.accepted[sender] = accepted
        if applied is not None and (
            proposal.adopted is None or ballot_key(applied.auth) > ballot_key(proposal.adopted.auth)
        ):
            proposal.adopted = applied
        self._check_promises()

    def _on_nack(self, sender: int, ballot: Ballot) -> None:
        """``sender`` follows a newer ballot than ours: stop proposing (if we were), follow its proposer."""
        self.max_epoch = max(self.max_epoch, ballot[0])
        newest = self._newest()
        if self.gathering or (newest is not None and ballot_key(ballot) <= ballot_key(newest)):
            return
        if self.proposal is not None:
            log.info(
                "step_proposal_superseded", step=self.step, ours=list(self.proposal.ballot), by=list(ballot)
            )
            self.proposal = None
        self.following = ballot
        self.informant = sender
        self.coordinator = ballot[1]
        self.waiting_since = self.hooks.clock()

    def _on_ask(self, sender: int, theirs: Ballot | None) -> None:
        """A rank waiting on us: tell it what we know, so that no rank waits on a live peer for good."""
        self.askers.add(sender)
        if self.gathering:
            return  # our proposal (or our coordinator's) reaches it once the bounded gather ends
        proposal = self.proposal
        if proposal is not None:
            if proposal.running and sender not in proposal.dones:
                self._send(sender, Start, ballot=proposal.ballot, view=proposal.view)
            elif not proposal.running and sender in proposal.view and sender not in proposal.promises:
                self._send(sender, Prepare, ballot=proposal.ballot, view=proposal.view)
            return
        newest = self._newest()
        if newest is not None and (theirs is None or ballot_key(newest) > ballot_key(theirs)):
            self._send(sender, Nack, ballot=newest)

    def _on_leave(self, sender: int) -> None:
        """``sender`` is out of this step (it left, or it was left out and finished without us)."""
        if sender == self.coordinator and sender in self.suspected and not self.gathering:
            self._reelect()  # we followed it after a nack: it will never drive the step, stop waiting
        else:
            self._on_suspect((sender,))

    def _on_start(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        if not self._accepts(ballot):
            assert self.promised is not None
            self._send(sender, Nack, ballot=self.promised)
            return
        if self.promised != ballot or self.coordinator != sender:
            if self._refuses_view(sender, view):
                return
            self._adopt_ballot(sender, ballot, view)
        if not self.finished:
            self._start(ballot)

    def _refuses_view(self, sender: int, view: tuple[int, ...]) -> bool:
        """True for a view holding a rank this rank excluded: instead of joining it, tell its proposer,
        which may not know (only this rank saw that peer break the protocol), to propose without it."""
        barred = self.barred & set(view)
        if not barred:
            return False
        self._send(sender, Suspect, suspects=tuple(sorted(self.suspected | barred)), ballot=self._newest())
        return True

    def _on_done(self, sender: int, ballot: Ballot) -> None:
        proposal = self.proposal
        if proposal is not None and proposal.ballot == ballot and proposal.running:
            proposal.dones.add(sender)
            self._check_dones()
        else:
            self._on_ask(sender, ballot)  # done with a ballot we do not run: it waits on us all the same

    def _on_commit(self, sender: int, decision: Decision) -> None:
        if not self._accepts(decision.auth):
            return
        self._commit(decision, skip=sender)

    def _on_suspect(self, ranks: Sequence[int], theirs: Ballot | None = None) -> None:
        """``ranks`` failed; ``theirs`` is the newest ballot of the rank that now counts on us."""
        new = set(ranks) - self.suspected - {self.me}
        self.suspected |= new
        if theirs is not None:
            self.max_epoch = max(self.max_epoch, theirs[0])
        if self.gathering:
            return
        # Only a rank we count on forces a new ballot: a stranger's leave must not restart our data.
        counted = (set(self.view) if self.view else self.ready) | {self.coordinator}
        # A rank that turned to us may have promised more than our ballot: outbid it, or it nacks us.
        outbid = (
            theirs is not None
            and self.proposal is not None
            and ballot_key(theirs) > ballot_key(self.proposal.ballot)
        )
        if new & counted or outbid:
            self._reelect()

    # -- helpers ------------------------------------------------------------------------------
    def _send_ready(self, rank: int) -> None:
        self._send(rank, Ready, lineage=self.lineage, facts=self._facts)

    def _send(self, rank: int, kind: type[StepMessage], **fields: Any) -> None:
        self.hooks.send(rank, kind(r=self.me, step=self.step, **fields))


def answer_after(decision: Decision, me: int, message: StepMessage) -> StepMessage | None:
    """How rank ``me``, which already applied ``decision``, answers a late message of that step."""
    if isinstance(message, Prepare):
        return Promise(r=me, step=message.step, ballot=message.ballot, applied=decision)
    if isinstance(message, QUESTIONS):
        return Commit(r=me, step=message.step, decision=decision)
    return None


def answer_behind(oldest: int, me: int, message: StepMessage) -> StepMessage | None:
    """How rank ``me`` answers a question about a step older than every decision it still remembers."""
    return Behind(r=me, step=message.step, at=oldest) if isinstance(message, QUESTIONS) else None


def answer_left(me: int, message: StepMessage) -> StepMessage | None:
    """How rank ``me``, which left the step (excluded, or gave up), answers a late question of it."""
    return Leave(r=me, step=message.step) if isinstance(message, QUESTIONS) else None
