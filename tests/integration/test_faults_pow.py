"""Faults during a PoC round: the callback receiver down, pow killed mid-generation, a full state dir.

Rounds here use ``r_target`` so large that every nonce is valid: then "no result lost" has a simple,
exact oracle — the nonces delivered for this node's slot must be every slot nonce up to the largest one
delivered, with no gap, and a nonce delivered twice (work redone after a crash) must carry the same
distance both times.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import Node
from tests.support.pow import CASE, init_dict
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


REFERENCE = dict(zip(CASE["nonces"], CASE["dist_reference_fp16"], strict=True))
NODE_ID, NODE_COUNT = 1, 3


def init_body(url: str) -> dict[str, Any]:
    return init_dict(url, block_height=99, r_target=1e9, node_id=NODE_ID, node_count=NODE_COUNT)


def delivered(receiver: Receiver) -> list[tuple[int, float]]:
    return [pair for batch in receiver.received("generated")
            for pair in zip(batch["nonces"], batch["dist"], strict=True)]


def metric(node: Node, name: str) -> float:
    """The sample's value, 0.0 when the series is absent; a scrape that fails is a failure, not 0."""
    resp = node.api("GET", "/metrics", timeout=5)
    assert resp.status == 200, (resp.status, resp.body[:500])
    for line in resp.body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def pow_status(node: Node) -> dict[str, Any]:
    return dict(node.api("GET", "/api/v1/pow/status", timeout=10).json())


def stop_and_drain(node: Node) -> None:
    """Stop the round; results already found are still delivered, so wait for an empty outbox."""
    assert node.api("POST", "/api/v1/stop", timeout=60).status == 200
    wait_until(lambda: pow_status(node)["outbox"]["pending"] == 0, 60, message="outbox did not drain")


def assert_nothing_lost(receiver: Receiver, at_least: int) -> None:
    pairs = delivered(receiver)
    distances: dict[int, float] = {}
    for nonce, dist in pairs:
        assert distances.setdefault(nonce, dist) == dist, f"nonce {nonce} delivered with two distances"
    nonces = sorted(distances)
    assert len(nonces) >= at_least, (len(nonces), at_least)
    assert nonces == list(range(NODE_ID, nonces[-1] + 1, NODE_COUNT)), "a result is missing"
    for nonce in set(nonces) & set(REFERENCE):
        assert abs(distances[nonce] - REFERENCE[nonce]) < 2e-4


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("powfaults")).start()
    yield n
    n.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_receiver_outage_keeps_results_queued_visibly_and_delivers_all_after(node: Node,
                                                                            receiver: Receiver) -> None:
    """Promise: while the callback receiver answers 503, results wait in the durable outbox (its depth
    and the failed deliveries show in /metrics); once it is back every result arrives, none missing."""
    receiver.down()
    assert node.api("POST", "/api/v1/pow/init/generate", init_body(receiver.url)).status == 200
    wait_until(lambda: receiver.refused >= 2, 30, message="delivery was never tried")
    wait_until(lambda: metric(node, "mlnode_pow_outbox_pending_nonces") > 0, 10)
    assert metric(node, "mlnode_pow_outbox_delivery_failures_total") >= 1
    assert pow_status(node)["status"] == "GENERATING"
    receiver.up()
    wait_until(lambda: len(delivered(receiver)) > 0, 40, message="nothing delivered after the outage")
    found = pow_status(node)["valid_found"]
    stop_and_drain(node)
    assert_nothing_lost(receiver, at_least=found)
    assert metric(node, "mlnode_pow_outbox_pending_nonces") == 0


