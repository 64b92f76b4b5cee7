"""Delivery of the outbox to a real HTTP receiver on loopback: order, merging, retries, crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from node.errors import Conflict, Unavailable
from services.pow.callback_http import CallbackSender, Outcome, classify, safe_url
from services.pow.callback_policy import CallbackPolicy
from services.pow.delivery import Delivery, backoff_delay
from services.pow.outbox import Outbox
from tests.support.ports import free_port
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[3]
#: The receivers here listen on loopback, which the node refuses unless the operator allows it.
LOOPBACK = CallbackPolicy(own_ports=frozenset(), allow_loopback=True)


def fast(box: Outbox, *, connect_timeout_s: float = 5.0, total_timeout_s: float = 30.0) -> Delivery:
    """A sender with tiny period and backoff so that tests run in milliseconds."""
    return Delivery(box, LOOPBACK, period_s=0.02, backoff_base_s=0.01, backoff_cap_s=0.05,
                    connect_timeout_s=connect_timeout_s, total_timeout_s=total_timeout_s)


class Receiver:
    """A Network Node stand-in: records every POST; can answer an error, drop the connection, or stall.

    ``plan`` is consumed one entry per request ("ok", an int status, "close", ("stall", seconds), or a
    ``threading.Event`` to wait for before answering 200); when it is empty ``default`` applies.
    """

    def __init__(self, port: int = 0, delay_s: float = 0.0) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.plan: list[Any] = []
        self.default: Any = "ok"
        self.delay_s = delay_s
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner.lock:
                    owner.requests.append((self.path, body))
                    action = owner.plan.pop(0) if owner.plan else owner.default
                if owner.delay_s:  # the scenario: a receiver slow to answer
                    time.sleep(owner.delay_s)
                if isinstance(action, tuple):  # ("stall", seconds): say nothing for a while
                    time.sleep(action[1])
                    action = "ok"
                if isinstance(action, threading.Event):  # say nothing until the test lets go
                    action.wait(60)
                    action = "ok"
                if action == "close":
                    self.close_connection = True
                    return
                status = 200 if action == "ok" else int(action)
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/v1/poc-batches"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def bodies(self, suffix: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for path, body in self.requests if path.endswith(suffix)]

    def raw(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


@pytest.fixture
def delivery(outbox: Outbox) -> Iterator[Delivery]:
    sender = fast(outbox)
    yield sender
    sender.stop(10)


def gen(nonces: list[int], node_id: int = 1) -> dict[str, Any]:
    return {"public_key": "02ab", "block_hash": "9F3C", "block_height": 7, "nonces": nonces,
            "dist": [0.25 + n / 1e6 for n in nonces], "node_id": node_id}


def validated(nonces: list[int]) -> dict[str, Any]:
    return {**gen(nonces, node_id=0), "received_dist": [0.3] * len(nonces), "r_target": 1.4,
            "fraud_threshold": 1e-7, "n_invalid": 0, "probability_honest": 1.0, "fraud_detected": False}


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_queued_batches_arrive_merged_and_in_order(receiver: Receiver, outbox: Outbox,
                                                   delivery: Delivery) -> None:
    url = receiver.base
    outbox.put("generated", url, gen([1, 2]))
    outbox.put("generated", url, gen([3]))
    outbox.put("validated", url, validated([100]))
    outbox.put("validated", url, validated([101]))
    outbox.put("generated", url, gen([4]))
    outbox.put("generated", url, gen([5], node_id=2))
    delivery.start()
    assert delivery.flush(10)
    paths = [path for path, _ in receiver.raw()]
    assert paths == ["/v1/poc-batches/generated", "/v1/poc-batches/validated", "/v1/poc-batches/validated",
                     "/v1/poc-batches/generated", "/v1/poc-batches/generated"]
    assert [b["nonces"] for b in receiver.bodies()] == [[1, 2, 3], [100], [101], [4], [5]]
    assert receiver.bodies("/generated")[0]["dist"] == [0.250001, 0.250002, 0.250003]
    stats = delivery.stats()
    assert (stats["pending"], stats["delivered"], stats["sends"], stats["failures"]) == (0, 6, 5, 0)
    assert stats["running"] is True


@pytest.mark.timeout(30)
def test_batches_accumulate_over_the_send_period(receiver: Receiver, outbox: Outbox) -> None:
    sender = Delivery(outbox, LOOPBACK, period_s=60.0, backoff_base_s=0.01, backoff_cap_s=0.05)
    other = receiver.base.replace("/v1/", "/v2/")
    outbox.put("validated", other, validated([99]))
    sender.start()
    try:
        assert sender.flush(10)  # the first cycle has run: the next one is a minute away
        for n in range(5):
            outbox.put("generated", receiver.base, gen([n]))
        # A sender that posted a put as it came (instead of at the next cycle) shows here or below as a
        # second /generated body or one with fewer nonces.
        assert [path for path, _ in receiver.raw()] == ["/v2/poc-batches/validated"]  # the rest waits
        assert sender.flush(10)
        assert [b["nonces"] for b in receiver.bodies("/generated")] == [[0, 1, 2, 3, 4]]
    finally:
        sender.stop(10)


@pytest.mark.timeout(30)
def test_retries_send_identical_bytes(receiver: Receiver, outbox: Outbox, delivery: Delivery) -> None:
    receiver.plan = [503, "close", 500]
    outbox.put("generated", receiver.base, gen([1]))
    outbox.put("generated", receiver.base, gen([2]))
    delivery.start()
    wait_until(lambda: len(receiver.raw()) >= 1)
    outbox.put("generated", receiver.base, gen([3]))  # after sealing: goes in a later POST
    assert delivery.flush(10)
    raw = receiver.raw()
    assert len(raw) == 5
    assert raw[0] == raw[1] == raw[2] == raw[3]
    assert json.loads(raw[0][1])["nonces"] == [1, 2]
    assert json.loads(raw[4][1])["nonces"] == [3]
    assert delivery.stats()["failures"] == 3


@pytest.mark.timeout(30)
def test_receiver_down_then_up_gets_everything(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/cb"
    box = Outbox(tmp_path / "o.db")
    sender = fast(box)
    sender.start()
    try:
        for n in range(10):
            box.put("generated", url, gen([n]))
            box.put("validated", url, validated([1000 + n]))
        assert sender.flush(0.3) is False  # nobody listens yet
        assert box.stats()["failures"] >= 1
        receiver = Receiver(port)
        try:
            assert sender.flush(10)
            generated = [n for b in receiver.bodies("/generated") for n in b["nonces"]]
            checked = [n for b in receiver.bodies("/validated") for n in b["nonces"]]
            assert generated == list(range(10)) and checked == [1000 + n for n in range(10)]
            sequence = [n for b in receiver.bodies() for n in b["nonces"]]
            assert sequence == [x for n in range(10) for x in (n, 1000 + n)]
        finally:
            receiver.close()
    finally:
        sender.stop(10)
        box.close()


@pytest.mark.timeout(30)
def test_one_url_down_does_not_block_another(receiver: Receiver, outbox: Outbox,
                                             delivery: Delivery) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}/gone"
    outbox.put("generated", dead_url, gen([1]))
    outbox.put("generated", receiver.base, gen([2]))
    delivery.start()
    wait_until(lambda: outbox.pending_urls() == [dead_url])
    assert [b["nonces"] for b in receiver.bodies()] == [[2]]
    assert delivery.flush(0.2) is False


@pytest.mark.timeout(30)
def test_a_receiver_that_hangs_delays_only_its_own_url(receiver: Receiver, outbox: Outbox,
                                                       delivery: Delivery) -> None:
    """Each url has its own sender: the fast receiver gets every batch while the slow one still holds
    its first request open, and the slow one's batches follow, in order, once it answers."""
    held = threading.Event()
    slow = Receiver()
    slow.plan = [held]
    try:
        outbox.put("generated", slow.base, gen([1]))
        delivery.start()
        wait_until(lambda: len(slow.raw()) == 1)  # the slow receiver holds its first request
        outbox.put("generated", slow.base, gen([2], node_id=2))
        for n in range(3):
            outbox.put("generated", receiver.base, gen([10 + n], node_id=n))
        wait_until(lambda: len(receiver.bodies()) == 3)
        assert [b["nonces"] for b in receiver.bodies()] == [[10], [11], [12]]
        assert len(slow.raw()) == 1 and not held.is_set()  # still waiting on its first answer
        held.set()
        wait_until(lambda: len(slow.bodies()) == 2)
        assert [b["nonces"] for b in slow.bodies()] == [[1], [2]]
        wait_until(lambda: outbox.pending_count() == 0)
    finally:
        held.set()
        slow.close()


