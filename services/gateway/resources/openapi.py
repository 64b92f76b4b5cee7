"""``GET /api/v1/openapi.json``: the management API's OpenAPI document (see :mod:`..openapi`)."""

from __future__ import annotations

import falcon.asgi

from node import __version__
from services.gateway.openapi import document


class OpenApi:
    def __init__(self, version_tag: str = "") -> None:
        self.version = version_tag or __version__

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = document(self.version)
