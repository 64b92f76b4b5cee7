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
supplies sending, liveness, the data plane and a clock, which keeps every transition testable.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.errors import ProtocolError
from node.logging import get_logger

log = get_logger(__name__)

Ballot = tuple[int, int]
"""``(epoch, proposer rank)``; compared by :func:`ballot_key`."""

MESSAGE_TYPES = (
    "ready", "prepare", "promise", "nack", "start", "done", "commit", "suspect", "leave", "ask", "behind"
)
#: Messages a peer sends while it waits for this rank; a rank that finished the step still answers them.
QUESTIONS = ("ready", "prepare", "start", "done", "suspect", "ask")

Accepted = tuple[Ballot, tuple[int, ...]]
"""A ballot this rank reported ``done`` for, with that ballot's view."""


def ballot_key(ballot: Ballot) -> tuple[int, int]:
    """Newer epochs win; within an epoch the lower rank wins (it is the preferred coordinator)."""
    return (ballot[0], -ballot[1])


@dataclass(frozen=True)
class Decision:
    """The outcome of a step: average the data of ``ballot`` over ``ranks``; ``auth`` decided it."""

    auth: Ballot
    ballot: Ballot
    ranks: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"auth": list(self.auth), "ballot": list(self.ballot), "ranks": list(self.ranks)}

    @classmethod
    def from_wire(cls, doc: Any) -> Decision:
        if not isinstance(doc, Mapping):
            raise ProtocolError("decision is not a map")
        return cls(
            parse_ballot(doc.get("auth")), parse_ballot(doc.get("ballot")), parse_ranks(doc.get("ranks"))
        )


def parse_ballot(value: Any) -> Ballot:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ProtocolError("field 'ballot' must be [epoch, rank] with non-negative integers")
    return (int(value[0]), int(value[1]))


def parse_accepted(value: Any) -> Accepted | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ProtocolError("field 'accepted' must be [ballot, view] or null")
    return parse_ballot(value[0]), parse_ranks(value[1])


