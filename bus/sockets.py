"""CURVE socket setup shared by every bus socket: one place decides the security options."""

from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio

from bus.auth import Authenticator
from node.identity import KeyPair

#: The socket context services hand to the bus's peer links: they name its type, never zmq itself.
AsyncContext = zmq.asyncio.Context


def make_server(
    sock: zmq.Socket[Any],
    auth: Authenticator,
    keypair: KeyPair,
    domain: str,
    max_bytes: int,
) -> None:
    """Make ``sock`` a CURVE server whose clients the authenticator checks on ``domain``."""
    auth.require_running()
    sock.curve_server = True
    sock.curve_secretkey = keypair.secret.encode()
    sock.curve_publickey = keypair.public.encode()
    sock.zap_domain = domain.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.maxmsgsize = max_bytes
    sock.linger = 0


def make_client(
    sock: zmq.Socket[Any],
    keypair: KeyPair,
    server_public: str,
    max_bytes: int,
) -> None:
    """Make ``sock`` a CURVE client that only talks to the server holding ``server_public``."""
    sock.curve_serverkey = server_public.encode()
    sock.curve_secretkey = keypair.secret.encode()
    sock.curve_publickey = keypair.public.encode()
    sock.maxmsgsize = max_bytes
    sock.linger = 0


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP-authenticated public key a frame arrived with (None if unauthenticated)."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None
