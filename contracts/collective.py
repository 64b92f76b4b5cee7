"""The training collective's peer messages: everything one rank of a run sends another, typed once.

A registered peer is still untrusted input. Each message is one msgpack map tagged by ``t`` inside a
peer-link frame (:mod:`bus.peers`); the receiving group decodes it once, at the edge, into one of these
Structs — strictly: an unknown field, a wrong type or a value outside a bound below is refused — and
then checks the two things only it knows: the sender's rank (``r``) is the one the registry gives its
key, and every rank the message names (:meth:`Message.ranks`) is below its world size. Rules a message
can check alone are its ``__post_init__``: views and rank lists are sorted and free of repeats, and a
ballot in a ``prepare`` or ``start`` is the sender's own (a rank proposes only for itself).

No torch here: tensors travel as raw frames next to these headers, and dtypes by name.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Annotated, Literal

import msgspec

from contracts.fields import Count
from contracts.train import MAX_WORLD

#: A rank of the run.
Rank = Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD)]
#: Outer steps and ballot epochs: non-negative and exact as a float64 (no run gets near).
Step = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Ballot = tuple[Step, Rank]
"""``(epoch, proposer rank)``."""
#: A set of ranks on the wire: sorted, no repeats (checked by the messages that carry one).
Ranks = Annotated[tuple[Rank, ...], msgspec.Meta(max_length=MAX_WORLD)]
#: Digest of the decisions a rank's state went through (``genesis`` before the first).
Lineage = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Compression = Literal["none", "fp16", "int8"]
#: Dtypes a tensor of a state transfer may have (the collective maps the names to torch's).
DtypeName = Literal["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                    "uint8", "bool"]
Size = Annotated[int, msgspec.Meta(ge=0, lt=1 << 40)]
#: Index of a chunk, a shard or a tensor within one transfer.
Index = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
MAX_STATE_TENSORS = 1 << 16
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 64 << 20


def _set_of_ranks(ranks: Iterable[int], what: str) -> None:
    if any(a >= b for a, b in itertools.pairwise(ranks)):
        raise ValueError(f"{what} must list ranks in ascending order without repeats")


class Message(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, kw_only=True):
    """Every peer message names its sender's rank ``r``; the receiver checks it against the registry."""

    r: Rank

    def ranks(self) -> Iterator[int]:
        """Every rank this message names besides its sender (each must be below the world size)."""
        return iter(())


class Heartbeat(Message, tag="hb"):
    """Alive: sent every ``timeout / 4``; silence for ``timeout`` is what drops a peer from a step."""


class StepMessage(Message, kw_only=True):
    """A message about one outer step."""

    step: Step


class Facts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What must match between ranks for their payloads to be reduced together."""

    #: Elements of the flat float32 payload.
    n: Count
    #: ``train_config.diloco.compression``.
    c: Compression


class Decision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The outcome of a step: average the data of ``ballot`` over ``ranks``; ``auth`` decided it."""

    auth: Ballot
    ballot: Ballot
    ranks: Annotated[Ranks, msgspec.Meta(min_length=1)]

    def __post_init__(self) -> None:
        _set_of_ranks(self.ranks, "a decision")

    def named(self) -> Iterator[int]:
        yield self.auth[1]
        yield self.ballot[1]
        yield from self.ranks


