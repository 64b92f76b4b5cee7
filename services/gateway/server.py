"""The gateway process: gunicorn with uvicorn workers serving :mod:`services.gateway.app`.

Why this stack: proxied completions stream for minutes. An ASGI worker holds each stream as a
coroutine, not a thread, so hundreds of streams cost memory, not threads; several gunicorn workers use
every core and survive one another's crashes, and the gunicorn master restarts a dead worker.
"""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from uvicorn_worker import UvicornWorker

from node.config import Settings
from node.process import bootstrap
from services.gateway.app import create_app


class GatewayWorker(UvicornWorker):
    """uvicorn on uvloop + httptools, no per-request access log (the proxy is a hot path)."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools", "access_log": False, "lifespan": "on"}


class JsonLogger(Logger):
    """Route gunicorn's own log lines through the node's JSON logging."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        root_handlers = logging.getLogger().handlers
        for log in (self.error_log, self.access_log):
            log.handlers = list(root_handlers)
            log.propagate = False


class Gateway(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": [f"{s.api_host}:{s.api_port}", f"{s.api_host}:{s.inference_port}"],
            "workers": s.gateway_workers,
            "worker_class": "services.gateway.server.GatewayWorker",
            "logger_class": "services.gateway.server.JsonLogger",
            "loglevel": s.log_level,
            "proc_name": "mlnode-gateway",
            "timeout": 60,
            "graceful_timeout": 10,
            "keepalive": 75,
            "backlog": 2048,
            "accesslog": None,
        }
        # gunicorn >= 25.1 opens a control socket, by default in $HOME: keep it in this node's run dir
        # so that two nodes on one machine never share it.
        options["control_socket"] = str(s.run_dir / "gunicorn.ctl")
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.settings)


def main() -> None:
    settings, _keys = bootstrap("gateway")
    Gateway(settings).run()
