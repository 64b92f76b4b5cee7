"""Where PoC callbacks may go: never the node itself, never link-local or unspecified addresses.

The callback ``url`` comes in a request body, and the node POSTs results to it. Unchecked, a ``url`` of
``http://127.0.0.1:<engine port>/sleep?...`` makes the node drive its own engine's dev routes around the
proxy's allowlist, and ``http://169.254.169.254/...`` reaches a cloud's metadata service. So:

* **Refused addresses**: unspecified (``0.0.0.0``, ``::``), link-local (``169.254/16``, ``fe80::/10``: cloud
  metadata), multicast, broadcast and reserved ones; loopback unless the operator says the Network Node
  runs on this host (``MLNODE_CALLBACK_ALLOW_LOOPBACK``); and, on any address of this host, the node's own
  ports -- management, inference, every engine instance's, the training peer port -- whatever else is
  allowed. IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
* **An optional allowlist** (``MLNODE_CALLBACK_HOSTS``): names, IPs or CIDRs; when set, a callback host
  must match one (and its addresses must still pass the rules above).
* **Checked at the route and at every connection.** pow refuses a body whose ``url`` breaks the rules (a
  400 the Network Node sees at once). The sender resolves the name itself when it connects and dials
  only an address that passes, so a name that resolves elsewhere later (DNS rebinding) reaches nothing
  it must not; a refusal then is a failed attempt, retried with back-off (results are never dropped).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from node.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Engine instance i listens on INFERENCE_PORT + 1 + i; this many instances' ports are kept off-limits.
ENGINE_PORTS = 64
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CallbackRefused(Exception):
    """A callback URL or address the policy refuses; the message says why."""


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local_address(ip: IPAddress) -> bool:
    """Whether ``ip`` belongs to this host: loopback, or an address a socket can bind to here."""
    ip = _plain(ip)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if isinstance(ip, ipaddress.IPv6Address) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class CallbackPolicy:
    """The rules with the node's ports and the operator's settings; see the module docstring."""

    own_ports: frozenset[int]
    allow_loopback: bool = False
    hosts: tuple[str, ...] = ()
    #: The resolver (``socket.getaddrinfo``'s signature); a test stands in for DNS with its own.
    resolve: Callable[..., list[Any]] = field(default=socket.getaddrinfo, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> CallbackPolicy:
        ports = {settings.api_port, settings.inference_port}
        ports.update(range(settings.inference_port + 1, settings.inference_port + 1 + ENGINE_PORTS))
        if settings.peer_port:
            ports.add(settings.peer_port)
        return cls(own_ports=frozenset(p for p in ports if p <= 65535),
                   allow_loopback=settings.callback_allow_loopback, hosts=settings.callback_hosts)

    # -- addresses ------------------------------------------------------------------------------------
    def address_problem(self, ip: IPAddress, port: int) -> str | None:
        """None when a callback may connect to ``ip:port``, else why not."""
        ip = _plain(ip)
        if ip.is_unspecified:
            return f"{ip} is an unspecified address"
        if ip.is_link_local:
            return f"{ip} is a link-local address (cloud metadata lives there)"
        if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
            return f"{ip} is not a unicast address"
        if port in self.own_ports and is_local_address(ip):
            return f"{ip}:{port} is one of this node's own ports"
        if ip.is_loopback:
            if self.allow_loopback:
                return None
            return f"{ip} is a loopback address (MLNODE_CALLBACK_ALLOW_LOOPBACK allows it)"
        if ip.is_reserved:
            return f"{ip} is a reserved address"
        return None

    def _host_listed(self, host: str, addresses: Iterable[IPAddress]) -> bool:
        if not self.hosts:
            return True
        host = host.lower().rstrip(".")
        found = list(addresses)
        for entry in self.hosts:
            network = _network(entry)
            if network is None:
                if host == entry.lower().rstrip("."):
                    return True
            elif any(_plain(ip) in network for ip in found):
                return True
        return False

    def addresses(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` a callback may dial, in resolver order; CallbackRefused if none."""
        try:
            infos = self.resolve(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise CallbackRefused(f"cannot resolve {host!r}: {exc}") from None
        resolved = list(dict.fromkeys(_address(info) for info in infos))
        if not self._host_listed(host, resolved):
            raise CallbackRefused(f"{host!r} is not in MLNODE_CALLBACK_HOSTS")
        allowed, reasons = [], []
        for ip in resolved:
            reason = self.address_problem(ip, port)
            (reasons.append(reason) if reason else allowed.append(str(ip)))
        if not allowed:
            raise CallbackRefused(f"{host!r} resolves to no allowed address: {'; '.join(reasons)}")
        return allowed

    # -- URLs -----------------------------------------------------------------------------------------
    def check_url(self, url: str) -> None:
        """At the route: refuse a ``url`` the rules forbid (a name that does not resolve now passes: the
        sender checks again at every connection)."""
        host, port = _target(url)
        literal = _literal(host)
        if literal is not None:
            reason = self.address_problem(literal, port)
            if reason is not None:
                raise CallbackRefused(reason)
            if not self._host_listed(host, [literal]):
                raise CallbackRefused(f"{host!r} is not in MLNODE_CALLBACK_HOSTS")
            return
        try:
            infos = self.resolve(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            if self.hosts and not self._host_listed(host, []):
                raise CallbackRefused(f"{host!r} is not in MLNODE_CALLBACK_HOSTS") from None
            return
        resolved = list(dict.fromkeys(_address(info) for info in infos))
        if not self._host_listed(host, resolved):
            raise CallbackRefused(f"{host!r} is not in MLNODE_CALLBACK_HOSTS")
        for ip in resolved:  # at the route every address must pass: a mixed answer is no accident
            reason = self.address_problem(ip, port)
            if reason is not None:
                raise CallbackRefused(f"{host!r} resolves to {reason}")


def _target(url: str) -> tuple[str, int]:
    """The host and port a request to ``url`` connects to, parsed as the sender's HTTP client does."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise CallbackRefused(f"not a valid URL ({exc})") from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise CallbackRefused("the scheme must be http or https")
    if not parsed.host:
        raise CallbackRefused("the URL has no host")
    port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
    if not 0 < port <= 65535:
        raise CallbackRefused(f"port {port} is not a TCP port")
    return parsed.host, port


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _network(entry: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return None


def _address(info: tuple[Any, ...]) -> IPAddress:
    host = str(info[4][0]).split("%", 1)[0]  # an IPv6 scope id is not part of the address
    return ipaddress.ip_address(host)


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's blocking backend, dialling only addresses the policy allows (resolved here, once)."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None) -> httpcore.NetworkStream:
        try:
            addresses = self.policy.addresses(host, port)
        except CallbackRefused as exc:
            raise httpcore.ConnectError(f"refused by the callback policy: {exc}") from None
        error: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("callbacks never go to a unix socket")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport over :class:`GuardedBackend` (no proxy: callbacks go straight to the receiver)."""

    def __init__(self, policy: CallbackPolicy) -> None:  # no super().__init__(): it would build another pool
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=4, max_keepalive_connections=2,
            keepalive_expiry=5.0, network_backend=GuardedBackend(policy))
