"""The bus envelope: a versioned msgpack map ``{v, type, id, payload, deadline?, error?}``.

Decoding is defensive: anything that is not a well-formed envelope of a version we speak raises
:class:`~node.errors.ProtocolError`, which receivers log and drop — a malformed frame never kills a
process. Sizes are bounded twice: by ``MAXMSGSIZE`` on the socket and by msgpack's own limits here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from node.errors import MLNodeError, ProtocolError, from_wire

VERSION = 1
#: Default per-message limit for control traffic; bulk links (peer tensors) set their own.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass
class Envelope:
    """One bus message. ``deadline`` is an absolute UNIX time after which nobody wants the answer."""

    type: str
    payload: Any = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deadline: float | None = None
    error: dict[str, Any] | None = None
    v: int = VERSION

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) > self.deadline

    def reply(self, payload: Any) -> Envelope:
        return Envelope(type="reply", payload=payload, id=self.id)

    def fail(self, error: MLNodeError) -> Envelope:
        return Envelope(type="error", id=self.id, error=error.to_wire())

    def raise_for_error(self) -> Any:
        """The payload of a reply, or the error it carries re-raised as the original kind."""
        if self.type == "error":
            raise from_wire(self.error)
        return self.payload


def encode(env: Envelope) -> bytes:
    doc: dict[str, Any] = {"v": env.v, "type": env.type, "id": env.id, "payload": env.payload}
    if env.deadline is not None:
        doc["deadline"] = env.deadline
    if env.error is not None:
        doc["error"] = env.error
    try:
        return msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode bus message {env.type!r}: {exc}") from None


def decode(frame: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    try:
        doc = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"undecodable frame ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("frame is not an envelope map")
    version = doc.get("v")
    if version != VERSION:
        raise ProtocolError(f"unsupported envelope version {version!r}")
    kind, ident = doc.get("type"), doc.get("id")
    if not isinstance(kind, str) or not kind or not isinstance(ident, str) or not ident:
        raise ProtocolError("envelope lacks a type or id")
    deadline = doc.get("deadline")
    if deadline is not None and not isinstance(deadline, int | float):
        raise ProtocolError("envelope deadline is not a number")
    error = doc.get("error")
    if error is not None and not isinstance(error, dict):
        raise ProtocolError("envelope error is not a map")
    return Envelope(
        type=kind,
        id=ident,
        payload=doc.get("payload"),
        deadline=float(deadline) if deadline is not None else None,
        error=error,
        v=version,
    )
