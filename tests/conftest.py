"""Make ``tests.support`` importable however pytest is invoked."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _autograd_state_is_left_as_found() -> Iterator[None]:
    """A test that switches autograd off for its thread (``torch.set_grad_enabled(False)`` outside a
    ``with``) breaks every later training test in the same process; fail at the test that leaks it."""
    torch = sys.modules.get("torch")
    before = torch.is_grad_enabled() if torch is not None else True
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        assert torch.is_grad_enabled() == before, "this test left autograd switched off in its thread"
