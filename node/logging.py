"""Structured logs: one JSON object per line on stderr, with the process name bound.

Every process calls :func:`configure` once at start; modules call :func:`get_logger`. A redaction
processor (:mod:`node.redact`) masks values whose key names a secret, the values of secret engine flags
in argument lists and passwords in URLs, so a careless ``log.info(..., secret_key=...)`` cannot leak
them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from node.redact import redact_field


def _redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        event[key] = redact_field(key, event[key])
    return event


def configure(process: str, level: str = "info", *, stream: Any = None) -> None:
    """Route structlog and stdlib logging to JSON lines tagged with ``process``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    out = stream if stream is not None else sys.stderr

    def add_process(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", process)  # also on lines from threads without our context
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_process,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    # Libraries (gunicorn, uvicorn, httpx) log through stdlib: render them the same way.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(),
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A structlog logger; ``bound`` values appear on every line it writes."""
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log
