"""Peer links: CURVE-authenticated ZeroMQ over TCP between cooperating MLNodes (e.g. one training task).

Each node listens on one ROUTER (its long-term identity key is the CURVE server key, ZAP domain
``peers``) and opens one DEALER to every registered peer; all traffic flows DEALER → ROUTER, so the
authenticated ``User-Id`` of every received message names the sending peer. The listener admits exactly
the keys given to :meth:`PeerLink.set_peers`, and every message is re-checked against that list on
arrival, so a key that is removed stops being heard at once, even on a connection that is already open.

A message is a header frame plus an optional raw payload frame. The header is a typed msgpack map
(:class:`Frame`): the link's own fields — ``i`` the sender's incarnation (a restart resets credits),
``g`` the credit generation of a credited message, ``a`` an ack — and the sender's message ``m``, which
the link hands on undecoded (:attr:`PeerMessage.body`): its reader decodes it once, with the type it
expects, and nothing here needs to know what peers say. Bulk payloads are *credited*: each peer may
have at most ``window`` credited messages outstanding, and the receiver returns a credit
(:meth:`PeerLink.ack`) only after it has consumed the payload. A slow receiver therefore throttles its
senders instead of making them queue a whole payload in ZeroMQ's buffers.

A connection the peer refused at the handshake (it had not registered our key yet) is re-opened, and
the credited messages queued on it are sent again: nothing gets through a connection before its
handshake, and the data plane never repeats a chunk by itself, so losing one would stall an exchange
whose sender is alive and well.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from bus.auth import Authenticator
from bus.sockets import make_client, make_server, user_id
from node.backoff import backoff_delay
from node.errors import DeadlineExceeded, ProtocolError, Unavailable
from node.identity import KeyPair
from node.logging import get_logger

log = get_logger(__name__)

DOMAIN = "peers"
#: Largest header frame a peer may send (headers of bulk streams may list shapes and names).
HEADER_LIMIT = 1 << 20
#: Default largest payload frame; the layer above cuts bulk data into frames at most this big.
DEFAULT_MAX_PAYLOAD = 1 << 20
_SEND_HWM = 4096
_RETRY_MIN, _RETRY_MAX = 0.1, 2.0
#: How often an ack the connection could not take is tried again.
_ACK_RETRY_S = 0.05
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MONITOR_IDS = itertools.count()


#: Incarnations and credit generations: what a 48-bit random start plus one per re-open can reach.
_Counter = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]
_NIL = msgspec.Raw(b"\xc0")  # msgpack nil: a frame without a message (an ack)
class Frame(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A received header frame: the link's own fields and the sender's message, still undecoded."""

    i: _Counter
    g: _Counter | None = None
    a: _Counter | None = None
    m: msgspec.Raw = _NIL


class _Outgoing(msgspec.Struct, omit_defaults=True):
    """What :class:`Frame` decodes, as the sender writes it (``m`` is any msgspec-encodable value)."""

    i: int
    g: int | None = None
    a: int | None = None
    m: Any = None


@dataclass(frozen=True)
class PeerMessage:
    """One received message: ``body`` is the sender's message as msgpack, for its reader to decode
    (e.g. ``msgspec.msgpack.decode(msg.body, type=...)``); ``credit`` is set when the sender waits for
    :meth:`PeerLink.ack`."""

    key: str
    body: msgspec.Raw
    payload: memoryview | None = None
    credit: int | None = None


Handler = Callable[[PeerMessage], None]
#: Told ``(key, reason)`` when a registered peer sends a frame that breaks the link's protocol.
Violation = Callable[[str, str], None]


