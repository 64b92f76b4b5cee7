"""The node-local bus has endpoints for exactly the services in ``node.registry``."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.local import events_endpoint, rpc_endpoint
from node import config, registry


def test_every_registered_service_has_its_endpoints_and_nothing_else_does(tmp_path: Path) -> None:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path)})
    for name in registry.NAMES:
        assert rpc_endpoint(settings, name) == f"ipc://{settings.run_dir}/{name}.rpc"
        assert events_endpoint(settings, name) == f"ipc://{settings.run_dir}/{name}.events"
    for stranger in ("gateway", "powv2", ""):
        with pytest.raises(ValueError, match=r"not a service in node\.registry"):
            rpc_endpoint(settings, stranger)
