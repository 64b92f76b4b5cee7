"""The durable outbox: merging, order, sealing, crash safety, and disk trouble."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

import services.pow.outbox as outbox_module
from node.errors import ConfigError, InvalidRequest, Unavailable
from services.pow.outbox import Outbox

REPO = Path(__file__).resolve().parents[3]
URL = "http://127.0.0.1:9/v1/poc-batches"
OTHER_URL = "http://127.0.0.1:9/other"


def gen(nonces: list[int], *, public_key: str = "02ab", block_hash: str = "9F3C", height: int = 7,
        node_id: int = 1) -> dict[str, Any]:
    return {
        "public_key": public_key,
        "block_hash": block_hash,
        "block_height": height,
        "nonces": nonces,
        "dist": [0.5 + n / 1000 for n in nonces],
        "node_id": node_id,
    }


def validated(nonces: list[int]) -> dict[str, Any]:
    return {**gen(nonces, node_id=0), "received_dist": [0.5] * len(nonces), "n_invalid": 0,
            "probability_honest": 1.0, "fraud_detected": False}


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    box = Outbox(tmp_path / "state" / "outbox.db")
    yield box
    box.close()


def drain(box: Outbox, url: str) -> list[dict[str, Any]]:
    """Seal and acknowledge every unit of ``url``, returning the decoded bodies in send order."""
    out = []
    while (unit := box.next_unit(url)) is not None:
        out.append(json.loads(unit.body))
        box.mark_delivered(unit)
    return out


def run_child(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.mark.timeout(30)
def test_consecutive_generated_batches_merge_in_order(outbox: Outbox) -> None:
    outbox.put("generated", URL, gen([1, 2]))
    outbox.put("generated", URL, gen([3]))
    outbox.put("generated", URL, gen([4, 5]))
    assert outbox.pending_count() == 3
    unit = outbox.next_unit(URL)
    assert unit is not None
    body = json.loads(unit.body)
    assert list(body) == ["public_key", "block_hash", "block_height", "nonces", "dist", "node_id"]
    assert body["nonces"] == [1, 2, 3, 4, 5]
    assert body["dist"] == [0.501, 0.502, 0.503, 0.504, 0.505]
    assert (unit.members, unit.nonces, unit.target) == (3, 5, f"{URL}/generated")
    assert outbox.pending_count() == 3 and outbox.stats()["pending_units"] == 1


@pytest.mark.timeout(30)
def test_merging_stops_at_a_different_key_or_a_validated_batch(outbox: Outbox) -> None:
    outbox.put("generated", URL, gen([1]))
    outbox.put("generated", URL, gen([2], block_hash="OTHER"))
    outbox.put("generated", URL, gen([3], block_hash="OTHER"))
    outbox.put("validated", URL, validated([10]))
    outbox.put("validated", URL, validated([11]))
    outbox.put("generated", URL, gen([4], node_id=2))
    outbox.put("generated", URL, gen([5], node_id=2))
    outbox.put("generated", URL, gen([6], height=8, node_id=2))
    bodies = drain(outbox, URL)
    assert [b["nonces"] for b in bodies] == [[1], [2, 3], [10], [11], [4, 5], [6]]
    assert [b["block_hash"] for b in bodies[:2]] == ["9F3C", "OTHER"]
    assert "received_dist" in bodies[2] and "received_dist" in bodies[3]
    assert outbox.pending_count() == 0
    assert outbox.stats()["delivered"] == 8


@pytest.mark.timeout(30)
def test_urls_are_separate_queues_in_put_order(outbox: Outbox) -> None:
    outbox.put("generated", URL, gen([1]))
    outbox.put("generated", OTHER_URL, gen([2]))
    outbox.put("generated", URL, gen([3]))
    assert outbox.pending_urls() == [URL, OTHER_URL]
    assert [b["nonces"] for b in drain(outbox, OTHER_URL)] == [[2]]
    assert [b["nonces"] for b in drain(outbox, URL)] == [[1, 3]]
    assert outbox.pending_urls() == []


@pytest.mark.timeout(30)
def test_a_sealed_unit_keeps_its_bytes_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.put("generated", URL, gen([1]))
    box.put("generated", URL, gen([2]))
    first = box.next_unit(URL)
    assert first is not None
    box.record_failure(first, "HTTP 503")
    box.put("generated", URL, gen([3]))  # arrives after sealing: must not change the sealed bytes
    box.close()

    box = Outbox(path)
    again = box.next_unit(URL)
    assert again is not None
    assert (again.id, again.body, again.attempts) == (first.id, first.body, 1)
    box.mark_delivered(again)
    later = box.next_unit(URL)
    assert later is not None and json.loads(later.body)["nonces"] == [3]
    box.close()


@pytest.mark.timeout(30)
def test_merge_size_is_capped(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_merged_nonces=4)
    for start in range(0, 9, 3):
        box.put("generated", URL, gen([start, start + 1, start + 2]))
    assert [b["nonces"] for b in drain(box, URL)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    box.close()


@pytest.mark.timeout(30)
def test_dead_letter_and_counters_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    box.put("validated", URL, validated([1]))
    box.put("generated", URL, gen([2]))
    unit = box.next_unit(URL)
    assert unit is not None
    assert box.record_failure(unit, "HTTP 500") == 1
    assert box.record_failure(unit, "HTTP 500") == 2
    box.dead_letter(unit, 400, "HTTP 400: bad batch")
    ok = box.next_unit(URL)
    assert ok is not None
    box.mark_delivered(ok)
    box.close()

    box = Outbox(path)
    stats = box.stats()
    assert {k: stats[k] for k in ("pending", "delivered", "sends", "failures", "dead")} == {
        "pending": 0, "delivered": 1, "sends": 1, "failures": 2, "dead": 1}
    assert stats["last_success_ts"] is not None and stats["last_success_ts"] <= time.time()
    (dead,) = box.dead_letters()
    assert (dead["id"], dead["kind"], dead["status"], dead["attempts"]) == (unit.id, "validated", 400, 3)
    assert dead["body"] == unit.body
    box.close()


@pytest.mark.timeout(30)
def test_oldest_age_reflects_the_oldest_pending_batch(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_000_000.0]  # the outbox's wall clock, moved by the test
    monkeypatch.setattr(outbox_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    assert outbox.stats()["oldest_age_s"] == 0.0
    outbox.put("generated", URL, gen([1]))
    now[0] += 5.0
    outbox.put("generated", URL + "/other", gen([2]))
    assert outbox.stats()["oldest_age_s"] == pytest.approx(5.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("kind", "url", "batch", "field"),
    [
        ("pushed", URL, gen([1]), "kind"),
        ("generated", "ftp://x/y", gen([1]), "url"),
        ("generated", "not a url", gen([1]), "url"),
        ("generated", URL, [1, 2], "batch must be a JSON object"),
        ("generated", URL, {k: v for k, v in gen([1]).items() if k != "node_id"}, "node_id"),
        ("generated", URL, {**gen([1, 2]), "dist": [0.1]}, "batch.dist"),
        ("generated", URL, {**gen([1]), "nonces": ["1"]}, "batch.nonces[0]"),
        ("generated", URL, {**gen([1]), "block_height": "7"}, "batch.block_height"),
        ("generated", URL, {**gen([1, 2]), "dist": [0.1, float("nan")]}, "batch.dist[1]"),
        ("validated", URL, {**validated([1]), "probability_honest": float("inf")}, "probability_honest"),
        ("validated", URL, {"x": object()}, "not JSON-serialisable"),
    ],
)
def test_bad_batches_are_refused_naming_the_field(
    outbox: Outbox, kind: Any, url: str, batch: Any, field: str
) -> None:
    with pytest.raises(InvalidRequest, match=field.replace("[", r"\[").replace("]", r"\]")):
        outbox.put(kind, url, batch)
    assert outbox.pending_count() == 0


@pytest.mark.timeout(30)
def test_concurrent_puts_from_threads_are_all_kept(outbox: Outbox) -> None:
    def worker(base: int) -> None:
        for i in range(25):
            outbox.put("generated", URL, gen([base + i]))

    threads = [threading.Thread(target=worker, args=(1000 * t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    nonces = [n for body in drain(outbox, URL) for n in body["nonces"]]
    assert sorted(nonces) == sorted(1000 * t + i for t in range(4) for i in range(25))
    for t in range(4):  # each thread's batches keep their relative order
        mine = [n for n in nonces if n // 1000 == t]
        assert mine == sorted(mine)


# --- bad paths and corrupt files ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_garbage_file_is_a_clear_config_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not sqlite at all" * 200)
    with pytest.raises(ConfigError, match=r"outbox .*outbox\.db is not a valid outbox database"):
        Outbox(path)
    assert path.read_bytes() == b"this is not sqlite at all" * 200  # left for the operator


@pytest.mark.timeout(30)
def test_damaged_pages_are_detected_at_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    for i in range(300):
        box.put("generated", URL, gen(list(range(i, i + 20))))
    box.close()
    size = path.stat().st_size
    assert size > 8 * 4096
    with path.open("r+b") as handle:  # overwrite the middle of the file, keep the header
        handle.seek(size // 2)
        handle.write(b"\xff" * 3 * 4096)
    with pytest.raises(ConfigError, match=r"outbox .*(corrupt|not a valid outbox)"):
        Outbox(path)


@pytest.mark.timeout(30)
def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE unrelated (x)")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="schema version 0"):
        Outbox(path)


@pytest.mark.timeout(30)
def test_unusable_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        Outbox(tmp_path)
    blocker = tmp_path / "state"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="state is a file, not a directory"):
        Outbox(blocker / "sub" / "outbox.db")


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_state_dir_is_unavailable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o500)
    try:
        with pytest.raises(Unavailable, match=r"outbox .*o\.db cannot be opened for writing"):
            Outbox(state / "o.db")
    finally:
        state.chmod(0o700)


@pytest.mark.timeout(30)
def test_closed_outbox_refuses_puts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.close()
    with pytest.raises(Unavailable, match="closed"):
        box.put("generated", URL, gen([1]))


_DISK_FULL_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from node.errors import Unavailable
from node.logging import configure
from services.pow.outbox import Outbox
configure("test", "critical")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-limit writes then fail with EFBIG, like a full disk
path = Path(sys.argv[1])
box = Outbox(path)
def batch(i):
    return {"public_key": "pk", "block_hash": "bh", "block_height": 1,
            "nonces": list(range(i * 1000, i * 1000 + 400)), "dist": [0.25] * 400, "node_id": 1}
first = [box.put("generated", "http://127.0.0.1:9/cb", batch(i)) for i in range(3)]
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
biggest = max(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 60_000, hard))
stored, error = 0, None
for i in range(3, 200):
    try:
        box.put("generated", "http://127.0.0.1:9/cb", batch(i))
        stored += 1
    except Unavailable as exc:
        error = exc.message
        break
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
after = box.put("generated", "http://127.0.0.1:9/cb", batch(500))
print(json.dumps({"first": first, "stored": stored, "error": error, "after": after}))
"""


