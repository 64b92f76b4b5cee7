"""Agreeing on who takes part in one collective step, so every survivor averages the same set of ranks.

Peers fail by going quiet, so the only failure detector is a timeout, and two nodes may time out on
different peers. To keep every survivor's result bit-identical, one coordinator (the lowest rank that
is alive) decides, and a small ballot protocol makes that decision safe when coordinators change:

1. **gather** — each rank announces ``ready`` and waits (bounded) for the ranks it expects.
2. **prepare/promise** — the coordinator proposes ballot ``(epoch, rank)`` with a view (the ranks it
   heard from); members promise to ignore older ballots. A member that already applied a decision
   for this step says so in its promise, and the new coordinator re-issues that decision instead.
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

Limits, by design: failure detection is by timeout, so a rank that is merely slow beyond ``timeout``
is treated as failed (it then resynchronises); a partition lets each side go on, and when it heals the
lower-ranked coordinator's lineage wins and the others resynchronise rather than mix states.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.errors import ProtocolError
from node.logging import get_logger

log = get_logger(__name__)

Ballot = tuple[int, int]
"""``(epoch, proposer rank)``; compared by :func:`ballot_key`."""

MESSAGE_TYPES = ("ready", "prepare", "promise", "nack", "start", "done", "commit", "suspect", "leave")


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
    ) -> None:
        self.step = step
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
        self.started: Ballot | None = None
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
            )
        elif kind == "nack":
            self._on_nack(parse_ballot(header.get("ballot")))
        elif kind == "start":
            self._on_start(sender, self._ballot_of(sender, header), parse_ranks(header.get("view")))
        elif kind == "done":
            self._on_done(sender, parse_ballot(header.get("ballot")))
        elif kind == "commit":
            self._on_commit(sender, Decision.from_wire(header.get("decision")))
        elif kind == "suspect":
            self._on_suspect(parse_ranks(header.get("ranks")))
        elif kind == "leave":
            self._on_suspect((sender,))
        else:
            raise ProtocolError(f"unknown agreement message type {kind!r}"[:120])

    def data_complete(self, ballot: Ballot) -> None:
        """The data plane holds the full result of ``ballot``."""
        self.completed.add(ballot)
        if self.finished or self.started != ballot:
            return
        proposal = self.proposal
        if proposal is not None and proposal.ballot == ballot and proposal.running:
            proposal.dones.add(self.me)
            self._check_dones()
        elif self.coordinator is not None:
            self._send(self.coordinator, "done", ballot=list(ballot))

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
            quiet = {
                r
                for r in proposal.view
                if r not in proposal.dones and self.hooks.silent_for(r) > self.timeout
            }
            quiet |= {r for r in self.hooks.waiting_on() if self.hooks.silent_for(r) > self.timeout}
            if quiet:
                self._suspect(quiet)
            elif resend:
                for rank in sorted(set(proposal.view) - proposal.dones - {self.me}):
                    self._send(rank, "start", ballot=list(proposal.ballot), view=list(proposal.view))
            return
        if self.started is not None and self.started not in self.completed:
            quiet = {r for r in self.hooks.waiting_on() if self.hooks.silent_for(r) > self.timeout}
            if quiet:
                self._suspect(quiet)
                return
        coordinator = self.coordinator
        if coordinator is not None and coordinator != self.me:
            stuck = self.started is None and now - self.waiting_since > self.timeout + self.join_timeout
            if self.hooks.silent_for(coordinator) > self.timeout or stuck:
                self._suspect({coordinator})
            elif resend and self.started is not None and self.started in self.completed:
                self._send(coordinator, "done", ballot=list(self.started))

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
        self.max_epoch += 1
        ballot = (self.max_epoch, self.me)
        view = tuple(sorted(members | {self.me}))
        self.promised, self.view, self.coordinator = ballot, view, self.me
        self.proposal = _Proposal(ballot, view, self.hooks.clock(), promises={self.me})
        log.info("step_proposed", step=self.step, ballot=list(ballot), view=list(view))
        for rank in view:
            if rank != self.me:
                self._send(rank, "prepare", ballot=list(ballot), view=list(view))
        self._check_promises()

    def _check_promises(self) -> None:
        proposal = self.proposal
        if proposal is None or proposal.running or not set(proposal.view) <= proposal.promises:
            return
        if proposal.adopted is not None:
            adopted = proposal.adopted
            self._commit(Decision(proposal.ballot, adopted.ballot, adopted.ranks), skip=None)
            return
        proposal.running = True
        for rank in sorted((self.ready | set(proposal.view)) - {self.me}):
            self._send(rank, "start", ballot=list(proposal.ballot), view=list(proposal.view))
        self._start(proposal.ballot)

    def _start(self, ballot: Ballot) -> None:
        if self.started == ballot:
            return
        self.started = ballot
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
        for rank in sorted((self.ready | set(self.view) | set(decision.ranks)) - {self.me}):
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

    def _reelect(self) -> None:
        basis = set(self.view) if self.view else set(self.ready)
        candidates = (basis - self.suspected) | {self.me}
        coordinator = min(candidates)
        if coordinator == self.me:
            self._propose(candidates)
            return
        self.coordinator = coordinator
        self.waiting_since = self.hooks.clock()
        self._send(coordinator, "suspect", ranks=sorted(self.suspected))

    # -- message handlers ---------------------------------------------------------------------
    def _accepts(self, ballot: Ballot) -> bool:
        return self.promised is None or ballot_key(ballot) >= ballot_key(self.promised)

    def _adopt_ballot(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        self.promised = ballot
        self.max_epoch = max(self.max_epoch, ballot[0])
        self.view = view
        self.coordinator = sender
        self.gathering = False
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

    def _on_prepare(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        if not self._accepts(ballot):
            assert self.promised is not None
            self._send(sender, "nack", ballot=list(self.promised))
            return
        self._adopt_ballot(sender, ballot, view)
        if not self.finished:
            self._send(sender, "promise", ballot=list(ballot), applied=None)

    def _on_promise(self, sender: int, ballot: Ballot, applied: Decision | None) -> None:
        proposal = self.proposal
        if proposal is None or proposal.ballot != ballot or proposal.running:
            return
        proposal.promises.add(sender)
        if applied is not None and (
            proposal.adopted is None or ballot_key(applied.auth) > ballot_key(proposal.adopted.auth)
        ):
            proposal.adopted = applied
        self._check_promises()

    def _on_nack(self, ballot: Ballot) -> None:
        proposal = self.proposal
        if proposal is None or proposal.running or ballot_key(ballot) <= ballot_key(proposal.ballot):
            return
        self.max_epoch = max(self.max_epoch, ballot[0])
        self.proposal = None
        self.coordinator = ballot[1]
        self.waiting_since = self.hooks.clock()

    def _on_start(self, sender: int, ballot: Ballot, view: tuple[int, ...]) -> None:
        if not self._accepts(ballot):
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

    def _on_commit(self, sender: int, decision: Decision) -> None:
        if not self._accepts(decision.auth):
            return
        self._commit(decision, skip=sender)

    def _on_suspect(self, ranks: Sequence[int]) -> None:
        new = set(ranks) - self.suspected - {self.me}
        if not new:
            return
        self.suspected |= new
        if not self.gathering:
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
    if kind in ("ready", "start", "done", "suspect"):
        return {"t": "commit", "step": step, "decision": decision.to_wire()}
    return None
