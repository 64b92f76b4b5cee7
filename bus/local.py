"""The node-local bus: where each service listens and which keys it admits.

Every process of a node builds one :class:`LocalBus`. It starts the authenticator first (admitting the
node's local role keys on the ``local`` domain), then hands out servers, clients, publishers and
subscribers wired to ``ipc://`` endpoints in the node's private run directory. Only the services
:mod:`node.registry` lists have endpoints: a name that is not there is a bug, refused at once rather
than a client waiting on a socket nobody will ever bind.
"""

from __future__ import annotations

import zmq.asyncio

from bus.auth import Authenticator
from bus.codec import Explain, plain_reason
from bus.events import Publisher, Subscriber
from bus.rpc import RpcClient, RpcServer
from node.config import Settings
from node.identity import NodeKeys
from node.registry import NAMES


def _service(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{name!r} is not a service in node.registry ({', '.join(NAMES)})")
    return name


def rpc_endpoint(settings: Settings, service: str) -> str:
    return f"ipc://{settings.run_dir}/{_service(service)}.rpc"


def events_endpoint(settings: Settings, service: str) -> str:
    return f"ipc://{settings.run_dir}/{_service(service)}.events"


class LocalBus:
    """One process's view of the node bus, acting as ``role`` (a key name in ``keys.local``)."""

    def __init__(self, settings: Settings, keys: NodeKeys, role: str) -> None:
        self.settings = settings
        self.keys = keys
        self.role = role
        self.context = zmq.asyncio.Context()
        self.auth = Authenticator(self.context)
        self.auth.set_allowed("local", keys.local_publics())
        self.auth.start()

    def server(self, service: str | None = None, *, bind: bool = True,
               explain: Explain = plain_reason) -> RpcServer:
        name = service or self.role
        return RpcServer(self.context, self.auth, self.keys.local[name], rpc_endpoint(self.settings, name),
                         bind=bind, explain=explain)

    def publisher(self, service: str | None = None) -> Publisher:
        name = service or self.role
        return Publisher(self.context, self.auth, self.keys.local[name], events_endpoint(self.settings, name))

    def client(self, service: str) -> RpcClient:
        return RpcClient(
            self.context,
            self.keys.local[self.role],
            self.keys.local[service].public,
            rpc_endpoint(self.settings, service),
            name=f"{service} service",
        )

    def subscriber(self, service: str, topics: tuple[str, ...] = ("",)) -> Subscriber:
        return Subscriber(
            self.context,
            self.keys.local[self.role],
            self.keys.local[service].public,
            events_endpoint(self.settings, service),
            topics,
        )

    def close(self) -> None:
        self.auth.stop()
        self.context.destroy(linger=0)
