"""The train service's own pieces: run options split from the client body, the journal, the digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from node.errors import InvalidRequest
from node.identity import KeyPair
from services.gateway.resources.service_routes import ROUTES
from services.train.journal import PeerStore, RunJournal
from services.train.peers import PeerRegistry
from services.train.runner import weights_digest
from services.train.service import DEFAULT_PEER_TIMEOUT_S, split_run_options


def test_peer_timeout_comes_from_the_config_or_the_env_and_leaves_no_trace() -> None:
    body: dict[str, Any] = {"train_config": {"diloco": {"inner_steps": 5, "peer_timeout_s": 2.5}},
                            "train_env": {"TASK_ID": "7"}}
    clean, timeout = split_run_options(body)
    assert timeout == 2.5 and clean["train_config"]["diloco"] == {"inner_steps": 5}
    assert body["train_config"]["diloco"]["peer_timeout_s"] == 2.5, "the caller's body is not modified"
    clean, timeout = split_run_options({"train_env": {"PEER_TIMEOUT_S": "0.5"}})
    assert timeout == 0.5 and clean["train_env"] == {}
    assert split_run_options({})[1] == DEFAULT_PEER_TIMEOUT_S


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"train_config": {"diloco": {"peer_timeout_s": "soon"}}}, "train_config.diloco.peer_timeout_s"),
        ({"train_config": {"diloco": {"peer_timeout_s": 0}}}, "train_config.diloco.peer_timeout_s"),
        ({"train_config": {"diloco": {"peer_timeout_s": True}}}, "train_config.diloco.peer_timeout_s"),
        ({"train_env": {"PEER_TIMEOUT_S": "ten"}}, "train_env.PEER_TIMEOUT_S"),
        ([1, 2], "request body"),
    ],
)
def test_a_bad_peer_timeout_is_refused_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(InvalidRequest, match=field.replace(".", r"\.")):
        split_run_options(body)


def test_the_run_journal_round_trips_and_ignores_garbage(tmp_path: Path) -> None:
    journal = RunJournal(tmp_path)
    assert journal.load() is None
    journal.save({"train_env": {"TASK_ID": "7"}})
    assert journal.load() == {"train_env": {"TASK_ID": "7"}}
    journal.path.write_text("{not json")
    assert journal.load() is None
    journal.clear()
    assert not journal.path.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_peer_store_restores_a_registry(tmp_path: Path) -> None:
    registry = PeerRegistry()
    key = KeyPair.generate()
    registry.register({"task_id": "7", "peers": [{"node_id": "a", "public_key": key.public_hex,
                                                   "address": "10.0.0.5:5565", "rank": 0}]})
    store = PeerStore(tmp_path)
    store.save(registry.list_peers(None))
    restored = PeerRegistry()
    for task in store.load():
        restored.register({"task_id": task["task_id"], "peers": task["peers"], "replace": True})
    assert restored.list_peers(None) == registry.list_peers(None)
    assert restored.peers("7")[0].public_key == key.public


def test_the_weights_digest_sees_every_bit() -> None:
    weights = [torch.zeros(3, 2), torch.ones(4)]
    same = [t.clone() for t in weights]
    assert weights_digest(weights) == weights_digest(same)
    same[1][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert weights_digest(weights) != weights_digest(same)


def test_peer_routes_are_exempt_from_the_409_rule_and_claim_nothing() -> None:
    rows = {(r.method, r.path): r for r in ROUTES if r.path.startswith("/api/v1/train/peers")}
    assert set(rows) == {("POST", "/api/v1/train/peers"), ("GET", "/api/v1/train/peers"),
                         ("POST", "/api/v1/train/peers/remove")}
    assert all(not r.guarded and not r.claims for r in rows.values())
    assert rows[("GET", "/api/v1/train/peers")].query == ("task_id",)
    # The only others exempt: the model cache and the outbox's dead letters (they run nothing and answer
    # in every mode).
    exempt = ("/api/v1/train/peers", "/api/v1/models", "/api/v1/pow/outbox/dead")
    assert all(r.guarded for r in ROUTES if not r.path.startswith(exempt))
    (dead,) = (r for r in ROUTES if r.path == "/api/v1/pow/outbox/dead")
    assert not dead.guarded and not dead.claims
