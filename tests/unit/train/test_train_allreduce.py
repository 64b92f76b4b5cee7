"""The outer-step all-reduce over real peer links: three ranks, each with its own event loop thread
(:mod:`tests.support.peer_ranks`), with stalls, partitions and rejoins."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bus.peers import DOMAIN
from node.errors import InvalidRequest, NotFound, ProtocolError
from node.identity import KeyPair
from services.train.collective.group import Excluded, Member, Reduced
from services.train.compression import Codec, NonFinitePseudoGradient, compressed_mean
from services.train.config import DiLoCoConfig, EnvConfig, ModelConfig, OptimConfig, TrainPlan
from services.train.corpus import builtin_documents
from services.train.data import encode_documents
from services.train.peers import PeerRegistry, bind_endpoint, follow, listen_port
from services.train.runner import FINISHED, Runner, weights_digest
from services.train.simulate import simulate
from tests.support.peer_ranks import Rank, bits, layout, make_ranks, serve
from tests.support.tcp_relay import Relays
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
SHAPES = [(37, 129), (5000,), (1,), (0,), (3, 3, 3)]


@pytest.fixture
def three() -> Iterator[list[Rank]]:
    ranks = make_ranks(3, timeout=0.5)
    yield ranks
    for rank in ranks:
        rank.close()


def payloads(world: int, seed: int = 0) -> dict[int, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {r: [torch.randn(shape, generator=gen) * 10 ** (r - 1) for shape in SHAPES] for r in range(world)}


def reduce_on(
    ranks: list[Rank], step: int, data: dict[int, list[torch.Tensor]]
) -> list[concurrent.futures.Future[Any]]:
    return [rank.reduce(step, data[rank.rank]) for rank in ranks]


def assert_mean_of(
    result: Reduced, data: dict[int, list[torch.Tensor]], ranks: tuple[int, ...], compression: str = "none"
) -> None:
    assert result.ranks == ranks
    expected = compressed_mean({r: data[r] for r in ranks}, Codec(compression))
    assert [tuple(t.shape) for t in result.tensors] == SHAPES
    assert bits(result.tensors) == bits(expected)


@pytest.mark.parametrize(
    ("topology", "compression"),
    [("scatter_gather", "none"), ("all_to_all", "none"), ("scatter_gather", "int8"), ("all_to_all", "fp16")],
)
def test_three_ranks_end_bit_identical_to_the_fixed_order_mean(topology: str, compression: str) -> None:
    ranks = make_ranks(3, timeout=5, topology=topology, compression=compression)
    try:
        memory = []
        for step in range(2):
            data = payloads(3, seed=step)
            results = [f.result(30) for f in reduce_on(ranks, step, data)]
            for result in results:
                assert_mean_of(result, data, (0, 1, 2), compression)
            memory.append([result.tensors[0].data_ptr() for result in results])
        assert memory[0] == memory[1]  # the second step reused the first one's buffers, and was right
        # Shards and chunks really crossed the wire: each rank sent more than its own payload's worth
        # (all_to_all: two payloads), in the chosen format.
        numel = sum(torch.Size(s).numel() for s in SHAPES)
        payload = Codec(compression).wire_nbytes(numel)
        floor = {"scatter_gather": 4 / 3 * payload, "all_to_all": 2 * payload}[topology]
        for rank in ranks:
            assert floor * 2 < rank.group.link.bytes_sent < floor * 2 * 1.3 + 40_000  # 2 steps, headers
    finally:
        for rank in ranks:
            rank.close()


def test_ranks_with_different_compression_or_a_non_finite_payload_refuse_to_reduce() -> None:
    ranks = make_ranks(2, timeout=2, compression="int8")
    ranks[1].group.codec = Codec("fp16")
    try:
        futures = [rank.reduce(0, [torch.zeros(3000)]) for rank in ranks]
        for future in futures:
            with pytest.raises(ProtocolError, match=r"compression '(fp16|int8)' at step 0, this rank"):
                future.result(30)
        poisoned = torch.zeros(3000)
        poisoned[5] = float("nan")
        with pytest.raises(NonFinitePseudoGradient, match="non-finite"):
            ranks[0].call(lambda: ranks[0].group.all_reduce(1, [poisoned]))
    finally:
        for rank in ranks:
            rank.close()


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_a_silent_rank_is_dropped_and_the_others_agree(compression: str) -> None:
    three = make_ranks(3, timeout=0.5, compression=compression)
    try:
        _silent_rank_is_dropped(three, compression)
    finally:
        for rank in three:
            rank.close()


def _silent_rank_is_dropped(three: list[Rank], compression: str) -> None:
    data = payloads(3)
    three[2].stall()  # silent from before the step: no ready, no heartbeats
    results = [f.result(30) for f in reduce_on(three[:2], 0, data)]  # decided while rank 2 is mute
    three[2].resume()
    for result in results:  # int8: shards re-cut for the two survivors, still the reference's bits
        assert_mean_of(result, data, (0, 1), compression)
    # Back from its stall, the dropped rank learns that step 0 went on without it.
    with pytest.raises(Excluded):
        three[2].call(lambda: three[2].group.all_reduce(0, data[2]))


@pytest.mark.parametrize("victim", [2, 0], ids=["member", "coordinator"])
def test_a_rank_stalling_mid_exchange_is_dropped_then_rejoins_with_fetched_state(
    three: list[Rank], victim: int
) -> None:
    survivors = [rank for rank in three if rank.rank != victim]
    alive = tuple(rank.rank for rank in survivors)
    data = payloads(3)
    three[victim].stall_after_chunks(2)
    futures = reduce_on(three, 0, data)
    for rank in survivors:
        assert_mean_of(futures[rank.rank].result(30), data, alive)
    three[victim].resume()
    with pytest.raises(Excluded):
        futures[victim].result(30)
    # The survivors publish their state; the dropped rank fetches it in chunks (a tensor > chunk size).
    state = [torch.arange(3000, dtype=torch.float32), torch.ones(2, 2, dtype=torch.bfloat16)]
    for rank in survivors:
        serve(rank, 1, state)
    snapshot = three[victim].call(lambda: three[victim].group.fetch_state(layout(state), timeout=5))
    assert (snapshot.outer_step, snapshot.names) == (1, ("t0", "t1"))
    assert three[victim].group.lineage == survivors[0].group.lineage == survivors[1].group.lineage
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(snapshot.tensors, state, strict=True))
    three[victim].call(lambda: three[victim].group.rejoin(1))
    wait_until(lambda: all(victim in r.group.rejoining(1) for r in survivors))
    data = payloads(3, seed=1)
    for future in reduce_on(three, 1, data):
        assert_mean_of(future.result(30), data, (0, 1, 2))


def test_a_rank_that_cannot_reach_a_quorum_decides_nothing_and_is_told_the_outcome(three: list[Rank]) -> None:
    # Rank 1 cannot hear rank 0 (its key is not registered there yet) and rank 0 holds state from an old
    # checkpoint: rank 0 has no majority of its own lineage, so it must not decide step 0 alone; ranks 1
    # and 2 are a majority and decide; rank 0 learns that it was left out (and resynchronises).
    zero, one, _two = three
    one.deaf_to(zero)
    zero.group.lineage = "restored-from-an-old-checkpoint"
    data = payloads(3)
    on_zero, on_one, on_two = reduce_on(three, 0, data)
    assert_mean_of(on_one.result(10), data, (1, 2))
    assert_mean_of(on_two.result(10), data, (1, 2))
    with pytest.raises(Excluded):
        on_zero.result(10)


def test_a_rank_older_than_every_remembered_decision_is_told_it_is_behind(three: list[Rank]) -> None:
    zero, one, two = three
    for step in range(18):  # rank 2 is alive (it heartbeats) but never takes part
        data = payloads(3, seed=step)
        for future in reduce_on([zero, one], step, data):
            assert_mean_of(future.result(30), data, (0, 1))
    with pytest.raises(Excluded, match="past step 0"):
        two.call(lambda: two.group.all_reduce(0, payloads(3)[2]))


def test_a_rank_whose_state_diverged_is_left_out_until_it_loads_the_groups_state(three: list[Rank]) -> None:
    three[2].group.lineage = "restored-from-an-old-checkpoint"
    data = payloads(3)
    futures = reduce_on(three, 0, data)
    for future in futures[:2]:
        assert_mean_of(future.result(30), data, (0, 1))
    with pytest.raises(Excluded, match="rank 2"):
        futures[2].result(30)
    assert three[0].group.lineage == three[1].group.lineage != three[2].group.lineage
    serve(three[0], 1, [torch.zeros(3)])
    three[2].call(lambda: three[2].group.fetch_state(layout([torch.zeros(3)]), rank=0, timeout=5))
    three[2].call(lambda: three[2].group.rejoin(1))
    wait_until(lambda: all(2 in r.group.rejoining(1) for r in three[:2]))
    data = payloads(3, seed=1)
    for future in reduce_on(three, 1, data):
        assert_mean_of(future.result(30), data, (0, 1, 2))


def test_ranks_with_different_payload_sizes_refuse_each_other() -> None:
    ranks = make_ranks(2, timeout=2)
    try:
        futures = [
            ranks[0].submit(lambda: ranks[0].group.all_reduce(0, [torch.zeros(10)])),
            ranks[1].submit(lambda: ranks[1].group.all_reduce(0, [torch.zeros(11)])),
        ]
        for future in futures:
            with pytest.raises(ProtocolError, match="elements"):
                future.result(30)
    finally:
        for rank in ranks:
            rank.close()


def test_a_refusal_that_got_lost_is_repeated_so_both_sides_fail() -> None:
    ranks = make_ranks(2, timeout=2)
    try:
        ranks[1].deaf_to(ranks[0])  # rank 0's ready and its one "refuse" never reach rank 1
        futures = [
            ranks[0].submit(lambda: ranks[0].group.all_reduce(0, [torch.zeros(10)])),
            ranks[1].submit(lambda: ranks[1].group.all_reduce(0, [torch.zeros(11)])),
        ]
        with pytest.raises(ProtocolError, match="elements"):
            futures[0].result(10)
        ranks[1].hear(ranks[0])
        with pytest.raises(ProtocolError, match="elements"):
            futures[1].result(6)  # well before rank 1 would give up on rank 0 and reduce alone (8 s)
    finally:
        for rank in ranks:
            rank.close()


def test_a_rank_alone_returns_its_own_tensors_as_the_mean() -> None:
    (rank,) = make_ranks(1, timeout=1)
    try:
        data = payloads(1)
        assert_mean_of(rank.call(lambda: rank.group.all_reduce(0, data[0])), data, (0,))
        with pytest.raises(InvalidRequest, match="already reduced"):
            rank.call(lambda: rank.group.all_reduce(0, data[0]))
    finally:
        rank.close()


# -- DiLoCo through the peer links -----------------------------------------------------------------

TOKENS = encode_documents(builtin_documents())
PLAN = TrainPlan(
    model=ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, seed=7),
    optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=6, batch_size=4, micro_bs=2),
    diloco=DiLoCoConfig(inner_steps=3),
)
PLAN = dataclasses.replace(PLAN, data=dataclasses.replace(PLAN.data, seq_length=32))


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_runners_over_peer_links_match_the_one_process_simulation(compression: str, tmp_path: Any) -> None:
    """The production run thread (Runner) of three ranks, each on its rank's group and loop."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    reference = dataclasses.replace(PLAN, diloco=dataclasses.replace(PLAN.diloco, compression=compression))
    three = make_ranks(3, timeout=0.5, compression=compression)
    try:
        runners = []
        for rank in three:
            plan = reference.with_rank(rank.rank, 3)
            ckpt = dataclasses.replace(plan.ckpt, path=str(tmp_path / f"ckpt-{rank.rank}"), interval=None)
            plan = dataclasses.replace(plan, ckpt=ckpt)
            runner = Runner(plan, loop=rank.loop, group=rank.group, resume=False, on_change=lambda: None)
            runners.append(runner)
        for runner in runners:
            runner.start()
        for runner in runners:
            runner.join(45)
        assert [r.state for r in runners] == [FINISHED] * 3, [r.error for r in runners]
        expected = simulate(reference, 3, 2)
        for runner in runners:
            status = runner.status()
            assert status["outer_step"] == 2 and status["contributors"] == [0, 1, 2]
            assert status["weights_digest"] == weights_digest(expected)
        if compression != "none":  # the option really changed the averaging
            assert weights_digest(expected) != weights_digest(simulate(PLAN, 3, 2))
    finally:
        torch.set_num_threads(threads_before)
        for rank in three:
            rank.close()


