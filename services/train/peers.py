"""Training peers: the per-task registry the Network Node fills, and the group that reduces over it.

The client's ``train_env`` names ranks and a meeting host but carries no keys, so before a multi-node
run the operators register each task's peers with this node (``{task_id, peers: [{node_id,
public_key, address, rank?}]}``); the peer listener then admits exactly the keys of the running task.
Every field is checked by the contracts (:mod:`contracts.train`), which state the rules in the published
document; here only the rules between peers (a rank or key taken twice) are checked, and a bad body is
an :class:`~node.errors.InvalidRequest` that names the field.

:func:`open_group` builds the :class:`~services.train.collective.group.PeerGroup` of a task with the
fixed-rank-order mean of :mod:`services.train.diloco`, and :func:`follow` keeps its members equal to
the task's registered peers for as long as the run lasts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bus.auth import Authenticator
from bus.sockets import AsyncContext
from contracts.checked import convert
from contracts.train import PRINTABLE, TrainPeer, TrainPeerRemove, TrainPeers
from node.errors import InvalidRequest, NotFound
from node.identity import KeyPair, public_from_text
from node.logging import get_logger
from services.train.collective.group import Member, PeerGroup
from services.train.config import EnvConfig
from services.train.diloco import fixed_order_mean

log = get_logger(__name__)

__all__ = ["PeerInfo", "PeerRegistry", "bind_endpoint", "follow", "listen_port", "open_group"]


@dataclass(frozen=True)
class PeerInfo:
    """One registered peer of a task; ``public_key`` is normalised to Z85."""

    node_id: str
    public_key: str
    address: str
    rank: int | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.address}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "public_key": self.public_key,
            "address": self.address,
            "rank": self.rank,
        }

    def member(self) -> Member:
        return Member(self.public_key, self.endpoint, self.rank)


def _text(value: Any, field: str) -> str:
    """A task id given as a query parameter (no body contract covers it): the contract's rule."""
    if not isinstance(value, str) or len(value) > 256 or not re.search(PRINTABLE, value):
        raise InvalidRequest(f"{field} must be a non-empty string of at most 256 printable characters")
    return value


def normal_address(address: str) -> str:
    """``host:port`` as the contract admits it (:data:`contracts.train.PEER_ADDRESS`), normalised:
    IPv6 compressed, host names lower case, no leading zeros in the port."""
    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    if host.startswith("["):
        return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]:{port}"
    return f"{host.lower()}:{port}"


def peer_info(peer: TrainPeer) -> PeerInfo:
    """A registered peer from its contract value; the key normalised to Z85."""
    return PeerInfo(
        node_id=peer.node_id,
        public_key=public_from_text(peer.public_key),
        address=normal_address(peer.address),
        rank=peer.rank,
    )