@pytest.mark.timeout(30)
def test_4xx_is_dead_lettered_and_the_queue_moves_on(receiver: Receiver, outbox: Outbox,
                                                     delivery: Delivery) -> None:
    receiver.plan = [429, 408, 422]
    outbox.put("validated", receiver.base, validated([1]))
    outbox.put("validated", receiver.base, validated([2]))
    delivery.start()
    assert delivery.flush(10) is False  # all sent, but one was refused for good
    assert [b["nonces"] for b in receiver.bodies()] == [[1], [1], [1], [2]]
    (dead,) = outbox.dead_letters()
    assert (dead["status"], json.loads(dead["body"])["nonces"], dead["attempts"]) == (422, [1], 3)
    stats = delivery.stats()
    assert (stats["dead"], stats["delivered"], stats["failures"], stats["pending"]) == (1, 1, 2, 0)
    outbox.put("validated", receiver.base, validated([3]))
    assert delivery.flush(10) is True  # the earlier dead letter does not taint a later flush


@pytest.mark.timeout(30)
def test_a_stalled_receiver_is_abandoned_after_the_total_timeout(receiver: Receiver, outbox: Outbox) -> None:
    stalled = threading.Event()
    receiver.plan = [stalled]  # the first request gets no answer until the test lets go
    sender = fast(outbox, connect_timeout_s=0.2, total_timeout_s=0.4)
    outbox.put("generated", receiver.base, gen([1]))
    sender.start()
    try:
        wait_until(lambda: outbox.stats()["failures"] == 1)  # abandoned while the receiver still stalls
        stalled.set()
        assert sender.flush(10)
        assert len(receiver.raw()) == 2 and receiver.raw()[0] == receiver.raw()[1]
    finally:
        sender.stop(10)


