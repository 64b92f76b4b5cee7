"""The `pow` process: Proof of Compute, served on the local bus."""

from __future__ import annotations

import asyncio
from typing import Any

from bus.service import Service
from node.process import bootstrap


class PowService(Service):
    name = "pow"
    mode = "POW"

    async def status(self) -> dict[str, Any]:
        return {"state": "STOPPED"}


def main() -> None:
    settings, keys = bootstrap("pow")
    asyncio.run(PowService(settings, keys).run())