@dataclass
class _Peer:
    key: str
    endpoint: str
    sock: zmq.Socket[bytes]
    monitor: zmq.asyncio.Socket
    gen: int = 0
    outstanding: int = 0
    incarnation: int | None = None
    last_heard: float | None = None
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    watcher: asyncio.Task[None] | None = None
    #: Whether the current socket ever completed its handshake (then it may have delivered messages).
    shook: bool = False
    #: Credited messages queued on a socket that has not completed its handshake yet.
    unsure: list[tuple[Any, Any]] = field(default_factory=list)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def decode_frame(frame: bytes | memoryview) -> Frame:
    """A header frame as the link's fields plus the undecoded message; ProtocolError on anything else."""
    if len(frame) > HEADER_LIMIT:
        raise ProtocolError(f"header frame of {len(frame)} bytes exceeds {HEADER_LIMIT}")
    try:
        decoded = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed header ({exc})"[:200]) from None
    except msgspec.DecodeError:
        raise ProtocolError("undecodable header") from None
    if (decoded.a is None) == (decoded.m == _NIL):
        raise ProtocolError("a header carries either a message or an ack")
    return decoded


class PeerLink:
    """This node's end of the peer links of one task; use from one asyncio event loop."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        auth: Authenticator,
        keypair: KeyPair,
        endpoint: str,
        handler: Handler,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        window: int = 8,
        on_violation: Violation | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if max_payload < 1:
            raise ValueError("max_payload must be >= 1")
        self.keypair = keypair
        self.max_payload = max_payload
        self.window = window
        self.max_bytes = max(max_payload, HEADER_LIMIT) + 4096
        self.incarnation = int.from_bytes(os.urandom(6), "big")
        self.dropped = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._auth = auth
        self._context = context
        self._handler = handler
        self._on_violation = on_violation
        self._peers: dict[str, _Peer] = {}
        self._task: asyncio.Task[None] | None = None
        #: Credits (peer key, generation) whose ack could not go out yet (see :meth:`ack`).
        self._owed: list[tuple[str, int]] = []
        self._paying: asyncio.Task[None] | None = None
        # Senders are plain sockets on the same C context: sends never block (credits bound them).
        self._sync_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(context.underlying)
        auth.set_allowed(DOMAIN, ())
        self._router = context.socket(zmq.ROUTER)
        make_server(self._router, auth, keypair, DOMAIN, self.max_bytes)
        if endpoint.startswith("tcp://[") or endpoint.startswith("tcp://*"):
            self._router.setsockopt(zmq.IPV6, 1)
        self._router.bind(endpoint)
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- membership ---------------------------------------------------------------------------
    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Talk to and hear from exactly these peers: Z85 public key -> ``tcp://host:port``."""
        wanted = {key: endpoint for key, endpoint in peers.items() if key != self.keypair.public}
        for key in list(self._peers):
            if key not in wanted or wanted[key] != self._peers[key].endpoint:
                self._drop_peer(key)
        self._auth.set_allowed(DOMAIN, wanted)
        for key, endpoint in wanted.items():
            if key not in self._peers:
                peer = self._peers[key] = _Peer(key, endpoint, *self._connect(key, endpoint))
                if self._task is not None:
                    self._watch(peer)
        log.info("peer_links_set", peers=len(self._peers))

    def _connect(self, key: str, endpoint: str) -> tuple[zmq.Socket[bytes], zmq.asyncio.Socket]:
        """A DEALER to ``endpoint`` plus a reader of its handshake events, attached before it connects."""
        sock = self._sync_ctx.socket(zmq.DEALER)
        make_client(sock, self.keypair, key, self.max_bytes)
        sock.setsockopt(zmq.SNDHWM, _SEND_HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        address = f"inproc://peer-monitor-{id(self)}-{next(_MONITOR_IDS)}"
        sock.monitor(address, _HANDSHAKE_EVENTS)
        monitor = self._context.socket(zmq.PAIR)
        monitor.linger = 0
        monitor.connect(address)
        sock.connect(endpoint)
        return sock, monitor

    def _watch(self, peer: _Peer) -> None:
        if peer.watcher is None and not peer.closed:
            peer.watcher = asyncio.get_running_loop().create_task(self._follow(peer))

    async def _follow(self, peer: _Peer) -> None:
        # libzmq gives up for good on a connection whose CURVE handshake the server refused (say, it
        # had not registered our key yet); we open a fresh socket instead, with backoff.
        failures = 0
        while not peer.closed:
            try:
                event = parse_monitor_message(await peer.monitor.recv_multipart())["event"]
            except zmq.ZMQError:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                failures = 0
                peer.shook = True
                peer.unsure.clear()
                continue
            failures += 1
            backoff = backoff_delay(failures, _RETRY_MIN, _RETRY_MAX)
            log.warning("peer_handshake_failed", peer=peer.key[:8], endpoint=peer.endpoint, retry_s=backoff)
            await asyncio.sleep(backoff)
            if peer.closed:
                return
            self._close_sockets(peer)
            peer.sock, peer.monitor = self._connect(peer.key, peer.endpoint)
            peer.gen += 1  # whatever sat in the old socket's queue is gone, and so are its credits
            peer.outstanding = 0
            if peer.shook:  # the old socket may have delivered part of its queue: cannot tell what
                peer.shook = False
                peer.unsure.clear()
            else:
                self._resend_unsure(peer)
            peer.freed.set()

    def _resend_unsure(self, peer: _Peer) -> None:
        """Queue again, in order, the credited messages lost with a socket that never got through."""
        unsure, peer.unsure = peer.unsure, []
        for message, payload in unsure:
            peer.outstanding += 1
            if self._send(peer, _Outgoing(self.incarnation, g=peer.gen, m=message), payload, quiet=True):
                peer.unsure.append((message, payload))
            else:
                peer.outstanding -= 1
                log.warning("peer_resend_failed", peer=peer.key[:8])
        if unsure:
            log.info("peer_credited_resent", peer=peer.key[:8], messages=len(peer.unsure))

    @staticmethod
    def _close_sockets(peer: _Peer) -> None:
        with contextlib.suppress(zmq.ZMQError):
            peer.sock.disable_monitor()
        peer.sock.close(linger=0)
        peer.monitor.close(linger=0)

    def _drop_peer(self, key: str) -> None:
        peer = self._peers.pop(key)
        peer.closed = True
        peer.freed.set()
        if peer.watcher is not None:
            peer.watcher.cancel()
        self._close_sockets(peer)

    def peer_keys(self) -> list[str]:
        return list(self._peers)

    def last_heard(self, key: str) -> float | None:
        """``time.monotonic()`` of the last message from ``key`` (None: never, or not a peer)."""
        peer = self._peers.get(key)
        return peer.last_heard if peer else None

    # -- sending ------------------------------------------------------------------------------
    def send(self, key: str, message: Any, payload: Any = None) -> bool:
        """Send a control message now (any msgspec-encodable value); False if the peer is unknown or
        its queue is full."""
        peer = self._peers.get(key)
        if peer is None:
            return False
        return self._send(peer, _Outgoing(self.incarnation, m=message), payload)

    async def send_credited(
        self, key: str, message: Any, payload: Any = None, *, timeout: float | None = None
    ) -> None:
        """Send once the peer has a free credit and a connection; the receiver must :meth:`ack` it.

        Unlike :meth:`send`, this waits (up to ``timeout``, or until cancelled) instead of dropping
        the message while the connection to the peer is being re-opened.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            peer = self._peers.get(key)
            if peer is None:
                raise Unavailable(f"peer {key[:8]} is not a registered peer of this task")
            if peer.outstanding < self.window:
                peer.outstanding += 1
                if self._send(peer, _Outgoing(self.incarnation, g=peer.gen, m=message), payload, quiet=True):
                    if not peer.shook:
                        peer.unsure.append((message, payload))
                    return
                peer.outstanding -= 1
                wait: Any = asyncio.sleep(_RETRY_MIN / 2)  # not connected (yet): try again shortly
            else:
                peer.freed.clear()
                wait = peer.freed.wait()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                wait.close()
                raise DeadlineExceeded(f"peer {key[:8]} took no message for {timeout:g} s")
            try:
                await asyncio.wait_for(wait, remaining)
            except TimeoutError:
                raise DeadlineExceeded(f"peer {key[:8]} took no message for {timeout:g} s") from None

    def ack(self, msg: PeerMessage) -> None:
        """Return the credit of a consumed credited message (a no-op for control messages).

        An ack the connection cannot take now (ours to the sender is still being (re)opened, e.g. it
        registered our key a moment after us) is owed and sent as soon as it can go: each lost ack
        would shrink the sender's window for good, and after ``window`` of them its data stalls.
        """
        if msg.credit is None:
            return
        if not self._send_ack(msg.key, msg.credit):
            self._owed.append((msg.key, msg.credit))
            if self._paying is None or self._paying.done():
                self._paying = asyncio.get_running_loop().create_task(self._pay_owed())

    async def _pay_owed(self) -> None:
        while self._owed:
            await asyncio.sleep(_ACK_RETRY_S)
            self._owed = [
                (key, credit)
                for key, credit in self._owed
                if key in self._peers and not self._send_ack(key, credit)
            ]

    def _send_ack(self, key: str, credit: int) -> bool:
        peer = self._peers.get(key)
        return peer is not None and self._send(peer, _Outgoing(self.incarnation, a=credit), None)

    def _send(self, peer: _Peer, frame: _Outgoing, payload: Any, *, quiet: bool = False) -> bool:
        data = _encoder.encode(frame)
        try:
            if payload is None:
                peer.sock.send(data, flags=zmq.NOBLOCK)
            else:
                peer.sock.send_multipart([data, payload], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not quiet:
                log.warning("peer_send_dropped", peer=peer.key[:8], reason="not connected or queue full")
            return False
        except zmq.ZMQError as exc:
            log.warning("peer_send_failed", peer=peer.key[:8], error=str(exc))
            return False
        self.bytes_sent += len(data) + (len(payload) if payload is not None else 0)
        return True

    # -- receiving ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._receive())
            for peer in self._peers.values():
                self._watch(peer)

    async def _receive(self) -> None:
        while True:
            try:
                frames = await self._router.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM or self._router.closed:
                    return
                log.warning("peer_receive_failed", error=str(exc))
                continue
            try:
                self._accept(frames)
            except ProtocolError as exc:
                self._drop(exc.message)
            except Exception:  # a handler bug must not stop the link
                log.exception("peer_handler_failed")

    def _accept(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            raise ProtocolError(f"message has {len(frames)} frames, expected 2 or 3")
        key = user_id(frames[1])
        peer = self._peers.get(key or "")
        if peer is None or not self._auth.is_allowed(DOMAIN, key):
            # Revoked after this connection authenticated: stop hearing it.
            raise ProtocolError(f"sender {(key or '?')[:8]} is not a registered peer")
        try:
            if len(frames) > 3:
                raise ProtocolError(f"message has {len(frames)} frames, expected 2 or 3")
            frame = decode_frame(frames[1].buffer)
        except ProtocolError as exc:  # a registered peer that breaks the protocol: its owner decides
            self._drop(exc.message, peer=peer.key[:8])
            if self._on_violation is not None:
                self._on_violation(peer.key, exc.message)
            return
        incarnation = frame.i
        peer.last_heard = time.monotonic()
        self.bytes_received += sum(len(f) for f in frames[1:])
        if incarnation != peer.incarnation:
            if peer.incarnation is not None:
                log.info("peer_restarted", peer=peer.key[:8])
                peer.gen += 1  # credits of the old incarnation will never come back
                peer.outstanding = 0
                peer.freed.set()
            peer.incarnation = incarnation
        if frame.a is not None:  # an ack
            if frame.a == peer.gen and peer.outstanding > 0:
                peer.outstanding -= 1
                peer.freed.set()
            return
        payload = frames[2].buffer if len(frames) == 3 else None
        msg = PeerMessage(peer.key, frame.m, payload, frame.g)
        try:
            self._handler(msg)
        except ProtocolError as exc:
            self.ack(msg)
            self._drop(exc.message, peer=peer.key[:8])
        except Exception:
            self.ack(msg)
            raise

    def _drop(self, reason: str, **fields: Any) -> None:
        self.dropped += 1
        log.warning("peer_frame_dropped", reason=reason, **fields)

    # -- lifecycle ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._paying is not None:
            self._paying.cancel()
        for key in list(self._peers):
            self._drop_peer(key)
        self._auth.set_allowed(DOMAIN, ())
        self._router.close(linger=0)