@pytest.mark.timeout(30)
def test_stop_keeps_everything_and_a_restart_resends_the_same_bytes(receiver: Receiver,
                                                                    tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    receiver.default = 503
    box = Outbox(path)
    for n in range(3):
        box.put("generated", receiver.base, gen([n]))
    first = fast(box)
    first.start()
    wait_until(lambda: len(receiver.raw()) >= 2)
    assert first.stop(10)
    box.put("generated", receiver.base, gen([3]))
    assert box.pending_count() == 4
    box.close()

    receiver.default = "ok"
    box = Outbox(path)
    second = fast(box)
    second.start()
    try:
        assert second.flush(10)
        raw = receiver.raw()
        assert all(item == raw[0] for item in raw[:-1])  # every try of the sealed unit: same bytes
        assert [json.loads(body)["nonces"] for _, body in (raw[0], raw[-1])] == [[0, 1, 2], [3]]
    finally:
        second.stop(10)
        box.close()


@pytest.mark.timeout(30)
def test_only_one_sender_per_outbox(outbox: Outbox, delivery: Delivery) -> None:
    delivery.start()
    other = fast(outbox)
    with pytest.raises(Conflict, match="another sender"):
        other.start()
    assert delivery.stop(10)
    other.start()  # the lock is free again once the first sender ended
    assert other.stop(10)


@pytest.mark.timeout(30)
def test_flush_needs_a_running_sender(outbox: Outbox) -> None:
    with pytest.raises(Unavailable, match="not running"):
        Delivery(outbox, LOOPBACK).flush(1)


_PUT_AND_DELIVER_CHILD = r"""
import sys, time
from pathlib import Path
from node.logging import configure
from services.pow.callback_policy import CallbackPolicy
from services.pow.delivery import Delivery
from services.pow.outbox import Outbox
configure("test", "critical")
box = Outbox(Path(sys.argv[1]))
url = sys.argv[2]
loopback = CallbackPolicy(frozenset(), allow_loopback=True)
Delivery(box, loopback, period_s=0.005, backoff_base_s=0.005, backoff_cap_s=0.02).start()
i = 0
while True:
    kind = "validated" if i % 9 == 4 else "generated"
    box.put(kind, url, {"public_key": "pk", "block_hash": "bh", "block_height": 1, "nonces": [i],
                        "dist": [0.5], "node_id": 1})
    print(i, flush=True)
    i += 1
    time.sleep(0.001)  # the scenario: a producer that keeps going until it is killed
"""


@pytest.mark.timeout(60)
def test_kill_9_while_sending_then_restart_delivers_everything(tmp_path: Path) -> None:
    receiver = Receiver(delay_s=0.004)  # slow answers: the kill lands mid-request more often
    receiver.plan = [random.choice(["ok", "ok", 503, "close"]) for _ in range(60)]
    path = tmp_path / "outbox.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _PUT_AND_DELIVER_CHILD, str(path), receiver.base],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    acknowledged: list[int] = []
    try:
        for line in child.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) >= 300:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert len(acknowledged) == 300, child.stderr.read() if child.stderr else ""
    before = len(receiver.raw())
    assert before > 0, "the child never got to send"

    box = Outbox(path)
    sender = fast(box)
    sender.start()
    try:
        assert sender.flush(20)
    finally:
        sender.stop(10)
        box.close()
        receiver.close()

    raw = receiver.raw()
    by_nonce: dict[int, set[bytes]] = {}
    for _path, body in raw:
        for nonce in json.loads(body)["nonces"]:
            by_nonce.setdefault(nonce, set()).add(body)
    assert set(acknowledged) <= set(by_nonce)
    # A nonce reported twice is a byte-identical repeat that the receiver can recognise.
    assert all(len(bodies) == 1 for bodies in by_nonce.values())
    first_seen: list[int] = []
    seen: set[bytes] = set()
    for _path, body in raw:
        if body not in seen:
            seen.add(body)
            first_seen.extend(json.loads(body)["nonces"])
    assert first_seen == sorted(first_seen)  # order held across the crash


