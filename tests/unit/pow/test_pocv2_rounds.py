"""pow's v2 round logic against small real HTTP engines (no node): fan-out, loops, jobs, stop, resume."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts.checked import convert
from contracts.pow_v2 import Generate, InitGenerate, JobQuery
from node.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    Overloaded,
    Unavailable,
    Unprocessable,
    UpstreamFailed,
)
from services.pow.outbox import Outbox
from services.pow.v2.engine import Computed, EngineClient, EngineRefused, parse_answer
from services.pow.v2.rounds import PocRounds
from services.pow.v2.worker import MAX_QUEUED_NONCES
from tests.support.pocv2 import golden
from tests.support.pocv2_fake_engine import FakeEngine, fake_vector
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)

MODEL = "pocv2-tiny-qwen3"
URL = "http://127.0.0.1:9/v2/poc-batches/Qwen%252FQwen3"
INIT = {"block_hash": "AB" * 32, "block_height": 77, "public_key": "02" + "cd" * 32, "node_id": 2,
        "node_count": 3, "params": {"model": MODEL, "seq_len": 16}, "url": URL, "batch_size": 4}


class Inference:
    """Stands in for the inference service's ``status`` bus answer."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.served = [MODEL]

    async def request(self, kind: str, payload: Any = None, *, timeout: float = 10.0) -> Any:
        assert kind == "status"
        return {"backends": [f"http://127.0.0.1:{p}" for p in reversed(self.ports)],
                "instances": [{"port": p} for p in self.ports], "served_models": self.served, "model": "/m"}


@pytest.fixture
def engines() -> Iterator[list[FakeEngine]]:
    made = [FakeEngine(), FakeEngine()]
    yield sorted(made, key=lambda e: e.port)
    for e in made:
        e.close()


@pytest.fixture
async def rounds(tmp_path: Path, engines: list[FakeEngine]) -> AsyncIterator[PocRounds]:
    outbox = Outbox(tmp_path / "outbox.db")
    r = PocRounds(outbox, tmp_path / "v2", Inference([e.port for e in engines]), EngineClient(timeout_s=10))
    yield r
    await r.stop_all()
    await r.close()
    outbox.close()


def init(body: dict[str, Any]) -> InitGenerate:
    return convert(body, InitGenerate)


def gen(body: dict[str, Any]) -> Generate:
    return convert(body, Generate)


def job(request_id: str) -> JobQuery:
    return JobQuery(request_id)


def processed(rounds: PocRounds, port: int) -> int:
    loop = rounds.workers[port].loop
    return loop.processed if loop is not None else -1


def queued(outbox: Outbox) -> list[tuple[str, str, dict[str, Any]]]:
    rows = outbox._read("SELECT kind, url, body FROM queue ORDER BY id")
    return [(kind, url, json.loads(body)) for kind, url, body in rows]


async def test_init_fans_out_by_port_with_dense_sequences(
        rounds: PocRounds, engines: list[FakeEngine]) -> None:
    answer = await rounds.init_generate(init(INIT))
    ports = [e.port for e in engines]
    assert answer == {"status": "OK", "backends": 2, "n_groups": 2, "errors": None,
                      "results": [{"port": ports[0], "status": "OK"}, {"port": ports[1], "status": "OK"}]}
    await until(lambda: all(processed(rounds, e.port) >= 12 for e in engines), what="three batches each")
    status = await rounds.status()
    assert status["status"] == "GENERATING"
    assert [b["port"] for b in status["backends"]] == ports
    first = status["backends"][0]
    assert first["config"] == {"block_hash": INIT["block_hash"], "block_height": 77,
                               "public_key": INIT["public_key"], "node_id": 2, "node_count": 3,
                               "group_id": 0, "n_groups": 2, "seq_len": 16, "k_dim": 12}
    assert first["stats"]["total_processed"] >= 12 and first["stats"]["nonces_per_second"] > 0
    assert (await rounds.stop())["results"] == [{"port": p, "status": "stopped"} for p in ports]
    assert (await rounds.status())["status"] == "IDLE"
    for group_id, engine in enumerate(engines):
        seen = engine.nonces()
        # nonce_x = node_id + group_id*node_count + x*(n_groups*node_count), from x = 0, in order
        assert seen == [2 + group_id * 3 + x * 6 for x in range(len(seen))]
        call = engine.calls[0]
        assert call["method"] == "mlnode_poc_artifacts"
        assert call["kwargs"] == {"block_hash": INIT["block_hash"], "public_key": INIT["public_key"],
                                  "nonces": seen[:4], "seq_len": 16, "k_dim": 12, "stronger_rng": False}
    sent = queued(rounds.outbox)
    assert sent and all(kind == "generated" and url == URL for kind, url, _ in sent)
    body = sent[0][2]
    assert set(body) == {"public_key", "block_hash", "block_height", "node_id", "artifacts", "encoding"}
    assert body["encoding"] == {"dtype": "f16", "k_dim": 12, "endian": "le"}
    art = body["artifacts"][0]
    assert art["vector_b64"] == fake_vector(INIT["block_hash"], INIT["public_key"], art["nonce"])
    unit = rounds.outbox.next_unit(URL)  # batches of one loop fold into one POST, artifacts appended
    assert unit is not None and unit.target == URL + "/generated"
    assert len(json.loads(unit.body)["artifacts"]) >= 8


