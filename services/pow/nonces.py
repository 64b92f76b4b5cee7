"""Which nonces a compute group evaluates (spec section 6).

Nodes are told apart by ``node_id`` modulo ``node_count`` and groups by the next digit, so the
sequences of all nodes and all groups are disjoint and together leave no gaps, whatever number of
groups each node has.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator


def nonce_sequence(node_id: int, node_count: int, group_id: int, n_groups: int, start_k: int = 0
                   ) -> Iterator[int]:
    """``node_id + group_id*node_count + k*(n_groups*node_count)`` for k = start_k, start_k+1, ..."""
    if node_count < 1:
        raise ValueError(f"node_count must be >= 1, got {node_count}")
    if node_id < 0:
        raise ValueError(f"node_id must be >= 0, got {node_id}")
    if n_groups < 1 or not 0 <= group_id < n_groups:
        raise ValueError(f"group_id must be in [0, n_groups), got group_id={group_id} n_groups={n_groups}")
    if start_k < 0:
        raise ValueError(f"start_k must be >= 0, got {start_k}")
    return itertools.count(node_id + group_id * node_count + start_k * n_groups * node_count,
                           n_groups * node_count)
