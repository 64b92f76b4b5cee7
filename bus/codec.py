"""The bus envelope: a versioned msgpack map ``{v, type, id, payload, deadline?, error?}``.

Decoding is defensive: anything that is not a well-formed envelope of a version we speak raises
:class:`~node.errors.ProtocolError`, which receivers log and drop — a malformed frame never kills a
process. Sizes are bounded twice: by ``MAXMSGSIZE`` on the socket and by the frame check here.

The payload stays undecoded (:class:`msgspec.Raw`) until its reader asks for it with the type it
expects (:meth:`Envelope.body`): a service handler gets the contract's Struct straight from the msgpack
bytes, checked by the same definition the gateway used, and nobody decodes a payload twice.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec

from node.errors import InvalidRequest, MLNodeError, ProtocolError, from_wire

VERSION = 1
#: Default per-message limit for control traffic; bulk links (peer tensors) set their own.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
T = TypeVar("T")
_NIL = msgspec.Raw(b"\xc0")  # msgpack nil


_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def _new_id() -> str:
    """Unique per process run and cheap (a uuid4 per request cost more than the codec itself)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


#: Words msgspec's refusal of a payload (error, the payload, its expected type) for the caller. The bus
#: knows no contract's wording: a service passes the contracts' own (``contracts.checked.explain``).
Explain = Callable[[msgspec.ValidationError, Any, Any], str]


def plain_reason(error: msgspec.ValidationError, document: Any, kind: Any) -> str:
    """msgspec's own reason, for receivers that were given no wording."""
    return str(error)


class Envelope(msgspec.Struct):
    """One bus message. ``deadline`` is an absolute UNIX time after which nobody wants the answer."""

    type: str
    payload: Any = None
    id: str = msgspec.field(default_factory=_new_id)
    deadline: float | None = None
    error: dict[str, Any] | None = None
    v: int = VERSION

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) > self.deadline

    def reply(self, payload: Any) -> Envelope:
        return Envelope(type="reply", payload=payload, id=self.id)

    def fail(self, error: MLNodeError) -> Envelope:
        return Envelope(type="error", id=self.id, error=error.to_wire())

    def body(self, kind: Any = Any, explain: Explain = plain_reason) -> Any:
        """The payload as ``kind`` (a contract Struct, or Any); a payload that does not fit is refused
        with :class:`InvalidRequest` worded by ``explain`` (services pass the gateway's wording)."""
        payload = self.payload
        if not isinstance(payload, msgspec.Raw):
            return payload if kind is Any else _convert(payload, kind, explain)
        try:
            return msgspec.msgpack.decode(payload, type=kind)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(explain(exc, msgspec.msgpack.decode(payload), kind)) from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable payload of {self.type!r}: {exc}") from None

    def raise_for_error(self) -> Any:
        """The payload of a reply, or the error it carries re-raised as the original kind."""
        if self.type == "error":
            raise from_wire(self.error)
        return self.body()


class _Wire(msgspec.Struct):
    """What a received frame must hold; the payload is kept as bytes for :meth:`Envelope.body`."""

    v: int
    type: Annotated[str, msgspec.Meta(min_length=1)]
    id: Annotated[str, msgspec.Meta(min_length=1)]
    payload: msgspec.Raw = _NIL
    deadline: float | None = None
    error: dict[str, Any] | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Wire)


def encode(env: Envelope) -> bytes:
    try:
        return _encoder.encode(env)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"cannot encode bus message {env.type!r}: {exc}") from None


def decode(frame: bytes | memoryview, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    try:
        wire = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed envelope ({exc})") from None
    except msgspec.DecodeError:
        raise ProtocolError("undecodable frame") from None
    if wire.v != VERSION:
        raise ProtocolError(f"unsupported envelope version {wire.v!r}")
    return Envelope(type=wire.type, payload=wire.payload, id=wire.id, deadline=wire.deadline,
                    error=wire.error, v=wire.v)


def _convert(value: Any, kind: Any, explain: Explain) -> Any:
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(explain(exc, value, kind)) from None
