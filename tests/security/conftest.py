"""The security suite: each attack on a real node (supervisord, the four programs, real sockets), and the
refusal asserted.

Most attacks need nothing but a node with the settings it ships with: :func:`strict_node` is that node,
shared by every module of the suite that uses it (one boot). A module that needs other settings (the
load test's small limits, the secrets test's operator allowances) starts its own, once per module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node import Node


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def strict(root: Path, **env: str) -> Node:
    """A node as shipped: in particular callbacks to loopback are refused (the tests' own helper allows
    them, because their receivers listen there)."""
    return Node(root, MLNODE_CALLBACK_ALLOW_LOOPBACK="false", **env)


@pytest.fixture(scope="session")
def strict_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = strict(tmp_path_factory.mktemp("security")).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def stopped(strict_node: Node) -> Node:
    """The strict node with nothing running (an earlier test may have left an engine serving)."""
    assert strict_node.api("POST", "/api/v1/stop").status == 200
    return strict_node
