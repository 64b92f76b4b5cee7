"""The envelope codec refuses anything that is not a well-formed envelope of our version."""

from __future__ import annotations

import msgpack
import msgspec
import pytest

from bus import codec
from contracts.checked import explain
from node.errors import Conflict, InvalidRequest, ProtocolError, Unavailable, Unreachable, from_wire


def test_round_trip_and_error_kinds() -> None:
    env = codec.Envelope(type="status", payload={"a": [1, 2.5, "x", None]}, deadline=123.0)
    back = codec.decode(codec.encode(env))
    assert (back.type, back.id, back.body(), back.deadline, back.v) == (
        "status", env.id, env.payload, 123.0, codec.VERSION)
    failed = codec.decode(codec.encode(env.fail(Conflict("busy", mode="POW"))))
    with pytest.raises(Conflict, match="busy") as info:
        failed.raise_for_error()
    assert info.value.details == {"mode": "POW"}


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"v": 2, "type": "x", "id": "1"}),
        msgpack.packb({"v": 1, "type": "", "id": "1"}),
        msgpack.packb({"v": 1, "type": "x"}),
        msgpack.packb({"v": 1, "type": "x", "id": "1", "deadline": "soon"}),
        msgpack.packb({1: 2}),
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.decode(frame)


def test_oversized_frame_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.decode(b"\x00" * 101, max_bytes=100)


def test_expiry() -> None:
    assert codec.Envelope(type="x", deadline=1.0).expired()
    assert not codec.Envelope(type="x").expired()


class _Body(msgspec.Struct):
    count: int


def test_a_refused_body_is_worded_by_the_receiver_not_by_the_bus() -> None:
    env = codec.decode(codec.encode(codec.Envelope(type="x", payload={"count": "three"})))
    with pytest.raises(InvalidRequest) as plain:
        env.body(_Body)
    assert plain.value.message == "Expected `int`, got `str` - at `$.count`"  # msgspec's own text
    with pytest.raises(InvalidRequest) as worded:
        env.body(_Body, explain)
    assert worded.value.message == "count must be an integer, got string"


def test_unreachable_is_an_unavailable_kind_of_its_own_across_the_wire() -> None:
    assert issubclass(Unreachable, Unavailable) and Unreachable("x").kind == "unreachable"
    assert type(from_wire(Unreachable("pow service is not reachable").to_wire())) is Unreachable