def parse_ranks(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list | tuple)
        or len(value) > 4096
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ProtocolError("field 'ranks' must be a list of non-negative integers")
    return tuple(sorted(set(value)))


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

    send: Callable[[int, dict[str, Any]], None]
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
        lineage: str = "",
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
        self._ready_extra: dict[str, Any] = {}
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
    def waiting_for_quorum(self) -> bool:
        """True while this rank reaches too few ranks to propose and follows nobody."""
        return self.no_quorum_since is not None and self.proposal is None and self.coordinator == self.me

    def begin(self, extra: Mapping[str, Any] | None = None) -> None:
        """Announce readiness to every peer (``extra`` rides along, e.g. the payload size)."""
        self._ready_extra = {**(extra or {}), "lineage": self.lineage}
        self._announced = self.hooks.clock()
        for rank in sorted(self.peers):
            self._send(rank, "ready", **self._ready_extra)
        self.tick()

    # -- inputs -------------------------------------------------------------------------------
    def handle(self, sender: int, header: Mapping[str, Any]) -> None:
        """Process one message of this step from ``sender`` (ProtocolError if malformed)."""
        if self.finished or sender == self.me:
            return
        kind = header.get("t")
        if kind == "ready":
            lineage = header.get("lineage")
            self._on_ready(sender, lineage if isinstance(lineage, str) else "")
        elif kind == "prepare":
            self._on_prepare(sender, self._ballot_of(sender, header), parse_ranks(header.get("view")))
        elif kind == "promise":
            applied = header.get("applied")
            self._on_promise(
                sender,
                parse_ballot(header.get("ballot")),
                None if applied is None else Decision.from_wire(applied),
                parse_accepted(header.get("accepted")),
            )
        elif kind == "nack":
            self._on_nack(sender, parse_ballot(header.get("ballot")))
        elif kind == "start":
            self._on_start(sender, self._ballot_of(sender, header), parse_ranks(header.get("view")))
        elif kind == "done":
            self._on_done(sender, parse_ballot(header.get("ballot")))
        elif kind == "commit":
            self._on_commit(sender, Decision.from_wire(header.get("decision")))
        elif kind == "suspect":
            theirs = header.get("ballot")
            self._on_suspect(
                parse_ranks(header.get("ranks")), None if theirs is None else parse_ballot(theirs)
            )
        elif kind == "leave":
            self._on_leave(sender)
        elif kind == "ask":
            theirs = header.get("ballot")
            self._on_ask(sender, None if theirs is None else parse_ballot(theirs))
        elif kind == "behind":
            at = header.get("at")
            self.behind(at if isinstance(at, int) and not isinstance(at, bool) else self.step + 1)
        else:
            raise ProtocolError(f"unknown agreement message type {kind!r}"[:120])

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
            self._send(ballot[1], "done", ballot=list(ballot))

    def suspect(self, ranks: set[int]) -> None:
        """Treat ``ranks`` as failed for this step (e.g. they sent data that does not fit)."""
        if self.finished:
            return
        if self.gathering:
            self.suspected |= ranks - {self.me}
        else:
            self._suspect(ranks)

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
                for rank in sorted(self.peers):
                    self._send(rank, "ready", **self._ready_extra)
            return
        if self.gathering:
            if resend:
                for rank in sorted(self.expected - self.ready - self.gave_up):
                    self._send(rank, "ready", **self._ready_extra)
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
                    self._send(rank, "prepare", ballot=list(proposal.ballot), view=list(proposal.view))
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
                    self._send(rank, "start", ballot=list(proposal.ballot), view=list(proposal.view))
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
        candidates = self.ready - self.suspected
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
        view = tuple(sorted(members | {self.me}))
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
                self._send(rank, "prepare", ballot=list(ballot), view=list(view))
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
            log.info("step_carried_over", step=self.step, ballot=list(carried[0]), view=list(carried[1]))
            self._commit(Decision(proposal.ballot, carried[0], carried[1]), skip=None)
            return
        proposal.running = True
        for rank in sorted((self.ready | set(proposal.view)) - {self.me}):
            self._send(rank, "start", ballot=list(proposal.ballot), view=list(proposal.view))
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
            key=lambda a: ballot_key(a[0]),
            default=None,
        )
        if newest is None:
            return None
        ballot, view = newest
        if all((reports.get(r) or ((-1, -1), ()))[0] == ballot for r in proposal.view if r in view):
            return newest
        return None

    def _accept(self, ballot: Ballot) -> None:
        if self.accepted is None or ballot_key(ballot) > ballot_key(self.accepted[0]):
            self.accepted = (ballot, self.view)

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
        wire = decision.to_wire()
        for rank in sorted((self.ready | self.askers | set(self.view) | set(decision.ranks)) - {self.me}):
            if rank != skip:
                self._send(rank, "commit", decision=wire)
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
            self._send(rank, "done", ballot=list(started))
        else:
            self._send(rank, "ask", ballot=None if newest is None else list(newest))

    def _reelect(self) -> None:
        basis = set(self.view) if self.view else set(self.ready)
        candidates = (basis - self.suspected) | {self.me}
        coordinator = min(candidates)
        if coordinator == self.me:
            self._propose(candidates)
            return
        self.coordinator = coordinator
        self.waiting_since = self.hooks.clock()
        newest = self._newest()  # the new coordinator must outbid what we promised the old one
        self._send(
            coordinator,
            "suspect",
            ranks=sorted(self.suspected),
            ballot=None if newest is None else list(newest),
        )

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
            self._send(sender, "start", ballot=list(proposal.ballot), view=list(proposal.view))
        if self.gathering:
            self.tick()
        elif self.waiting_for_quorum:
            self.suspected.discard(sender)  # it is back: try again with it
            self._reelect()

    def _on_prepare(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        if not self._accepts(ballot):
            assert self.promised is not None
            self._send(sender, "nack", ballot=list(self.promised))
            return
        self._adopt_ballot(sender, ballot, view)
        if not self.finished:
            accepted = None if self.accepted is None else [list(self.accepted[0]), list(self.accepted[1])]
            self._send(sender, "promise", ballot=list(ballot), applied=None, accepted=accepted)

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
                self._send(sender, "start", ballot=list(proposal.ballot), view=list(proposal.view))
            elif not proposal.running and sender in proposal.view and sender not in proposal.promises:
                self._send(sender, "prepare", ballot=list(proposal.ballot), view=list(proposal.view))
            return
        newest = self._newest()
        if newest is not None and (theirs is None or ballot_key(newest) > ballot_key(theirs)):
            self._send(sender, "nack", ballot=list(newest))

    def _on_leave(self, sender: int) -> None:
        """``sender`` is out of this step (it left, or it was left out and finished without us)."""
        if sender == self.coordinator and sender in self.suspected and not self.gathering:
            self._reelect()  # we followed it after a nack: it will never drive the step, stop waiting
        else:
            self._on_suspect((sender,))

    def _on_start(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        if not self._accepts(ballot):
            assert self.promised is not None
            self._send(sender, "nack", ballot=list(self.promised))
            return
        if self.promised != ballot or self.coordinator != sender:
            self._adopt_ballot(sender, ballot, view)
        if not self.finished:
            self._start(ballot)

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
    @staticmethod
    def _ballot_of(sender: int, header: Mapping[str, Any]) -> Ballot:
        ballot = parse_ballot(header.get("ballot"))
        if ballot[1] != sender:
            raise ProtocolError(f"rank {sender} sent a ballot proposed by rank {ballot[1]}")
        return ballot

    def _send(self, rank: int, kind: str, **fields: Any) -> None:
        self.hooks.send(rank, {"t": kind, "step": self.step, **fields})


def answer_after(
    decision: Decision, step: int, sender: int, header: Mapping[str, Any]
) -> dict[str, Any] | None:
    """How a rank that already applied ``decision`` answers a late message of that step (or None)."""
    kind = header.get("t")
    if kind == "prepare":
        try:
            ballot = parse_ballot(header.get("ballot"))
        except ProtocolError:
            return None
        return {"t": "promise", "step": step, "ballot": list(ballot), "applied": decision.to_wire()}
    if kind in QUESTIONS:
        return {"t": "commit", "step": step, "decision": decision.to_wire()}
    return None


def answer_behind(step: int, oldest: int, header: Mapping[str, Any]) -> dict[str, Any] | None:
    """How a rank answers a question about a step older than every decision it still remembers."""
    return {"t": "behind", "step": step, "at": oldest} if header.get("t") in QUESTIONS else None


def answer_left(step: int, header: Mapping[str, Any]) -> dict[str, Any] | None:
    """How a rank that left ``step`` (excluded, or gave up) answers a late question of that step."""
    return {"t": "leave", "step": step} if header.get("t") in QUESTIONS else None
