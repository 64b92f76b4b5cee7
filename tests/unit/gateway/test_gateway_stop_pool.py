"""A stop is served by its own threads: neither starts queued on the mode lock nor a busy default pool
can hold it (about fifty racing ``up``s used to fill the shared pool until a stop missed its 2 s)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from node import config
from node.identity import ensure_node_keys
from node.mode import ModeStore
from services.gateway.services import Services


def test_a_stop_answers_while_starts_and_the_default_pool_are_stuck(tmp_path: Path) -> None:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path), "MLNODE_BUS_TIMEOUT": "1"})
    config.ensure_dirs(settings)
    ensure_node_keys(settings.keys_dir)
    modes = ModeStore(settings.state_dir)
    modes.write("INFERENCE")
    held = modes.acquire()  # a start that holds the node's mode lock and does not let go
    release = threading.Event()

    async def scenario() -> dict[str, str]:
        services = Services(settings)
        loop = asyncio.get_running_loop()
        try:
            # Every thread of the default pool busy, fifty starts waiting for the mode lock.
            busy = [loop.run_in_executor(None, release.wait) for _ in range(64)]
            starts = [asyncio.ensure_future(services.exclusive(lambda: asyncio.sleep(0))) for _ in range(50)]
            await asyncio.sleep(0)
            # No service runs here: the stop still answers, reports who did not confirm, and drops the
            # claim -- without the lock it could not get.
            errors = await asyncio.wait_for(services.stop_all(), 30)
            assert not any(s.done() for s in starts)  # they still wait for the lock
            release.set()
            ModeStore.release(held)
            await asyncio.gather(*starts, *busy)
            return errors
        finally:
            release.set()
            services.close()

    try:
        errors = asyncio.run(scenario())
    finally:
        release.set()
    assert set(errors) == {"pow", "inference", "train"}
    assert modes.read() == "STOPPED"