class Accepted(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ballot a rank reported ``done`` for, with that ballot's view."""

    ballot: Ballot
    view: Ranks

    def __post_init__(self) -> None:
        _set_of_ranks(self.view, "a view")


# -- the step agreement (services/train/collective/agreement.py) -----------------------------------


class Ready(StepMessage, tag="ready"):
    """The sender reached the step: its lineage and what its payload is."""

    lineage: Lineage
    facts: Facts


class Refuse(StepMessage, tag="refuse"):
    """The sender's payload facts differ from the receiver's: their payloads cannot be averaged."""

    facts: Facts


class _Proposal(StepMessage, kw_only=True):
    ballot: Ballot
    view: Ranks

    def __post_init__(self) -> None:
        if self.ballot[1] != self.r:
            raise ValueError(f"rank {self.r} sent a ballot proposed by rank {self.ballot[1]}")
        _set_of_ranks(self.view, "a view")
        if self.r not in self.view:
            raise ValueError("a proposer's view must include the proposer")

    def ranks(self) -> Iterator[int]:
        return iter(self.view)


class Prepare(_Proposal, tag="prepare"):
    """A coordinator proposes its ballot with this view; members promise to ignore older ballots."""


class Start(_Proposal, tag="start"):
    """Every member promised: exchange the data of this ballot."""


class Promise(StepMessage, tag="promise"):
    """The answer to ``prepare``: the decision the sender already applied, or the newest ballot it
    reported done for."""

    ballot: Ballot
    applied: Decision | None = None
    accepted: Accepted | None = None

    def ranks(self) -> Iterator[int]:
        yield self.ballot[1]
        if self.applied is not None:
            yield from self.applied.named()
        if self.accepted is not None:
            yield self.accepted.ballot[1]
            yield from self.accepted.view


class _AboutBallot(StepMessage, kw_only=True):
    ballot: Ballot

    def ranks(self) -> Iterator[int]:
        yield self.ballot[1]


class Nack(_AboutBallot, tag="nack"):
    """The sender follows a newer ballot than the one it was asked about."""


class Done(_AboutBallot, tag="done"):
    """The sender holds the full result of the ballot."""


class Commit(StepMessage, tag="commit"):
    """The step is decided (sent by its coordinator, forwarded by every member)."""

    decision: Decision

    def ranks(self) -> Iterator[int]:
        return self.decision.named()


class Suspect(StepMessage, tag="suspect"):
    """The sender gave up on ``ranks``; ``ballot`` is the newest it promised (the receiver outbids it)."""

    suspects: Ranks
    ballot: Ballot | None = None

    def __post_init__(self) -> None:
        _set_of_ranks(self.suspects, "suspects")

    def ranks(self) -> Iterator[int]:
        yield from self.suspects
        if self.ballot is not None:
            yield self.ballot[1]


class Leave(StepMessage, tag="leave"):
    """The sender is out of this step."""


class Ask(StepMessage, tag="ask"):
    """Where does the step stand? ``ballot``: the newest the sender knows of."""

    ballot: Ballot | None = None

    def ranks(self) -> Iterator[int]:
        if self.ballot is not None:
            yield self.ballot[1]


class Behind(StepMessage, tag="behind"):
    """The group is past this step: the sender remembers decisions from step ``at`` on only."""

    at: Step


# -- around the steps (services/train/collective/group.py) -----------------------------------------


class Rejoin(StepMessage, tag="rejoin"):
    """The sender loaded a peer's state and takes part again from ``step``."""


class Chunk(StepMessage, tag="chunk"):
    """One chunk of an all-reduce; its payload is the next frame (wire form of the run's codec).

    ``rs`` (reduce-scatter) carries the sender's contribution to the shard's owner, ``ag``
    (all-gather) the owner's mean. The receiver checks the chunk against its own grid for the ballot.
    """

    ballot: Ballot
    phase: Literal["rs", "ag"] = msgspec.field(name="ph")
    shard: Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD)]
    chunk: Index

    def ranks(self) -> Iterator[int]:
        yield self.ballot[1]


# -- state transfer (services/train/collective/state.py) -------------------------------------------


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """One tensor of a state: what the fetcher must expect before it allocates a byte."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    dtype: DtypeName
    shape: Annotated[tuple[Size, ...], msgspec.Meta(max_length=16)]


class StateRequest(Message, tag="state_req"):
    """Send me your published state (request ``id``)."""

    id: RequestId


class StateHeader(Message, tag="state_hdr"):
    """The state that follows, tensor by tensor in ``chunk_bytes`` chunks: the fetcher compares
    ``tensors`` with its own model before it allocates anything."""

    id: RequestId
    outer_step: Step
    inner_step: Count
    lineage: Lineage
    tensors: Annotated[tuple[TensorSpec, ...], msgspec.Meta(max_length=MAX_STATE_TENSORS)]
    chunk_bytes: Annotated[int, msgspec.Meta(ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES, multiple_of=8)]


class StateChunk(Message, tag="state_chunk"):
    """Chunk ``chunk`` of tensor ``tensor``; its payload is the next frame."""

    id: RequestId
    tensor: Index
    chunk: Index


class StateEnd(Message, tag="state_end"):
    """Every chunk was sent."""

    id: RequestId


class StateError(Message, tag="state_err"):
    """No state to give (none published yet)."""

    id: RequestId
    reason: Annotated[str, msgspec.Meta(max_length=200)]


AgreementMessage = Ready | Prepare | Start | Promise | Nack | Done | Commit | Suspect | Leave | Ask | Behind
StateMessage = StateRequest | StateHeader | StateChunk | StateEnd | StateError
#: Every message a rank may receive.
AnyMessage = Heartbeat | AgreementMessage | Refuse | Rejoin | Chunk | StateMessage
#: What a rank waiting on a peer sends it; a rank done with the step still answers these.
QUESTIONS = (Ready, Prepare, Start, Done, Suspect, Ask)
