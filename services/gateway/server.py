"""The gateway process: gunicorn with uvicorn workers serving :mod:`services.gateway.app`.

Why this stack: proxied completions stream for minutes. An ASGI worker holds each stream as a
coroutine, not a thread, so hundreds of streams cost memory, not threads; several gunicorn workers use
every core and survive one another's crashes, and the gunicorn master restarts a dead worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from node.config import Settings
from node.logging import get_logger
from node.process import bootstrap, die_with_parent
from services.gateway.app import create_app
from services.gateway.metrics import reset_multiprocess_dir

log = get_logger(__name__)

#: The answer to a client whose request head did not arrive in time (then the connection closes).
_HEAD_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                        b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus two deadlines of the edge, both per connection.

    * The request head (slowloris): uvicorn arms no timer before a connection's first request, nor while
      a head trickles in, so a client that never finishes its headers would hold a connection forever.
      Here it must be complete within ``head_timeout_s`` (``MLNODE_HEADER_TIMEOUT``), else the client
      gets a 408 and the connection closes. Bodies are the edge's (:mod:`.edge`).
    * Reading the response: a client that takes none of a response's bytes for ``send_timeout_s``
      (``MLNODE_SEND_TIMEOUT``) while the socket is full is dropped, so a stalled stream frees its engine
      slot (the proxy cancels the engine request when the client is gone). Streams that merely wait for
      the engine are not affected: only a full send buffer starts the clock.
    """

    head_timeout_s = 15.0
    send_timeout_s = 300.0
    _head_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        cycle = getattr(self, "cycle", None)
        if cycle is None or cycle.response_complete:  # nothing else is being answered on it
            body = b'{"detail": "request head not received within %g s"}' % self.head_timeout_s
            self.transport.write(_HEAD_TIMEOUT_ANSWER % (len(body), body))
        self.transport.close()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        log.warning("client_stalled", reason=f"took no response bytes for {self.send_timeout_s:g} s")
        self.transport.abort()  # close() would wait for the buffer the client never reads


class GatewayWorker(UvicornWorker):
    """uvicorn on uvloop + httptools (with the edge's deadlines), no per-request access log.

    A worker dies with its master: after a ``kill -9`` of the master, orphaned workers would go on
    serving old code on the inherited listening sockets, so the master supervisord starts next could
    never bind, and ``mlnode down`` (which signals the new master's group) would leave them running.
    """

    CONFIG_KWARGS = {"loop": "uvloop", "http": EdgeProtocol, "access_log": False, "lifespan": "on"}

    def init_process(self) -> None:
        _signal_me_when_parent_dies(signal.SIGTERM)
        if os.getppid() != self.ppid:  # the master died before the kernel was told
            raise SystemExit(0)
        super().init_process()


def _signal_me_when_parent_dies(sig: signal.Signals) -> None:
    """Die with the master where the kernel can arrange it; elsewhere gunicorn's own checks remain."""
    errno = die_with_parent(sig)
    if errno > 0:
        log.warning("gateway_pdeathsig_unavailable", errno=errno)


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
        # Set before gunicorn forks the workers, which inherit them.
        EdgeProtocol.head_timeout_s = settings.header_timeout_s
        EdgeProtocol.send_timeout_s = settings.send_timeout_s
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
    reset_multiprocess_dir()  # before any worker records: timings start at zero with the gateway
    Gateway(settings).run()
