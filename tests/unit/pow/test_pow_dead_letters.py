"""Dead letters are visible to operators: the pow service's read-only answer (the reply contract of
``GET /api/v1/pow/outbox/dead``) and a gauge in ``/metrics``, each checked with a real dead letter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.pow import DeadLetters
from node import config
from node.errors import InvalidRequest
from node.identity import ensure_node_keys, role_keys
from node.registry import POW, samples
from services.gateway import openapi
from services.gateway.auth import OPEN_PATHS
from services.pow.service import PowService

URL = "http://operator:secret@127.0.0.1:9/v1/poc-batches"
BATCH = {"public_key": "02ab", "block_hash": "9F3C", "block_height": 7, "nonces": [1, 2], "dist": [0.1, 0.2],
         "node_id": 0}


@pytest.fixture
def service(tmp_path: Path) -> Iterator[PowService]:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path / "state")})
    config.ensure_dirs(settings)
    ensure_node_keys(settings.keys_dir)
    svc = PowService(settings, role_keys(settings.keys_dir, "pow", with_identity=False))
    yield svc
    svc.outbox.close()
    svc.bus.close()


def refuse_one(svc: PowService) -> int:
    """Queue a batch and dead-letter it the way delivery does when the receiver answers 422."""
    svc.outbox.put("generated", URL, BATCH)
    unit = svc.outbox.next_unit(URL)
    assert unit is not None
    svc.outbox.dead_letter(unit, 422, "HTTP 422: unknown block")
    return unit.id


def dead(svc: PowService, body: Any) -> DeadLetters:
    return msgspec.convert(asyncio.run(svc._dead_letters(body, None)), DeadLetters, strict=True)  # type: ignore[arg-type]


def test_an_operator_reads_a_dead_letter_without_the_url_credentials(service: PowService) -> None:
    assert dead(service, None) == DeadLetters(total=0, dead_letters=[])
    unit_id = refuse_one(service)
    answer = dead(service, {"limit": "10"})
    assert answer.total == 1
    (letter,) = answer.dead_letters
    assert (letter.id, letter.kind, letter.status, letter.reason, letter.members) == (
        unit_id, "generated", 422, "HTTP 422: unknown block", 1)
    assert letter.url == "http://127.0.0.1:9/v1/poc-batches" and letter.body_bytes > 0
    assert letter.created <= letter.dead_at


@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1"])
def test_a_limit_out_of_range_is_refused(service: PowService, limit: str) -> None:
    with pytest.raises(InvalidRequest, match="limit must be an integer from 1 to 1000"):
        dead(service, {"limit": limit})


def test_the_dead_letters_held_are_a_gauge_in_metrics(service: PowService) -> None:
    def gauge() -> float:
        status = asyncio.run(service._status(None, None))  # type: ignore[arg-type]
        (sample,) = [s for s in samples(POW, {"status": status})
                     if s.name == "mlnode_pow_outbox_dead_letters"]
        assert sample.kind == "gauge"
        return sample.value

    assert gauge() == 0
    refuse_one(service)
    assert gauge() == 1


def test_the_route_is_documented_with_its_reply_contract() -> None:
    op = openapi.document("1.0")["paths"]["/api/v1/pow/outbox/dead"]["get"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/DeadLetters"}
    assert "/api/v1/pow/outbox/dead" not in OPEN_PATHS  # token-gated like every management route