async def test_a_second_init_is_refused_per_engine(rounds: PocRounds) -> None:
    await rounds.init_generate(init(INIT))
    with pytest.raises(UpstreamFailed) as info:
        await rounds.init_generate(init(INIT))
    assert [e["error"] for e in info.value.details["detail"]["errors"]] == ["Already generating"] * 2


async def test_refusals(rounds: PocRounds) -> None:
    with pytest.raises(Conflict, match="not served"):
        await rounds.init_generate(init({**INIT, "params": {"model": "other", "seq_len": 16}}))
    with pytest.raises(Unprocessable):
        await rounds.init_generate(init({**INIT, "params": {"model": MODEL, "seq_len": 16, "decode": True}}))
    for bad in ("nope", "x:123", "50:"):
        with pytest.raises((InvalidRequest, NotFound)):
            await rounds.job_status(job(bad))
    rounds.inference.ports = []  # type: ignore[attr-defined]
    with pytest.raises(Unavailable, match="No vLLM backends available"):
        await rounds.init_generate(init(INIT))
    assert await rounds.status() == {"status": "NO_BACKENDS", "backends": []}
    assert await rounds.stop() == {"status": "OK", "message": "No backends to stop"}


async def test_generate_jobs_round_robin_wait_for_the_loop_and_validate(
        rounds: PocRounds, engines: list[FakeEngine]) -> None:
    case = golden()["validation"][0]
    honest = {a["nonce"]: a["vector_b64"] for a in case["honest_artifacts"]}
    for e in engines:
        e.known.update(honest)
    request = {**case["go_request_example"], "url": URL}
    await rounds.init_generate(init(INIT))
    first = await rounds.generate(gen(request))
    assert first["status"] == "queued" and first["queued_count"] == 10
    port, _ = first["request_id"].split(":")
    assert int(port) == engines[0].port
    second = await rounds.generate(gen({**request, "validation": {"artifacts": []}, "nonces": []}))
    assert second["request_id"].startswith(f"{engines[1].port}:")
    # The loops are on: the jobs wait.
    await until(lambda: all(len(e.nonces()) >= 8 for e in engines), what="loops running")
    assert (await rounds.job_status(job(first["request_id"])))["status"] == "queued"
    for e in engines:  # end the loops without a stop (a stop would drop the jobs)
        await rounds.workers[e.port]._end_loop(rounds.workers[e.port].loop, "test")  # type: ignore[arg-type]
    last: dict[str, Any] = {}

    async def done() -> bool:
        last.update(await rounds.job_status(job(first["request_id"])))
        return last["status"] not in ("queued", "running")

    await until(done, 30, what="the job left queued/running")
    view = dict(last)
    expected = case["results"][0]["expected"]
    assert view == {"status": "completed", "request_id": first["request_id"], **expected} | {
        "p_value": pytest.approx(expected["p_value"], abs=1e-9)}
    job_id = first["request_id"].split(":")[1]
    validated = [b for kind, _, b in queued(rounds.outbox)
                 if kind == "validated" and b["request_id"] == job_id]
    head = {"request_id": job_id, "block_hash": request["block_hash"], "block_height": 1000,
            "public_key": request["public_key"], "node_id": 3}
    assert validated == [{**head, **expected, "p_value": pytest.approx(expected["p_value"], abs=1e-9)}]


async def test_wait_answers_the_artifacts_in_request_order(
        rounds: PocRounds, engines: list[FakeEngine]) -> None:
    engines[0].drop.add(5)
    body = {**INIT, "nonces": [9, 5, 1, 9], "wait": True, "url": ""}
    answer = await rounds.generate(gen(body))
    assert answer["status"] == "completed" and ":" not in answer["request_id"]
    assert [a["nonce"] for a in answer["artifacts"]] == [9, 1, 9]
    assert answer["encoding"] == {"dtype": "f16", "k_dim": 12, "endian": "le"}
    assert engines[0].nonces() == [9, 5, 1]  # each distinct nonce computed once
    assert queued(rounds.outbox) == []  # no url: nothing to report
    engines[1].refuse = 400
    with pytest.raises(InvalidRequest, match="refused the PoC call"):
        await rounds.generate(gen(body))


async def test_queue_full_is_429(rounds: PocRounds, engines: list[FakeEngine]) -> None:
    await rounds.init_generate(init(INIT))  # keeps the jobs queued
    big = {**INIT, "nonces": list(range(MAX_QUEUED_NONCES)), "url": ""}
    await rounds.generate(gen(big))
    await rounds.generate(gen({**big, "nonces": [1]}))  # the other engine
    with pytest.raises(Overloaded, match=r"^Queue full: "):
        await rounds.generate(gen({**big, "nonces": [1]}))