class PeerRegistry:
    """Peers per task, as the Network Node registered them; listeners hear every change."""

    def __init__(self) -> None:
        self._tasks: dict[str, dict[str, PeerInfo]] = {}
        self._listeners: list[Callable[[str, list[PeerInfo]], None]] = []

    def subscribe(self, listener: Callable[[str, list[PeerInfo]], None]) -> Callable[[], None]:
        """Call ``listener`` on every change; returns the function that stops that."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def peers(self, task_id: str) -> list[PeerInfo]:
        return _ordered(self._tasks.get(task_id, {}))

    def register(self, body: TrainPeers | Any) -> dict[str, Any]:
        """Add or update peers of a task (``replace: true`` drops the ones not listed); ``body`` is the
        contract's value, or JSON values checked into it (a persisted registry)."""
        request = body if isinstance(body, TrainPeers) else convert(body, TrainPeers)
        task_id = request.task_id
        new = [peer_info(peer) for peer in request.peers]
        current = {} if request.replace else dict(self._tasks.get(task_id, {}))
        for i, peer in enumerate(new):
            current.pop(peer.node_id, None)
            for other in current.values():
                if other.public_key == peer.public_key:
                    raise InvalidRequest(
                        f"peers[{i}].public_key is already registered for node {other.node_id!r}"
                    )
                if peer.rank is not None and other.rank == peer.rank:
                    raise InvalidRequest(
                        f"peers[{i}].rank {peer.rank} is already taken by node {other.node_id!r}"
                    )
            current[peer.node_id] = peer
        self._commit(task_id, current)
        log.info("peers_registered", task_id=task_id, registered=len(new), total=len(current))
        return self.describe(task_id)

    def remove(self, body: TrainPeerRemove | Any) -> dict[str, Any]:
        """Forget one peer (``{task_id, node_id}``); its connections stop being heard at once."""
        request = body if isinstance(body, TrainPeerRemove) else convert(body, TrainPeerRemove)
        task_id, node_id = request.task_id, request.node_id
        peers = dict(self._tasks.get(task_id, {}))
        if node_id not in peers:
            raise NotFound(f"node {node_id!r} is not registered for task {task_id!r}")
        del peers[node_id]
        self._commit(task_id, peers)
        log.info("peer_removed", task_id=task_id, node_id=node_id)
        return self.describe(task_id)

    def list_peers(self, body: Any) -> dict[str, Any]:
        """One task's peers (``{task_id}``) or every task's."""
        if isinstance(body, dict) and body.get("task_id") is not None:
            return self.describe(_text(body["task_id"], "task_id"))
        return {"tasks": [self.describe(task_id) for task_id in sorted(self._tasks)]}

    def describe(self, task_id: str) -> dict[str, Any]:
        return {"task_id": task_id, "peers": [p.to_dict() for p in self.peers(task_id)]}

    def _commit(self, task_id: str, peers: dict[str, PeerInfo]) -> None:
        """Listeners see the new set first; one that refuses it (InvalidRequest) leaves the old set."""
        for listener in self._listeners:
            listener(task_id, _ordered(peers))
        self._tasks[task_id] = peers


def _ordered(peers: dict[str, PeerInfo]) -> list[PeerInfo]:
    return sorted(peers.values(), key=lambda p: (p.rank is None, p.rank or 0, p.node_id))


def listen_port(env: EnvConfig, own: PeerInfo | None) -> int:
    """The port this node's peer listener binds.

    The port of this node's own registry entry wins (that is what the peers will dial); otherwise
    rank 0 listens on ``GLOBAL_PORT`` (the meeting point the client names) and other ranks on
    ``BASE_PORT``.
    """
    if own is not None:
        return int(own.address.rpartition(":")[2])
    port = env.global_port if env.rank == 0 and env.global_port else env.base_port
    if port is None:
        raise InvalidRequest(
            f"train_env.BASE_PORT is required for rank {env.rank}: the registry has no entry for this node"
        )
    return port


def bind_endpoint(host: str, port: int, env: EnvConfig, peers: Iterable[PeerInfo], me: str) -> str:
    """The listener's endpoint on ``host``: ``port`` when set (explicit local config wins), else
    :func:`listen_port` of this node's entry among ``peers`` (``me`` is this node's public key)."""
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    own = next((p for p in peers if p.public_key == me), None)
    return f"tcp://{host}:{port or listen_port(env, own)}"


def open_group(
    context: AsyncContext,
    auth: Authenticator,
    identity: KeyPair,
    bind: str,
    *,
    rank: int,
    world_size: int,
    **options: Any,
) -> PeerGroup:
    """A group reducing with :func:`fixed_order_mean`, not yet started and without members."""
    return PeerGroup(
        context, auth, identity, bind, rank=rank, world_size=world_size, reduce_fn=fixed_order_mean, **options
    )


def follow(group: PeerGroup, registry: PeerRegistry, task_id: str) -> Callable[[], None]:
    """Keep ``group``'s members (and so the listener's allowlist) equal to the task's registered peers.

    Returns the function that stops following (call it before closing the group).
    """

    def apply(changed: str, peers: Iterable[PeerInfo]) -> None:
        if changed == task_id:
            group.set_members([p.member() for p in peers])

    apply(task_id, registry.peers(task_id))
    return registry.subscribe(apply)