# -- the registry --------------------------------------------------------------------------------

KEY_A, KEY_B, KEY_C = (KeyPair.generate() for _ in range(3))


def peer(
    node: str, key: KeyPair, address: str = "10.0.0.5:5565", rank: int | None = None, hexkey: bool = False
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node_id": node,
        "public_key": key.public_hex if hexkey else key.public,
        "address": address,
    }
    if rank is not None:
        doc["rank"] = rank
    return doc


def test_registry_validates_every_field_and_names_it() -> None:
    registry = PeerRegistry()
    cases = [
        (
            {"task_id": "7", "peers": [peer("n1", KEY_A) | {"public_key": "not-a-key"}]},
            r"peers\[0\]\.public_key",
        ),
        ({"task_id": "7", "peers": [peer("n1", KEY_A) | {"public_key": 5}]}, r"peers\[0\]\.public_key"),
        ({"task_id": "7", "peers": [peer("n1", KEY_A, address="10.0.0.5")]}, r"peers\[0\]\.address"),
        ({"task_id": "7", "peers": [peer("n1", KEY_A, address="10.0.0.5:70000")]}, r"peers\[0\]\.address"),
        ({"task_id": "7", "peers": [peer("n1", KEY_A, address="bad host!:1")]}, r"peers\[0\]\.address"),
        ({"task_id": "7", "peers": [peer("n1", KEY_A, rank=-1)]}, r"peers\[0\]\.rank"),
        ({"task_id": "7", "peers": [peer("n1", KEY_A) | {"rank": True}]}, r"peers\[0\]\.rank"),
        ({"task_id": "7", "peers": [peer("", KEY_A)]}, r"peers\[0\]\.node_id"),
        ({"task_id": "7", "peers": [peer("n1", KEY_A) | {"extra": 1}]}, r"peers\[0\]\.extra is not a known"),
        ({"task_id": "", "peers": [peer("n1", KEY_A)]}, r"task_id"),
        ({"task_id": "7", "peers": []}, r"peers must have at least 1 entries"),
        (
            {"task_id": "7", "peers": [peer("n1", KEY_A), peer("n2", KEY_A)]},
            r"peers\[1\]\.public_key is already",
        ),
        (
            {"task_id": "7", "peers": [peer("n1", KEY_A, rank=0), peer("n2", KEY_B, rank=0)]},
            r"peers\[1\]\.rank 0",
        ),
        ([1, 2], r"request body must be a JSON object"),
    ]
    for body, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            registry.register(body)
    assert registry.list_peers({}) == {"tasks": []}  # nothing half-registered


