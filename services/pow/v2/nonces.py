"""Which nonces an engine computes (pow-v2.md §3): a dense sequence per (node, group)."""

from __future__ import annotations

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

    def at(self, x: int) -> int:
        return self.node_id + self.group_id * self.node_count + x * (self.n_groups * self.node_count)

    def batch(self, start: int, size: int) -> list[int]:
        """Nonces number ``start`` … ``start + size - 1`` of the sequence, in order."""
        return [self.at(x) for x in range(start, start + size)]