async def test_too_many_queued_jobs_is_429(tmp_path: Path, engines: list[FakeEngine]) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    r = PocRounds(outbox, tmp_path / "v2", Inference([e.port for e in engines]), EngineClient(timeout_s=10),
                  max_queued_jobs=3)
    try:
        await r.init_generate(init(INIT))  # keeps the jobs queued
        for n in range(6):  # round robin: three on each engine
            await r.generate(gen({**INIT, "nonces": [n], "url": ""}))
        with pytest.raises(Overloaded, match="MLNODE_POCV2_MAX_QUEUED_JOBS 3"):
            await r.generate(gen({**INIT, "nonces": [9], "url": ""}))
    finally:
        await r.stop_all()
        await r.close()
        outbox.close()


async def test_stop_drops_jobs_but_keeps_what_is_in_the_outbox(rounds: PocRounds) -> None:
    await rounds.init_generate(init(INIT))
    queued_job = await rounds.generate(gen({**INIT, "nonces": [1, 2]}))
    await until(lambda: len(queued(rounds.outbox)) >= 2, what="some batches in the outbox")
    await rounds.stop()
    assert (await rounds.job_status(job(queued_job["request_id"])))["status"] == "cancelled"
    assert queued(rounds.outbox)  # what was computed is still owed to the receiver
    assert not list((rounds.journal.jobs).glob("*.json")) and not list(rounds.journal.loops.glob("*.json"))


async def test_an_engine_that_refuses_ends_its_loop(rounds: PocRounds, engines: list[FakeEngine]) -> None:
    engines[1].refuse = 422
    await rounds.init_generate(init(INIT))
    await until(lambda: rounds.workers[engines[1].port].loop is None, what="the refused loop ended")
    status = await rounds.status()
    assert status["status"] == "MIXED" and "refused" in status["backends"][1]["error"]


async def test_a_restarted_pow_resumes_loops_and_jobs(tmp_path: Path, engines: list[FakeEngine]) -> None:
    inference = Inference([e.port for e in engines])
    outbox = Outbox(tmp_path / "outbox.db")
    first = PocRounds(outbox, tmp_path / "v2", inference, EngineClient(timeout_s=10))
    await first.init_generate(init(INIT))
    accepted = await first.generate(gen({**INIT, "nonces": [100, 101]}))
    await until(lambda: all(len(e.nonces()) >= 8 for e in engines), what="loops running")
    await first.close()  # a crash keeps the journal (close() does not touch it)
    done = {e.port: len(e.nonces()) for e in engines}
    second = PocRounds(outbox, tmp_path / "v2", inference, EngineClient(timeout_s=10))
    await second.resume(in_inference=True)
    try:
        await until(lambda: all(len(e.nonces()) >= done[e.port] + 8 for e in engines), what="loops resumed")
        for group_id, e in enumerate(engines):
            seen = [n for n in e.nonces() if n not in (100, 101)]
            # The sequence continues: at most the batch in flight at the crash is computed twice.
            assert sorted(set(seen)) == [2 + group_id * 3 + x * 6 for x in range(len(set(seen)))]
        port = int(accepted["request_id"].split(":")[0])
        assert second.workers[port].queue[0].id == accepted["request_id"].split(":")[1]
    finally:
        await second.stop_all()
        await second.close()
    third = PocRounds(outbox, tmp_path / "v2", inference, EngineClient(timeout_s=10))
    await third.resume(in_inference=False)
    assert third.workers == {}
    await third.close()
    outbox.close()


def test_engine_answers_are_checked() -> None:
    ok = b'{"results": [null, {"artifacts": [{"nonce": 3, "vector_b64": "AAAA"}], "dropped": [4, 9]}]}'
    assert parse_answer(ok, 1, [3, 4]) == Computed({3: "AAAA"}, [4])
    with pytest.raises(EngineRefused, match="seq_len too large"):
        parse_answer(b'{"results": [{"error": "seq_len too large"}]}', 1, [3])
    two = b'{"results": [{"artifacts": [], "dropped": []}, {"artifacts": []}]}'
    unasked = b'{"results": [{"artifacts": [{"nonce": 5, "vector_b64": "AAAA"}]}]}'
    for bad in (b'{"results": [null, null]}', two, unasked, b"[]", b"{"):
        with pytest.raises(Unavailable):
            parse_answer(bad, 1, [3])


async def test_a_loop_ends_when_its_engine_goes_away_or_changes_model(
        rounds: PocRounds, engines: list[FakeEngine]) -> None:
    await rounds.init_generate(init(INIT))
    await until(lambda: all(processed(rounds, e.port) >= 4 for e in engines), what="loops running")
    inference = rounds.inference
    inference.ports = [engines[0].port]  # type: ignore[attr-defined]  # engine 1: inference/down
    engines[1].refuse = 503
    await until(lambda: rounds.workers[engines[1].port].loop is None, what="the gone engine's loop ended")
    assert rounds.workers[engines[0].port].loop is not None
    inference.served = ["another-model"]  # type: ignore[attr-defined]  # up replaced the model
    engines[0].refuse = 503
    await until(lambda: rounds.workers[engines[0].port].loop is None, what="the replaced model's loop ended")
    assert "another model" in (await rounds.status())["backends"][0]["error"]