def test_registry_registers_updates_lists_and_removes() -> None:
    registry = PeerRegistry()
    seen: list[tuple[str, int]] = []
    registry.subscribe(lambda task, peers: seen.append((task, len(peers))))
    out = registry.register(
        {"task_id": "7", "peers": [peer("n1", KEY_A, rank=0), peer("n2", KEY_B, "[::1]:6000", hexkey=True)]}
    )
    assert [p["public_key"] for p in out["peers"]] == [KEY_A.public, KEY_B.public]  # hex normalised to Z85
    assert out["peers"][1]["address"] == "[::1]:6000"
    registry.register({"task_id": "7", "peers": [peer("n2", KEY_B, "Node-2.example:6001", rank=1)]})
    assert registry.list_peers({"task_id": "7"})["peers"][1] == {
        "node_id": "n2",
        "public_key": KEY_B.public,
        "address": "node-2.example:6001",
        "rank": 1,
    }
    registry.register({"task_id": "8", "peers": [peer("n3", KEY_C)], "replace": True})
    assert [t["task_id"] for t in registry.list_peers(None)["tasks"]] == ["7", "8"]
    registry.remove({"task_id": "7", "node_id": "n1"})
    assert [p["node_id"] for p in registry.list_peers({"task_id": "7"})["peers"]] == ["n2"]
    with pytest.raises(NotFound):
        registry.remove({"task_id": "7", "node_id": "n1"})
    assert seen == [("7", 2), ("7", 2), ("8", 1), ("7", 1)]


