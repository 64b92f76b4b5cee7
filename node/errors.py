"""The one exception tree of MLNode.

Every failure a caller can act on is an :class:`MLNodeError`. Each subclass carries a ``kind``: a
transport-neutral category that travels over the bus unchanged and that the gateway (the only part
that knows HTTP) maps to a status code. Code below the gateway raises these and never picks a status.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MLNodeError(Exception):
    """Base of every error MLNode raises on purpose."""

    kind: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """A msgpack/JSON-safe description, rebuilt on the other side by :func:`from_wire`."""
        return {"kind": self.kind, "message": self.message, "details": self.details}


class InvalidRequest(MLNodeError):
    """The caller sent something we cannot act on (bad body, wrong type, wrong phase)."""

    kind = "invalid"


class TooLarge(InvalidRequest):
    """A body larger than the edge (or the bus behind it) carries."""

    kind = "too_large"


class RequestTimeout(InvalidRequest):
    """The client did not send its request (head or body) within the edge's deadline."""

    kind = "request_timeout"


class Forbidden(InvalidRequest):
    """A request the node refuses whatever it says (a cross-site browser request)."""

    kind = "forbidden"


class UnsupportedMediaType(InvalidRequest):
    """A body type the API never takes (a browser form or plain text: cross-site requests)."""

    kind = "unsupported_media"


class Unprocessable(InvalidRequest):
    """A well-formed body whose content a contract refuses where the API answers 422 (PoC v2 params)."""

    kind = "unprocessable"


class NotFound(MLNodeError):
    """The thing asked for does not exist."""

    kind = "not_found"


class Conflict(MLNodeError):
    """Another job holds the node, or the request races a change already under way."""

    kind = "conflict"


class Unavailable(MLNodeError):
    """A dependency (a service, an engine, the disk) cannot serve right now; retrying may help."""

    kind = "unavailable"


class Overloaded(Unavailable):
    """A queue is full; the caller should send less or come back later."""

    kind = "overloaded"


class UpstreamFailed(MLNodeError):
    """Every engine we fanned a request out to failed; ``details["detail"]`` says how, per engine."""

    kind = "upstream"


class Unreachable(Unavailable):
    """The service or peer could not be reached at all (no connection): nothing was asked of it."""

    kind = "unreachable"


class DeadlineExceeded(Unavailable):
    """A bus request got no answer before its deadline."""

    kind = "timeout"


class ConfigError(MLNodeError):
    """A setting is missing or malformed; the process cannot start."""

    kind = "config"


class KeyFileError(ConfigError):
    """A key file is missing, unreadable, corrupt or too open."""

    kind = "key_file"


class ProtocolError(MLNodeError):
    """A peer sent a frame that does not follow the bus protocol."""

    kind = "protocol"


_BY_KIND: dict[str, type[MLNodeError]] = {
    cls.kind: cls
    for cls in (
        MLNodeError,
        InvalidRequest,
        TooLarge,
        RequestTimeout,
        Forbidden,
        UnsupportedMediaType,
        Unprocessable,
        NotFound,
        Conflict,
        Unavailable,
        Overloaded,
        Unreachable,
        UpstreamFailed,
        DeadlineExceeded,
        ConfigError,
        KeyFileError,
        ProtocolError,
    )
}


def from_wire(data: Any) -> MLNodeError:
    """Rebuild an error sent by :meth:`MLNodeError.to_wire`; anything malformed becomes a base error."""
    if not isinstance(data, dict):
        return MLNodeError(f"malformed error: {data!r}"[:200])
    cls = _BY_KIND.get(str(data.get("kind")), MLNodeError)
    details = data.get("details")
    err = cls(str(data.get("message", "")), **(details if isinstance(details, dict) else {}))
    return err
