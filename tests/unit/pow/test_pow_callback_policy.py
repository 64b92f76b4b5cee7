"""The callback policy: which addresses a PoC callback may reach, at the route and at every connection.

The send-time tests use a real receiver on loopback and a stand-in resolver (the one thing this machine
cannot control is DNS): a name that resolved to an allowed address when the route checked it and
resolves to loopback when the sender connects reaches nothing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from node import config
from services.pow.callback_http import CallbackSender, Outcome
from services.pow.callback_policy import CallbackPolicy, CallbackRefused

NODE_PORTS = frozenset({8080, 5000, 5001, 5002})
STRICT = CallbackPolicy(own_ports=NODE_PORTS)
LOOPBACK_OK = CallbackPolicy(own_ports=NODE_PORTS, allow_loopback=True)


class Receiver:
    """Counts the POSTs it gets and answers 200."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.hits.append((self.path, self.headers.get("Host", "")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def resolving(table: dict[str, list[str]]) -> Any:
    """A getaddrinfo stand-in answering from ``table`` (name -> addresses, in order)."""
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]
    return resolve


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9100/v1/poc-batches",
    "http://localhost:9100/x",
    "http://127.1:9100/x",
    "http://2130706433:9100/x",  # 127.0.0.1 as one number: the resolver reads it so, so do we
    "http://[::1]:9100/x",
    "http://[::ffff:127.0.0.1]:9100/x",
    "http://0.0.0.0:9100/x",
    "http://[::]:9100/x",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]:9100/x",
    "http://224.0.0.1:9100/x",
    "http://255.255.255.255:9100/x",
])
def test_refused_at_the_route(url: str) -> None:
    with pytest.raises(CallbackRefused):
        STRICT.check_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/x", "http://localhost:5001/sleep?level=1",
                                 "http://[::1]:5000/x", "http://127.0.0.1:5002/collective_rpc"])
def test_the_nodes_own_ports_stay_refused_even_with_loopback_allowed(url: str) -> None:
    with pytest.raises(CallbackRefused, match="own ports"):
        LOOPBACK_OK.check_url(url)


def test_the_nodes_own_ports_on_its_other_addresses_are_refused() -> None:
    """Port 8080 on an address of this host is the management API, whatever the address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.1", 9))  # no packet is sent: it only picks a local address
            local = probe.getsockname()[0]
        except OSError:
            pytest.skip("this host has no non-loopback IPv4 address")
    if local.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address")
    with pytest.raises(CallbackRefused, match="own ports"):
        STRICT.check_url(f"http://{local}:8080/x")
    STRICT.check_url(f"http://{local}:9100/x")  # another port on this host is a receiver like any


@pytest.mark.parametrize("url", ["http://10.0.0.5:9100/v1/poc-batches", "https://api.example:443/x",
                                 "http://[2001:db8::5]:9100/x",
                                 "http://unresolvable.invalid:9100/x"])  # checked again when sending
def test_allowed_at_the_route(url: str) -> None:
    STRICT.check_url(url)


def test_loopback_when_the_operator_allows_it() -> None:
    LOOPBACK_OK.check_url("http://127.0.0.1:9100/x")
    LOOPBACK_OK.check_url("http://localhost:9100/x")


@pytest.mark.parametrize("url", ["ftp://10.0.0.5/x", "http:///x", "not a url", "http://10.0.0.5:99999/x"])
def test_urls_that_are_not_http_callbacks(url: str) -> None:
    with pytest.raises(CallbackRefused):
        STRICT.check_url(url)


def test_a_name_resolving_to_a_refused_address_is_refused_at_the_route() -> None:
    policy = CallbackPolicy(NODE_PORTS, resolve=resolving({"api": ["10.0.0.5", "169.254.169.254"]}))
    with pytest.raises(CallbackRefused, match="link-local"):
        policy.check_url("http://api:9100/x")


def test_the_operator_allowlist_of_hosts() -> None:
    policy = CallbackPolicy(NODE_PORTS, hosts=("api", "10.1.0.0/16"),
                            resolve=resolving({"api": ["10.0.0.5"], "other": ["10.0.0.6"],
                                               "inside": ["10.1.2.3"]}))
    policy.check_url("http://api:9100/x")
    policy.check_url("http://inside:9100/x")  # its address is in a listed network
    policy.check_url("http://10.1.9.9:9100/x")
    for url in ("http://other:9100/x", "http://10.0.0.6:9100/x", "http://unknown.invalid:9100/x"):
        with pytest.raises(CallbackRefused, match="MLNODE_CALLBACK_HOSTS"):
            policy.check_url(url)
    listed_but_metadata = CallbackPolicy(NODE_PORTS, hosts=("169.254.0.0/16",))
    with pytest.raises(CallbackRefused, match="link-local"):  # a listed host still obeys the rules
        listed_but_metadata.check_url("http://169.254.169.254/x")


def test_from_settings_knows_the_nodes_ports(tmp_path: Any) -> None:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path), "MLNODE_API_PORT": "18080",
                            "INFERENCE_PORT": "15000", "MLNODE_PEER_PORT": "15565"})
    policy = CallbackPolicy.from_settings(settings)
    assert {18080, 15000, 15001, 15064, 15565} <= policy.own_ports
    assert policy.allow_loopback is False


# --- at every connection ------------------------------------------------------------------------


def test_dns_rebinding_reaches_nothing(receiver: Receiver) -> None:
    """The route saw a public address; when the sender connects the name says loopback: no connection."""
    answers = {"rebind.example": ["93.184.216.34"]}
    policy = CallbackPolicy(NODE_PORTS, resolve=resolving(answers))
    policy.check_url(f"http://rebind.example:{receiver.port}/v1/poc-batches")
    answers["rebind.example"] = ["127.0.0.1"]
    sender = CallbackSender(policy, connect_timeout_s=1.0, total_timeout_s=2.0)
    try:
        result = sender.post(f"http://rebind.example:{receiver.port}/v1/poc-batches/generated", b"{}")
    finally:
        sender.close()
    assert result.outcome is Outcome.RETRY  # retried later: nothing is dropped
    assert "callback policy" in result.reason and "loopback" in result.reason
    assert receiver.hits == []


def test_the_sender_dials_the_address_it_checked(receiver: Receiver) -> None:
    """With loopback allowed, the checked address is dialled and the request still names the host."""
    policy = CallbackPolicy(NODE_PORTS, allow_loopback=True,
                            resolve=resolving({"api.example": ["169.254.169.254", "127.0.0.1"]}))
    sender = CallbackSender(policy, connect_timeout_s=1.0, total_timeout_s=2.0)
    try:
        result = sender.post(f"http://api.example:{receiver.port}/v1/poc-batches/generated", b"{}")
    finally:
        sender.close()
    assert result.outcome is Outcome.DELIVERED
    assert receiver.hits == [("/v1/poc-batches/generated", f"api.example:{receiver.port}")]


def test_a_literal_loopback_url_is_refused_at_connect(receiver: Receiver) -> None:
    sender = CallbackSender(STRICT, connect_timeout_s=1.0, total_timeout_s=2.0)
    try:
        result = sender.post(f"http://127.0.0.1:{receiver.port}/x/generated", b"{}")
    finally:
        sender.close()
    assert result.outcome is Outcome.RETRY and "loopback" in result.reason
    assert receiver.hits == []