def test_the_listener_binds_where_the_registry_says_this_node_listens() -> None:
    registry = PeerRegistry()
    me = KeyPair.generate()
    env = EnvConfig(
        task_id="7", rank=1, world_size=3, global_addr="10.0.0.5", global_port=5565, base_port=10001
    )
    assert bind_endpoint("0.0.0.0", 0, env, registry.peers("7"), me.public) == "tcp://0.0.0.0:10001"
    assert listen_port(dataclasses.replace(env, rank=0), None) == 5565
    with pytest.raises(InvalidRequest, match="BASE_PORT"):
        listen_port(dataclasses.replace(env, base_port=None), None)
    registry.register({"task_id": "7", "peers": [peer("me", me, "10.0.0.7:7001", rank=1)]})
    assert bind_endpoint("::", 0, env, registry.peers("7"), me.public) == "tcp://[::]:7001"
    assert bind_endpoint("::", 9000, env, registry.peers("7"), me.public) == "tcp://[::]:9000"  # local wins


def test_the_listener_admits_exactly_the_running_tasks_registered_keys() -> None:
    registry = PeerRegistry()
    me = KeyPair.generate()
    rank = Rank(0, 3, me, timeout=1)
    try:
        registry.register({"task_id": "other", "peers": [peer("x", KEY_C, "127.0.0.1:1")]})
        registry.register(
            {
                "task_id": "7",
                "peers": [peer("me", me, "127.0.0.1:2", rank=0), peer("a", KEY_A, "127.0.0.1:3", rank=1)],
            }
        )
        unfollow = rank.do(lambda: follow(rank.group, registry, "7"))
        assert rank.auth.allowed(DOMAIN) == {KEY_A.public}  # not our own key, not another task's
        rank.do(
            lambda: registry.register({"task_id": "7", "peers": [peer("b", KEY_B, "127.0.0.1:4", rank=2)]})
        )
        assert rank.auth.allowed(DOMAIN) == {KEY_A.public, KEY_B.public}
        rank.do(lambda: registry.remove({"task_id": "7", "node_id": "a"}))
        assert rank.auth.allowed(DOMAIN) == {KEY_B.public}
        assert rank.group.ranks() == {2: KEY_B.public}
        with pytest.raises(InvalidRequest, match="registered as rank 1"):
            rank.do(
                lambda: registry.register({"task_id": "7", "peers": [peer("me", me, "127.0.0.1:2", rank=1)]})
            )
        assert [p.rank for p in registry.peers("7") if p.node_id == "me"] == [0]  # refused: nothing changed
        unfollow()  # the run ended: later registrations no longer touch its (closed) group
        rank.do(lambda: registry.register({"task_id": "7", "peers": [peer("c", KEY_C, "127.0.0.1:5")]}))
        assert rank.auth.allowed(DOMAIN) == {KEY_B.public}
    finally:
        rank.close()


