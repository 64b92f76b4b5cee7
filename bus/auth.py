"""ZAP authenticator: the allowlist every CURVE socket of a process is checked against.

libzmq accepts every CURVE client when no ZAP handler listens, so each process starts one
:class:`Authenticator` *before* it binds anything (:meth:`Authenticator.require_running` guards that).
Keys are grouped by ZAP domain — ``local`` for the node's own processes, ``peers`` for training peers —
and can change at run time. The handshake check only guards new connections, so receivers also call
:meth:`Authenticator.is_allowed` with each message's authenticated ``User-Id`` (which we set to the
client's Z85 public key): revoking a key silences connections that are already open.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import zmq
from zmq.utils import z85

from node.logging import get_logger

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
log = get_logger(__name__)


class Authenticator:
    """A ZAP handler thread with a per-domain allowlist of Z85 public keys."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        # A synchronous view of the same C context: the ZAP endpoint is inproc, so it must be shared,
        # and the handler thread needs blocking sockets even when the process uses zmq.asyncio.
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(context.underlying)
        self._allowed: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._start_error: BaseException | None = None
        self.failures: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()

    # -- allowlist ----------------------------------------------------------------------------
    def set_allowed(self, domain: str, keys: Iterable[str]) -> None:
        """Replace the keys admitted on ``domain``."""
        with self._lock:
            self._allowed[domain] = frozenset(keys)

    def allowed(self, domain: str) -> frozenset[str]:
        with self._lock:
            return self._allowed.get(domain, frozenset())

    def is_allowed(self, domain: str, user_id: str | None) -> bool:
        """True when ``user_id`` (a message's authenticated public key) is on ``domain``'s list now."""
        if not user_id:
            return False
        with self._lock:
            return user_id in self._allowed.get(domain, frozenset())

    # -- thread -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

    def require_running(self) -> None:
        if not self.running:
            raise RuntimeError("the ZAP authenticator must run before any CURVE socket binds")

    def start(self) -> Authenticator:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._serve, name="zap-authenticator", daemon=True)
        self._thread.start()
        self._ready.wait(5)
        if self._start_error is not None:
            raise RuntimeError(f"ZAP authenticator failed to start: {self._start_error}")
        if not self._ready.is_set():
            raise RuntimeError("ZAP authenticator did not start within 5 s")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _serve(self) -> None:
        sock = self._context.socket(zmq.REP)
        sock.linger = 0
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._start_error = exc
            sock.close()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    if not dict(poller.poll(200)):
                        continue
                    frames = sock.recv_multipart()
                except zmq.ContextTerminated:
                    break
                except zmq.ZMQError as exc:
                    log.warning("zap_receive_failed", error=str(exc))
                    continue
                sock.send_multipart(self._answer(frames))
        finally:
            sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain_b, address_b, _identity, mechanism = frames[:6]
        domain = domain_b.decode("utf-8", "replace")
        address = address_b.decode("utf-8", "replace")
        if version != b"1.0":
            return [b"1.0", request_id, b"400", b"unsupported ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(frames) < 7 or len(frames[6]) != 32:
            self.failures[domain] += 1
            log.warning("zap_refused", domain=domain, address=address, reason="not CURVE")
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        public = z85.encode(frames[6]).decode("ascii")
        if self.is_allowed(domain, public):
            self.successes[domain] += 1
            return [b"1.0", request_id, b"200", b"OK", public.encode(), b""]
        self.failures[domain] += 1
        log.warning("zap_refused", domain=domain, address=address, client_key=public[:8] + "…")
        return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
