"""Nonce assignment: nodes and groups never overlap and together leave no gaps (spec section 6)."""

from __future__ import annotations

import itertools

import pytest

from services.pow.nonces import nonce_sequence


def _take(node_id: int, node_count: int, group_id: int, n_groups: int, upto: int, start_k: int = 0
          ) -> list[int]:
    return list(itertools.takewhile(lambda n: n < upto,
                                    nonce_sequence(node_id, node_count, group_id, n_groups, start_k)))


@pytest.mark.parametrize(("node_count", "groups_per_node"), [(1, [1]), (3, [4, 4, 4]), (4, [1, 8, 3, 2])])
def test_nodes_and_groups_cover_every_nonce_exactly_once(node_count: int, groups_per_node: list[int]) -> None:
    upto = 5000
    seen: list[int] = []
    for node_id, n_groups in enumerate(groups_per_node):
        for group_id in range(n_groups):
            seen.extend(_take(node_id, node_count, group_id, n_groups, upto))
    assert sorted(seen) == list(range(upto))


def test_formula_and_resuming_from_k() -> None:
    seq = nonce_sequence(node_id=1, node_count=2, group_id=1, n_groups=3)
    assert list(itertools.islice(seq, 4)) == [3, 9, 15, 21]
    resumed = nonce_sequence(node_id=1, node_count=2, group_id=1, n_groups=3, start_k=2)
    assert list(itertools.islice(resumed, 2)) == [15, 21]


def test_node_ids_from_one_are_fine() -> None:
    """The network numbers nodes from 1 and may send node_id >= node_count."""
    assert list(itertools.islice(nonce_sequence(2, 2, 0, 1), 3)) == [2, 4, 6]
    assert sorted(_take(1, 2, 0, 1, 100) + _take(2, 2, 0, 1, 100)) == list(range(1, 100))


@pytest.mark.parametrize(
    "args",
    [(0, 0, 0, 1), (-1, 2, 0, 1), (0, 2, 1, 1), (0, 2, -1, 2), (0, 2, 0, 0), (0, 2, 0, 1, -1)],
)
def test_invalid_arguments(args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        nonce_sequence(*args)