# --- the pieces ---------------------------------------------------------------------------------


def test_status_classes() -> None:
    assert [classify(s) for s in (200, 201, 204)] == [Outcome.DELIVERED] * 3
    assert [classify(s) for s in (400, 401, 404, 413, 422)] == [Outcome.DEAD] * 5
    assert [classify(s) for s in (408, 429, 500, 502, 503, 301, 302, 100)] == [Outcome.RETRY] * 8


def test_backoff_grows_is_jittered_and_capped() -> None:
    rng = random.Random(1)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (500, 30.0)]:
        delays = [backoff_delay(failures, 0.5, 30.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # really jittered


def test_urls_in_logs_lose_their_credentials() -> None:
    assert safe_url("http://user:secret@api:9100/v1/poc") == "http://api:9100/v1/poc"
    assert safe_url("http://api:9100/v1/poc") == "http://api:9100/v1/poc"


@pytest.mark.timeout(30)
def test_sender_reports_transport_errors_instead_of_raising(receiver: Receiver) -> None:
    sender = CallbackSender(LOOPBACK, connect_timeout_s=0.5, total_timeout_s=1.0)
    try:
        refused = sender.post(f"http://127.0.0.1:{free_port()}/x/generated", b"{}")
        assert refused.outcome is Outcome.RETRY and refused.status is None and "Connect" in refused.reason
        receiver.plan = [429]
        limited = sender.post(f"{receiver.base}/generated", b"{}")
        assert (limited.outcome, limited.status, limited.retry_after_s) == (Outcome.RETRY, 429, 0.0)
        ok = sender.post(f"{receiver.base}/generated", b'{"a":1}')
        assert (ok.outcome, ok.status) == (Outcome.DELIVERED, 200)
        assert receiver.raw()[-1] == ("/v1/poc-batches/generated", b'{"a":1}')
    finally:
        sender.close()
