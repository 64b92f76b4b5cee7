"""Faults only a peer itself can commit: the group drops such a peer for the rest of the run.

A chunk that does not fit this rank's grid, or a chunk from outside the view, may be no fault of its
sender (a coordinator that told two members different views makes both send what the other cannot
use), so those only make the sender suspected for the step. A message that does not decode, claims
another rank, names a rank outside the world, or carries a non-finite value — or a state that is not
this run's — can only come from a sender that breaks the protocol, whatever anyone else did: honest
ranks check their own values before they send them.
"""

from __future__ import annotations

from collections.abc import Iterable

from node.errors import ProtocolError


class PeerFault(ProtocolError):
    """``ranks`` broke the protocol (see the module doc): they are dropped and the reason logged."""

    def __init__(self, message: str, ranks: Iterable[int]) -> None:
        super().__init__(message)
        self.ranks = frozenset(ranks)
