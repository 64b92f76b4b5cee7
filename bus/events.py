"""Publish/subscribe events (state changes, progress) over CURVE PUB/SUB.

Frames are ``[topic, envelope]``. A PUB socket cannot refuse one subscriber's traffic per message, so
revoking a key calls :meth:`Publisher.reset`: the socket is rebound, every connection re-handshakes, and
the authenticator admits only the keys still on the list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import zmq
import zmq.asyncio

from bus import codec
from bus.auth import Authenticator
from bus.sockets import make_client, make_server
from node.errors import ProtocolError
from node.identity import KeyPair
from node.logging import get_logger

log = get_logger(__name__)


class Publisher:
    """A bound PUB socket; :meth:`publish` never blocks (slow subscribers lose events, not us)."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        auth: Authenticator,
        keypair: KeyPair,
        endpoint: str,
        *,
        domain: str = "local",
        max_bytes: int = codec.MAX_MESSAGE_BYTES,
    ) -> None:
        self._context, self._auth, self._keypair = context, auth, keypair
        self._domain, self._max_bytes = domain, max_bytes
        self.endpoint = endpoint
        self._sock = self._open()

    def _open(self) -> zmq.asyncio.Socket:
        sock = self._context.socket(zmq.PUB)
        make_server(sock, self._auth, self._keypair, self._domain, self._max_bytes)
        sock.sndhwm = 10_000
        sock.bind(self.endpoint)
        return sock

    def publish(self, topic: str, payload: Any) -> None:
        data = codec.encode(codec.Envelope(type=topic, payload=payload))
        try:
            self._sock.send_multipart([topic.encode(), data], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("event_dropped", topic=topic)

    def reset(self) -> None:
        """Drop every connection; subscribers reconnect and are authenticated afresh."""
        self._sock.close(linger=0)
        self._sock = self._open()

    def close(self) -> None:
        self._sock.close(linger=0)


class Subscriber:
    """A SUB socket connected to one publisher whose key it pins."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        keypair: KeyPair,
        server_public: str,
        endpoint: str,
        topics: Iterable[str] = ("",),
        *,
        max_bytes: int = codec.MAX_MESSAGE_BYTES,
    ) -> None:
        self._max_bytes = max_bytes
        self.endpoint = endpoint
        self._sock = context.socket(zmq.SUB)
        make_client(self._sock, keypair, server_public, max_bytes)
        for topic in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)

    async def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            try:
                frames = await self._sock.recv_multipart()
            except zmq.ZMQError:
                return
            if len(frames) != 2:
                log.warning("event_frame_dropped", endpoint=self.endpoint, reason="wrong frame count")
                continue
            try:
                env = codec.decode(frames[1], max_bytes=self._max_bytes)
                payload = env.body()
            except ProtocolError as exc:
                log.warning("event_frame_dropped", endpoint=self.endpoint, reason=exc.message)
                continue
            yield env.type, payload

    def close(self) -> None:
        self._sock.close(linger=0)