def test_kill_9_mid_generation_resumes_the_round_and_loses_nothing(node: Node, receiver: Receiver) -> None:
    """Promise: supervisord restarts pow within seconds; meanwhile /api/v1/state still says POW (the
    claim stands), the new process resumes the round (GENERATING again), and every result found before
    or after the kill reaches the receiver, none missing."""
    assert node.api("POST", "/api/v1/pow/init/generate", init_body(receiver.url)).status == 200
    wait_until(lambda: len(delivered(receiver)) >= 100, 40, message="no results before the kill")
    # The gateway counts a restart as a start time that changed between two scrapes: a scraper has seen
    # this pow before it dies (this module's first test on a fresh worker would otherwise be the first).
    restarts = metric(node, 'mlnode_process_restarts_total{program="pow"}')
    old = node.pid("pow")
    os.kill(old, signal.SIGKILL)
    assert node.api("GET", "/api/v1/state", timeout=10).json()["state"] == "POW"
    wait_until(lambda: node.pid("pow") not in (0, old), 20, message="pow was not restarted")
    wait_until(lambda: pow_status(node).get("status") == "GENERATING", 30, message="round not resumed")
    assert node.api("GET", "/api/v1/state").json()["state"] == "POW"
    before = max(n for n, _ in delivered(receiver))
    wait_until(lambda: max(n for n, _ in delivered(receiver)) > before + 100 * NODE_COUNT, 40,
               message="no new results after the restart")
    assert metric(node, 'mlnode_process_restarts_total{program="pow"}') >= restarts + 1
    stop_and_drain(node)
    assert_nothing_lost(receiver, at_least=200)


# --- a full state directory ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 64 MiB tmpfs to hold a whole node's state dir (needs root, as in CI and the image)."""
    mount = tmp_path_factory.mktemp("smalldisk")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def disk_node(small_disk: Path) -> Iterator[Node]:
    n = Node(small_disk).start()
    yield n
    n.stop()


@contextlib.contextmanager
def disk_full(directory: Path) -> Iterator[Path]:
    """Fill the filesystem of ``directory`` to the last byte; free it again on exit."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
        assert os.statvfs(directory).f_bavail == 0
        yield ballast
    finally:
        os.close(fd)
        ballast.unlink()


def test_a_full_state_dir_holds_results_back_with_a_clear_error_and_loses_nothing(
    disk_node: Node, small_disk: Path, receiver: Receiver
) -> None:
    """Promise: with the state dir full, pow holds its results (nothing is dropped), says why in
    /api/v1/pow/status and its log, and the node keeps answering /state, /health and /metrics; when space
    returns, generation and delivery go on, the outbox database is intact, and no result is missing."""
    node = disk_node
    pids = {p: node.pid(p) for p in ("gateway", "pow", "inference", "train")}
    assert node.api("POST", "/api/v1/pow/init/generate", init_body(receiver.url)).status == 200
    wait_until(lambda: len(delivered(receiver)) >= 100, 40, message="no results before the disk filled")
    with disk_full(small_disk):
        status = wait_until(lambda: (s := pow_status(node)).get("storage_error") and s, 30,
                            message="pow did not report the full disk")
        assert "full" in status["storage_error"] and "outbox" in status["storage_error"]
        frozen = status["valid_found"]
        assert node.api("GET", "/api/v1/state").json()["state"] == "POW"
        assert node.api("GET", "/health").status == 200
        assert metric(node, 'mlnode_node_state{state="POW"}') == 1  # /metrics answers (its timeout: 5 s)
    wait_until(lambda: not pow_status(node).get("storage_error"), 40, message="pow did not recover")
    wait_until(lambda: pow_status(node)["valid_found"] > frozen + 100, 40, message="no progress after")
    found = pow_status(node)["valid_found"]
    stop_and_drain(node)
    assert_nothing_lost(receiver, at_least=found)
    outbox = node.state_dir / "pow" / "outbox.db"
    with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert any(e.get("event") == "pow_outbox_refused" for e in node.log_lines("pow"))
    assert {p: node.pid(p) for p in pids} == pids


def test_stop_and_starts_on_a_full_state_dir_answer_a_clear_error(disk_node: Node, small_disk: Path) -> None:
    """Promise: with no space left to record the mode claim, a start answers 503 with a reason naming the
    state dir (never a bare 500), while a stop still answers at once with OK and leaves the node STOPPED
    (the client repairs by stopping); both work normally once space returns."""
    node = disk_node
    with disk_full(small_disk):
        resp = node.api("POST", "/api/v1/inference/up/async", {"model": "m"})
        assert resp.status == 503, (resp.status, resp.body)
        assert str(node.state_dir) in resp.json()["detail"]
        resp = node.api("POST", "/api/v1/stop", timeout=2.0)
        assert resp.status == 200 and resp.json() == {"status": "OK"}, resp.body
        assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    assert node.api("POST", "/api/v1/stop").status == 200
