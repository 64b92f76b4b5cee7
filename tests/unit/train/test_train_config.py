"""The client's training payload maps onto a TrainPlan exactly, with notes for what we drop."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from node.errors import InvalidRequest
from services.train.config import TrainPlan

# The contract's example, verbatim.
EXAMPLE: dict[str, Any] = {
    "train_config": {
        "project": "1B-ft-xlam",
        "name": "refactor test 3090",
        "description": "3090 micro bs2",
        "group": "base",
        "tags": ["1x1", "no-diloco"],
        "train": {"micro_bs": 2, "eval_interval": 50},
        "data": {"seq_length": 1024},
        "optim": {
            "sched_type": "cosine",
            "batch_size": 32,
            "warmup_steps": 50,
            "total_steps": 6000,
            "adam_betas1": 0.9,
            "adam_betas2": 0.95,
            "weight_decay": 0.1,
            "lr": 5e-6,
        },
        "diloco": {"inner_steps": 50},
        "ckpt": {"interval": 1000, "topk": 6, "path": "outputs/1B_4x1-lr"},
    },
    "train_env": {
        "TASK_ID": "7",
        "NODE_ID": "gonka1abc…/node-1",
        "STORE_API_URL": "api-private:9300",
        "GLOBAL_ADDR": "10.0.0.5",
        "GLOBAL_PORT": "5565",
        "GLOBAL_RANK": "1",
        "GLOBAL_UNIQUE_ID": "1",
        "GLOBAL_WORLD_SIZE": "3",
        "BASE_PORT": "10001",
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """The example with one dotted path set (or deleted when value is ...)."""
    body = copy.deepcopy(EXAMPLE)
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return body


def test_contract_example_maps_every_field(tmp_path: Path) -> None:
    plan, notes = TrainPlan.from_request(EXAMPLE, state_dir=tmp_path)
    assert plan.diloco.inner_steps == 50
    assert (plan.diloco.outer_lr, plan.diloco.outer_momentum, plan.diloco.nesterov) == (0.7, 0.9, True)
    assert plan.diloco.compression == "none"
    o = plan.optim
    assert (o.lr, o.weight_decay, o.adam_betas1, o.adam_betas2) == (5e-6, 0.1, 0.9, 0.95)
    assert (o.warmup_steps, o.total_steps, o.sched_type) == (50, 6000, "cosine")
    assert (o.batch_size, o.micro_bs, o.grad_accum_steps) == (32, 2, 16)
    assert plan.data.seq_length == 1024 and plan.data.paths == ()
    assert plan.ckpt.interval == 1000 and plan.ckpt.topk == 6
    assert Path(plan.ckpt.path) == tmp_path.resolve() / "outputs" / "1B_4x1-lr"
    e = plan.env
    assert (e.rank, e.world_size, e.global_addr, e.global_port, e.base_port) == (
        1,
        3,
        "10.0.0.5",
        5565,
        10001,
    )
    assert (e.task_id, e.node_id, e.unique_id) == ("7", "gonka1abc…/node-1", "1")
    assert e.rendezvous == ("10.0.0.5", 5565)
    assert plan.outer_rounds == 120
    assert sorted(notes) == sorted(
        [
            "ignored: train_config.project (run metadata; no experiment tracker here)",
            "ignored: train_config.name (run metadata; no experiment tracker here)",
            "ignored: train_config.description (run metadata; no experiment tracker here)",
            "ignored: train_config.group (run metadata; no experiment tracker here)",
            "ignored: train_config.tags (run metadata; no experiment tracker here)",
            "ignored: train_config.train.eval_interval (no evaluation loop; training loss is reported)",
            "ignored: train_env.STORE_API_URL (checkpoints stay on this node)",
        ]
    )


def test_plan_round_trips_through_json_and_msgpack(tmp_path: Path) -> None:
    plan, _ = TrainPlan.from_request(
        _with("train_config.data.path", ["corpus", "more/a.txt"]), state_dir=tmp_path
    )
    assert plan.data.paths == (str(tmp_path.resolve() / "corpus"), str(tmp_path.resolve() / "more" / "a.txt"))
    assert TrainPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert TrainPlan.from_dict(msgpack.unpackb(msgpack.packb(plan.to_dict()))) == plan


def test_unknown_keys_are_notes_not_errors(tmp_path: Path) -> None:
    body = _with("train_config.optim.fancy", 1)
    body["extra"] = True
    plan, notes = TrainPlan.from_request(body, state_dir=tmp_path)
    assert "ignored: train_config.optim.fancy (unknown key)" in notes
    assert "ignored: extra (unknown key)" in notes
    assert plan.optim.lr == 5e-6


def test_empty_body_gives_a_runnable_single_node_plan(tmp_path: Path) -> None:
    plan, notes = TrainPlan.from_request({}, state_dir=tmp_path)
    assert notes == []
    assert (plan.env.rank, plan.env.world_size, plan.env.rendezvous) == (0, 1, None)
    assert Path(plan.ckpt.path) == tmp_path.resolve() / "checkpoints" / "task-local"


def test_overrides_outer_optimizer_and_model(tmp_path: Path) -> None:
    diloco = {"inner_steps": 10, "outer_lr": 0.5, "outer_momentum": 0.8, "compression": "int8"}
    body = _with("train_config.diloco", diloco)
    body["train_config"]["model"] = {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 1, "seed": 9}
    plan, _ = TrainPlan.from_request(body, state_dir=tmp_path)
    assert (plan.diloco.inner_steps, plan.diloco.outer_lr, plan.diloco.outer_momentum) == (10, 0.5, 0.8)
    assert plan.diloco.compression == "int8" and TrainPlan.from_dict(plan.to_dict()) == plan
    assert (plan.model.dim, plan.model.n_kv_heads, plan.model.seed, plan.model.ffn_hidden) == (32, 1, 9, 96)


def test_int_env_values_are_accepted_and_integers_stay_integers(tmp_path: Path) -> None:
    body = copy.deepcopy(EXAMPLE)
    body["train_env"]["GLOBAL_RANK"] = 2
    body["train_env"]["GLOBAL_PORT"] = " 5565 "
    plan, _ = TrainPlan.from_request(body, state_dir=tmp_path)
    assert plan.env.rank == 2 and plan.env.global_port == 5565
    for value in (32.0, True):
        with pytest.raises(InvalidRequest, match=r"train_config\.optim\.batch_size must be an integer"):
            TrainPlan.from_request(_with("train_config.optim.batch_size", value), state_dir=tmp_path)


def test_null_sections_and_env_values_take_the_defaults(tmp_path: Path) -> None:
    body = {"train_config": {"model": None, "ckpt": {"interval": None}}, "train_env": {"TASK_ID": None}}
    plan, notes = TrainPlan.from_request(body, state_dir=tmp_path)
    assert plan.model.dim == 64 and plan.ckpt.interval is None and plan.env.task_id == "local"
    assert notes == []


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("train_config.optim.lr", "fast", "train_config.optim.lr must be a number"),
        ("train_config.optim.lr", True, "train_config.optim.lr must be a number"),
        ("train_config.optim.lr", 0, "train_config.optim.lr must be > 0"),
        ("train_config.optim.batch_size", 3.5, "train_config.optim.batch_size must be an integer"),
        ("train_config.optim.adam_betas2", 1.0, "train_config.optim.adam_betas2 must be < 1"),
        ("train_config.optim.sched_type", "exp", "train_config.optim.sched_type must be one of"),
        ("train_config.optim.warmup_steps", 7000, "train_config.optim.warmup_steps (7000) must be <="),
        ("train_config.train.micro_bs", True, "train_config.train.micro_bs must be an integer"),
        ("train_config.train.micro_bs", 3, "train_config.optim.batch_size (32) must be a multiple of"),
        ("train_config.diloco.inner_steps", 0, "train_config.diloco.inner_steps must be >= 1"),
        ("train_config.diloco.nesterov", "yes", "train_config.diloco.nesterov must be a boolean"),
        ("train_config.diloco.compression", "zstd", "diloco.compression must be one of fp16, int8, none"),
        ("train_config.diloco.compression", 8, "train_config.diloco.compression must be a string"),
        ("train_config.data.seq_length", "1024", "train_config.data.seq_length must be an integer"),
        ("train_config.data", [1], "train_config.data must be an object"),
        ("train_config.ckpt.topk", 0, "train_config.ckpt.topk must be >= 1"),
        ("train_config.model", {"dim": 30}, "train_config.model.dim must split into 4 heads"),
        ("train_config.model", {"n_kv_heads": 3}, "train_config.model.n_heads (4) must be a multiple"),
        ("train_env.GLOBAL_RANK", "one", "train_env.GLOBAL_RANK must be an integer string"),
        ("train_env.GLOBAL_RANK", "3", "train_env.GLOBAL_RANK must be < GLOBAL_WORLD_SIZE (3)"),
        ("train_env.GLOBAL_RANK", "-1", "train_env.GLOBAL_RANK must be an integer string >= 0, got '-1'"),
        ("train_env.GLOBAL_RANK", -1, "train_env.GLOBAL_RANK must be >= 0, got -1"),
        ("train_env.GLOBAL_RANK", 1.0, "train_env.GLOBAL_RANK must be an integer or a string or null"),
        ("train_env.GLOBAL_WORLD_SIZE", "0", "train_env.GLOBAL_WORLD_SIZE must be an integer string from 1"),
        ("train_env.GLOBAL_WORLD_SIZE", 4097, "train_env.GLOBAL_WORLD_SIZE must be <= 4096"),
        ("train_env.GLOBAL_PORT", "70000", "train_env.GLOBAL_PORT must be an integer string from 1 to 65535"),
        ("train_env.GLOBAL_PORT", ..., "train_env.GLOBAL_ADDR and GLOBAL_PORT are required"),
        ("train_env.GLOBAL_ADDR", "a b", "train_env.GLOBAL_ADDR must be a host name"),
        ("train_env.BASE_PORT", "x", "train_env.BASE_PORT must be an integer string"),
        ("train_env.TASK_ID", ["7"], "train_env.TASK_ID must be an integer or a string or null, got array"),
        ("train_env", "TASK_ID=7", "train_env must be an object"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, path: str, value: Any, reason: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        TrainPlan.from_request(_with(path, value), state_dir=tmp_path)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw", ["/etc/cron.d", "../escape", "outputs/../../x", "~/x", ""])
@pytest.mark.parametrize("field", ["ckpt.path", "data.path"])
def test_paths_must_stay_inside_the_state_dir(tmp_path: Path, raw: str, field: str) -> None:
    with pytest.raises(InvalidRequest, match=f"train_config.{field}"):
        TrainPlan.from_request(_with(f"train_config.{field}", raw), state_dir=tmp_path)


def test_symlink_out_of_the_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "out").symlink_to(tmp_path)
    with pytest.raises(InvalidRequest, match="escapes the node's state dir"):
        TrainPlan.from_request(_with("train_config.ckpt.path", "out/ckpts"), state_dir=state)


def test_body_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="train_config must be an object"):
        TrainPlan.from_request({"train_config": "x"}, state_dir=tmp_path)
    with pytest.raises(InvalidRequest, match="request body must be a JSON object"):
        TrainPlan.from_request([EXAMPLE], state_dir=tmp_path)


def test_with_rank_changes_only_the_rank(tmp_path: Path) -> None:
    plan, _ = TrainPlan.from_request(EXAMPLE, state_dir=tmp_path)
    other = plan.with_rank(2, 3)
    assert other.env.rank == 2 and other.optim == plan.optim and other.env.task_id == "7"
    with pytest.raises(InvalidRequest):
        plan.with_rank(3, 3)
