"""Make ``tests.support`` importable however pytest is invoked, and keep what shares a fixture together
when ``make test`` spreads the tiers over workers (pytest-xdist)."""

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
#: The vLLM tier's modules share one served engine (a session fixture that takes a minute to boot).
SHARED_ACROSS_MODULES = "tests/vllm/"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``make test``): one worker runs a whole module, so its module-scoped node boots
    once, and one worker the whole vLLM tier; units go out in command-line order (the longest tier
    first). xdist's own ``loadgroup`` cannot say this on pytest 9.2, which ignores the node ids it
    rewrites."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_ACROSS_MODULES if module.startswith(SHARED_ACROSS_MODULES) else module

    config.option.loadscopereorder = False
    return ByModule(config, log)


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
