"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.receiver import Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """A real HTTP server standing in for the Network Node's callback endpoints, one per test module."""
    r = Receiver()
    yield r
    r.close()