# -- partitions: every peer link goes through a relay the test cuts and restores --------------------


def relayed_ranks(relays: Relays, world: int, **options: Any) -> list[Rank]:
    keys = [KeyPair.generate() for _ in range(world)]
    ranks = [Rank(r, world, keys[r], **options) for r in range(world)]
    ports = [int(rank.group.endpoint.rpartition(":")[2]) for rank in ranks]
    for me, rank in enumerate(ranks):
        via = {r: ports[r] if r == me else relays.add(me, r, "127.0.0.1", ports[r]) for r in range(world)}
        members = [Member(keys[r].public, f"tcp://127.0.0.1:{via[r]}", r) for r in range(world)]

        async def setup(rank: Rank = rank, members: list[Member] = members) -> None:
            rank.group.set_members(members)
            rank.group.start()

        rank.call(setup)
    return ranks


@pytest.mark.parametrize(
    ("majority", "minority"), [((0, 1), 2), ((1, 2), 0)], ids=["member-cut-off", "coordinator-cut-off"]
)
def test_a_partition_decides_each_step_once_and_heals_to_one_state(
    majority: tuple[int, ...], minority: int
) -> None:
    relays = Relays()
    ranks = relayed_ranks(relays, 3, timeout=0.5)
    try:
        data = payloads(3)
        for future in reduce_on(ranks, 0, data):
            assert_mean_of(future.result(30), data, (0, 1, 2))
        relays.partition(set(majority), {minority})
        data = payloads(3, seed=1)
        futures = reduce_on(ranks, 1, data)
        for r in majority:  # the majority side decides step 1 without the cut-off rank
            assert_mean_of(futures[r].result(30), data, majority)
        # The minority decides nothing (it would diverge): it waits for a quorum, visibly.
        wait_until(lambda: ranks[minority].group.waiting_for_quorum, 30)
        assert not futures[minority].done()
        relays.heal()
        with pytest.raises(Excluded):  # told the outcome once it can hear the others again
            futures[minority].result(30)
        state = [torch.arange(3000, dtype=torch.float32)]
        for r in majority:
            serve(ranks[r], 2, state)
        late = ranks[minority]
        late.call(lambda: late.group.fetch_state(layout(state), timeout=5))
        late.call(lambda: late.group.rejoin(2))
        wait_until(lambda: all(minority in ranks[r].group.rejoining(2) for r in majority))
        data = payloads(3, seed=2)
        for future in reduce_on(ranks, 2, data):
            assert_mean_of(future.result(30), data, (0, 1, 2))
        # Equal lineages: every rank's state went through the same decisions, step by step.
        assert len({rank.group.lineage for rank in ranks}) == 1
    finally:
        for rank in ranks:
            rank.close()
        relays.close()
