"""Real CURVE sockets on loopback: who gets in, what gets through, and how failures look."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from bus import codec
from bus.auth import Authenticator
from bus.events import Publisher, Subscriber
from bus.rpc import Caller, RpcClient, RpcServer
from node.errors import DeadlineExceeded, InvalidRequest, TooLarge, Unavailable
from node.identity import KeyPair
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)


@dataclass
class Rig:
    ctx: zmq.asyncio.Context
    auth: Authenticator
    server_keys: KeyPair
    client_keys: KeyPair
    server: RpcServer
    task: asyncio.Task[None]
    calls: list[Any]

    def client(self, keys: KeyPair | None = None) -> RpcClient:
        return RpcClient(self.ctx, keys or self.client_keys, self.server_keys.public, self.server.endpoint)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ctx = zmq.asyncio.Context()
    auth = Authenticator(ctx).start()
    server_keys, client_keys = KeyPair.generate(), KeyPair.generate()
    auth.set_allowed("local", {client_keys.public})
    server = RpcServer(ctx, auth, server_keys, f"ipc://{tmp_path}/svc.rpc")
    calls: list[Any] = []

    async def echo(payload: Any, caller: Caller) -> Any:
        calls.append((payload, caller.public_key))
        return {"echo": payload}

    async def slow(payload: Any, _caller: Caller) -> Any:
        await asyncio.sleep(float(payload))  # the scenario: a handler slower than the caller's deadline
        return "late"

    async def refuse(_payload: Any, _caller: Caller) -> Any:
        raise InvalidRequest("field x is wrong")

    async def crash(_payload: Any, _caller: Caller) -> Any:
        raise ZeroDivisionError

    for name, fn in {"echo": echo, "slow": slow, "refuse": refuse, "crash": crash}.items():
        server.route(name, fn)
    task = asyncio.get_running_loop().create_task(server.serve())
    yield Rig(ctx, auth, server_keys, client_keys, server, task, calls)
    task.cancel()
    server.close()
    auth.stop()
    ctx.destroy(linger=0)


async def test_known_key_round_trip_carries_authenticated_identity(rig: Rig) -> None:
    client = rig.client()
    assert await client.request("echo", {"a": 1}, timeout=5) == {"echo": {"a": 1}}
    assert rig.calls == [({"a": 1}, rig.client_keys.public)]
    client.close()


async def test_stranger_with_valid_curve_keypair_is_refused(rig: Rig) -> None:
    stranger = rig.client(KeyPair.generate())
    with pytest.raises(Unavailable):
        await stranger.request("echo", "hi", timeout=1.0)
    assert rig.calls == []
    assert rig.auth.failures["local"] >= 1
    stranger.close()


async def test_plain_unencrypted_client_is_refused(rig: Rig) -> None:
    sock = rig.ctx.socket(zmq.DEALER)
    sock.linger = 0
    turned_away = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                   zmq.EVENT_DISCONNECTED)
    monitor = sock.get_monitor_socket(sum(turned_away))
    sock.connect(rig.server.endpoint)
    await sock.send(codec.encode(codec.Envelope(type="echo", payload="plain")))
    # The server turned the connection away (the event says so) before any message could reach it.
    event = await asyncio.wait_for(monitor.recv_multipart(), 30)
    assert int.from_bytes(event[0][:2], "little") in turned_away
    assert rig.calls == []
    sock.disable_monitor()
    monitor.close()
    sock.close()


async def test_revoked_key_stops_delivering_on_an_open_connection(rig: Rig) -> None:
    client = rig.client()
    assert await client.request("echo", 1, timeout=5) == {"echo": 1}
    rig.auth.set_allowed("local", rig.auth.allowed("local") - {rig.client_keys.public})
    with pytest.raises(DeadlineExceeded):
        await client.request("echo", 2, timeout=0.5)
    assert [c[0] for c in rig.calls] == [1]
    assert rig.server.dropped >= 1
    rig.auth.set_allowed("local", rig.auth.allowed("local") | {rig.client_keys.public})
    assert await client.request("echo", 3, timeout=5) == {"echo": 3}
    client.close()


async def test_garbage_and_oversized_frames_are_dropped_and_server_lives(rig: Rig) -> None:
    raw = rig.ctx.socket(zmq.DEALER)
    raw.curve_serverkey = rig.server_keys.public.encode()
    raw.curve_secretkey = rig.client_keys.secret.encode()
    raw.curve_publickey = rig.client_keys.public.encode()
    raw.linger = 0
    raw.connect(rig.server.endpoint)
    await raw.send(b"\xc1\xff garbage")
    await raw.send(msgpack.packb({"v": 99, "type": "echo", "id": "x"}))
    await raw.send(msgpack.packb([1, 2, 3]))
    await raw.send_multipart([b"two", b"frames"])
    await raw.send(b"x" * (codec.MAX_MESSAGE_BYTES + 10))  # over MAXMSGSIZE: libzmq drops the link
    await until(lambda: rig.server.dropped >= 4, what="four bad messages dropped")
    assert not rig.task.done()
    client = rig.client()
    assert await client.request("echo", "still alive", timeout=5) == {"echo": "still alive"}
    raw.close()
    client.close()


async def test_errors_travel_with_their_kind(rig: Rig) -> None:
    client = rig.client()
    with pytest.raises(InvalidRequest, match="field x is wrong"):
        await client.request("refuse", timeout=5)
    with pytest.raises(Exception, match="internal error") as info:
        await client.request("crash", timeout=5)
    assert type(info.value).__name__ == "MLNodeError"
    with pytest.raises(Exception, match="unknown request type"):
        await client.request("nope", timeout=5)
    assert await client.request("echo", 0, timeout=5) == {"echo": 0}
    client.close()


async def test_request_to_stopped_service_times_out_within_its_deadline(rig: Rig) -> None:
    client = rig.client()
    assert await client.request("echo", 0, timeout=5) == {"echo": 0}
    rig.task.cancel()
    rig.server.close()
    with pytest.raises((DeadlineExceeded, Unavailable)):  # its own deadline ends it, not the guard's
        await asyncio.wait_for(client.request("echo", 1, timeout=0.8), 30)
    client.close()


async def test_slow_handler_gives_deadline_error_not_hang(rig: Rig) -> None:
    client = rig.client()
    with pytest.raises(DeadlineExceeded):  # before the 5 s handler could answer
        await asyncio.wait_for(client.request("slow", 5, timeout=0.5), 4)
    client.close()


async def test_nobody_listening_is_unavailable(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    client = RpcClient(ctx, KeyPair.generate(), KeyPair.generate().public, f"ipc://{tmp_path}/none.rpc")
    with pytest.raises(Unavailable):  # its own deadline ends it, not the guard's
        await asyncio.wait_for(client.request("echo", timeout=0.5), 30)
    client.close()
    ctx.destroy(linger=0)


def test_server_refuses_to_bind_without_authenticator(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    auth = Authenticator(ctx)  # never started
    with pytest.raises(RuntimeError, match="authenticator must run"):
        RpcServer(ctx, auth, KeyPair.generate(), f"ipc://{tmp_path}/x.rpc")
    ctx.destroy(linger=0)


async def test_events_reach_allowed_subscribers_and_revocation_cuts_them(rig: Rig, tmp_path: Path) -> None:
    pub = Publisher(rig.ctx, rig.auth, rig.server_keys, f"ipc://{tmp_path}/svc.events")
    sub = Subscriber(rig.ctx, rig.client_keys, rig.server_keys.public, pub.endpoint, ("state",))
    stranger = Subscriber(rig.ctx, KeyPair.generate(), rig.server_keys.public, pub.endpoint, ("state",))

    async def first(s: Subscriber, timeout: float) -> tuple[str, Any] | None:
        async def get() -> tuple[str, Any]:
            async for item in s:
                return item
            raise AssertionError("subscriber ended")

        publisher = asyncio.get_running_loop().create_task(_keep_publishing(pub))
        try:
            return await asyncio.wait_for(get(), timeout)
        except TimeoutError:
            return None
        finally:
            publisher.cancel()

    assert await first(sub, 5) == ("state", {"n": 1})
    assert await first(stranger, 1) is None
    rig.auth.set_allowed("local", rig.auth.allowed("local") - {rig.client_keys.public})
    pub.reset()
    sub.close()
    sub = Subscriber(rig.ctx, rig.client_keys, rig.server_keys.public, pub.endpoint, ("state",))
    assert await first(sub, 1) is None
    for s in (sub, stranger):
        s.close()
    pub.close()


async def _keep_publishing(pub: Publisher) -> None:
    """Publish until cancelled, as a live service does: a subscriber joins a stream already flowing."""
    while True:
        pub.publish("state", {"n": 1})
        pub.publish("other", {"n": 2})
        await asyncio.sleep(0.05)


async def test_a_request_larger_than_the_bus_carries_is_refused_before_sending(rig: Rig) -> None:
    """The server's socket would drop the connection (and every request on it would time out): the
    client refuses it itself, as the error the gateway answers 413, and the connection stays good."""
    client = rig.client()
    try:
        with pytest.raises(TooLarge, match="carries at most"):
            await client.request("echo", [0.5] * (codec.MAX_MESSAGE_BYTES // 9 + 1), timeout=5)
        assert await client.request("echo", "still fine", timeout=5) == {"echo": "still fine"}
    finally:
        client.close()
