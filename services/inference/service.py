"""The `inference` process: inference engines, served on the local bus."""

from __future__ import annotations

import asyncio
from typing import Any

from bus.service import Service
from node.process import bootstrap


class InferenceService(Service):
    name = "inference"
    mode = "INFERENCE"

    async def status(self) -> dict[str, Any]:
        return {"state": "STOPPED"}


def main() -> None:
    settings, keys = bootstrap("inference")
    asyncio.run(InferenceService(settings, keys).run())
