"""The `train` process: DiLoCo training, served on the local bus."""

from __future__ import annotations

import asyncio
from typing import Any

from bus.service import Service
from node.process import bootstrap


class TrainService(Service):
    name = "train"
    mode = "TRAIN"

    async def status(self) -> dict[str, Any]:
        return {"state": "STOPPED"}


def main() -> None:
    settings, keys = bootstrap("train")
    asyncio.run(TrainService(settings, keys).run())
