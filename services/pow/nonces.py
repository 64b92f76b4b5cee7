"""Which nonces a compute group evaluates (spec section 6, pow-v2.md §3): the one nonce formula.

Nodes are told apart by ``node_id`` modulo ``node_count`` and groups by the next digit, so the
sequences of all nodes and all groups are disjoint and together leave no gaps, whatever number of
groups each node has. PoC v1 (a stream per compute group) and v2 (batches per engine) both use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class NonceSequence:
    """``nonce_x = node_id + group_id*node_count + x*(n_groups*node_count)`` for x = 0, 1, 2, ..."""

    node_id: int
    node_count: int
    group_id: int
    n_groups: int

    def __post_init__(self) -> None:
        if self.node_count < 1 or self.n_groups < 1 or not 0 <= self.group_id < self.n_groups:
            raise ValueError(f"bad nonce sequence {self}")

    @property
    def stride(self) -> int:
        return self.n_groups * self.node_count

    def at(self, x: int) -> int:
        return self.node_id + self.group_id * self.node_count + x * self.stride

    def index(self, nonce: int) -> int:
        """The ``x`` of ``nonce`` in this sequence (the inverse of :meth:`at`)."""
        return (nonce - self.at(0)) // self.stride

    def batch(self, start: int, size: int) -> list[int]:
        """Nonces number ``start`` … ``start + size - 1`` of the sequence, in order."""
        return [self.at(x) for x in range(start, start + size)]

    def stream(self, start: int = 0) -> Iterator[int]:
        """Nonces number ``start``, ``start + 1``, … without end."""
        return itertools.count(self.at(start), self.stride)


def nonce_sequence(node_id: int, node_count: int, group_id: int, n_groups: int, start_k: int = 0
                   ) -> Iterator[int]:
    """The nonces of :class:`NonceSequence` from number ``start_k`` on, each argument checked by name."""
    if node_count < 1:
        raise ValueError(f"node_count must be >= 1, got {node_count}")
    if node_id < 0:
        raise ValueError(f"node_id must be >= 0, got {node_id}")
    if n_groups < 1 or not 0 <= group_id < n_groups:
        raise ValueError(f"group_id must be in [0, n_groups), got group_id={group_id} n_groups={n_groups}")
    if start_k < 0:
        raise ValueError(f"start_k must be >= 0, got {start_k}")
    return NonceSequence(node_id, node_count, group_id, n_groups).stream(start_k)