@pytest.mark.timeout(60)
def test_disk_full_raises_unavailable_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    done = run_child(_DISK_FULL_CHILD, str(path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] is not None, "the size limit was never hit"
    assert "cannot store batch" in report["error"] and "full or read-only" in report["error"]
    assert "\n" not in report["error"]
    box = Outbox(path)  # opens with a quick_check: nothing stored got corrupted
    expected = 3 + report["stored"] + 1
    assert box.pending_count() == expected
    nonces = [n for body in drain(box, "http://127.0.0.1:9/cb") for n in body["nonces"]]
    stored_batches = [*range(3 + report["stored"]), 500]
    assert nonces == [n for i in stored_batches for n in range(i * 1000, i * 1000 + 400)]
    box.close()


_PUT_FOREVER_CHILD = r"""
import sys
from pathlib import Path
from node.logging import configure
from services.pow.outbox import Outbox
configure("test", "critical")
box = Outbox(Path(sys.argv[1]))
i = 0
while True:
    kind = "validated" if i % 7 == 3 else "generated"
    box.put(kind, "http://127.0.0.1:9/cb", {"public_key": "pk", "block_hash": "bh", "block_height": 1,
            "nonces": [i], "dist": [0.5], "node_id": 1})
    if i % 5 == 0:
        box.next_unit("http://127.0.0.1:9/cb")  # seal and merge mid-stream too
    print(i, flush=True)
    i += 1
"""


@pytest.mark.timeout(60)
def test_kill_9_mid_stream_loses_no_acknowledged_batch(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _PUT_FOREVER_CHILD, str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    acknowledged: list[int] = []
    try:
        for line in child.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) >= 150:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert len(acknowledged) == 150, child.stderr.read() if child.stderr else ""

    box = Outbox(path)  # recovers the WAL left by the killed writer
    nonces = [n for body in drain(box, "http://127.0.0.1:9/cb") for n in body["nonces"]]
    assert nonces == sorted(nonces) and len(nonces) == len(set(nonces))
    assert set(acknowledged) <= set(nonces)
    assert nonces == list(range(len(nonces)))
    box.close()
