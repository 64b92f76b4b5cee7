"""Training benchmark: the outer-step all-reduce over CURVE peer links against gloo, same tensors.

Three processes on loopback exchange a ~100 MB float32 set of pseudo-gradients shaped like a real
model's parameters. Our peer links (CURVE-encrypted ZeroMQ, fixed-rank-order reduction, both
topologies, and each ``diloco.compression``: none / fp16 / int8) and ``torch.distributed`` gloo
``all_reduce`` (no encryption, float32; per tensor, as a DiLoCo loop would call it, and once on one
flat buffer, its best case) run in the same invocation, so the printed ratios compare like with like
on this machine. Every compressed result is checked against ``compressed_mean`` computed here (same
bits on every rank and in the reference). It also prints what each node sends per outer step against
data-parallel training, which all-reduces gradients after every one of the H inner steps, and what
compression costs in loss: the one-process simulation of a 3-rank run on the built-in corpus, the
same number of outer steps per option, evaluated on every window of the corpus.

The machine is shared and noisy, so the four exchanges run in interleaved rounds and each reports the
median over all its repetitions of the slowest rank's time.

Run: ``python -m tests.bench.bench_train`` (or ``make bench``). Environment knobs: BENCH_TRAIN_MB
(payload size), BENCH_TRAIN_REPS and BENCH_TRAIN_ROUNDS, BENCH_TRAIN_H, BENCH_TRAIN_IO_THREADS (libzmq
I/O threads, which do the CURVE encryption), BENCH_TRAIN_WINDOW (chunks in flight per peer),
BENCH_TRAIN_LOSS_H and BENCH_TRAIN_LOSS_OUTER (the loss runs' inner steps per round and rounds).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch

from tests.bench.report import print_table
from tests.support.ports import free_ports

WORLD = 3
REPS = int(os.environ.get("BENCH_TRAIN_REPS", "4"))
ROUNDS = int(os.environ.get("BENCH_TRAIN_ROUNDS", "2"))
WINDOW = int(os.environ.get("BENCH_TRAIN_WINDOW", "8"))
H = int(os.environ.get("BENCH_TRAIN_H", "50"))
TARGET_MB = float(os.environ.get("BENCH_TRAIN_MB", "100"))
IO_THREADS = int(os.environ.get("BENCH_TRAIN_IO_THREADS", "1"))
CHUNK = 1 << 20
LOSS_H = int(os.environ.get("BENCH_TRAIN_LOSS_H", "20"))
LOSS_OUTER = int(os.environ.get("BENCH_TRAIN_LOSS_OUTER", "10"))
#: name -> (topology, compression) of each peer-link exchange measured
PEER = {
    "none": ("scatter_gather", "none"),
    "fp16": ("scatter_gather", "fp16"),
    "int8": ("scatter_gather", "int8"),
    "none, all_to_all": ("all_to_all", "none"),
}


def _shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama-style model scaled so the float32 payload is about TARGET_MB."""
    from services.train.config import ModelConfig
    from services.train.model import parameter_shapes

    dim = 512
    best = ModelConfig(dim=dim, n_layers=1, n_heads=8, n_kv_heads=4, ffn_hidden=3 * dim)
    for layers in range(1, 64):
        cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=8, n_kv_heads=4, ffn_hidden=3 * dim)
        if sum(math.prod(s) for _, s in parameter_shapes(cfg)) * 4 / 1e6 > TARGET_MB * 1.05:
            break
        best = cfg
    return [tuple(s) for _, s in parameter_shapes(best)]


def _tensors(rank: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(shape, generator=gen) * 1e-3 for shape in shapes]


def _digest(tensors: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def _peer_worker(rank: int, ports: list[int], keys: list[Any], name: str, out: Any) -> None:
    import zmq.asyncio

    from bus.auth import Authenticator
    from services.train.collective.group import Member
    from services.train.peers import open_group

    async def main() -> None:
        ctx = zmq.asyncio.Context(io_threads=IO_THREADS)
        auth = Authenticator(ctx).start()
        group = open_group(
            ctx,
            auth,
            keys[rank],
            f"tcp://127.0.0.1:{ports[rank]}",
            rank=rank,
            world_size=WORLD,
            timeout=60.0,
            chunk_bytes=CHUNK,
            window=WINDOW,
            topology=PEER[name][0],
            compression=PEER[name][1],
        )
        group.set_members([Member(keys[r].public, f"tcp://127.0.0.1:{ports[r]}", r) for r in range(WORLD)])
        group.start()
        shapes = _shapes()
        tensors = _tensors(rank, shapes)
        await group.all_reduce(0, tensors)  # warm-up: connections, CURVE handshakes, allocations
        times, sent = [], []
        for step in range(1, REPS + 1):
            before = group.link.bytes_sent
            t0 = time.perf_counter()
            result = await group.all_reduce(step, tensors)
            times.append(time.perf_counter() - t0)
            sent.append(group.link.bytes_sent - before)
            assert result.ranks == tuple(range(WORLD))
        out.put((rank, times, sent, _digest(result.tensors)))
        await asyncio.sleep(0.5)  # let the last commits reach the others before closing
        await group.aclose()
        auth.stop()
        ctx.destroy(linger=0)

    from node.logging import configure

    configure("bench-train", "warning")
    torch.set_num_threads(1)
    asyncio.run(main())


def _gloo_worker(rank: int, port: int, flat: bool, out: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    tensors = _tensors(rank, _shapes())
    if flat:
        tensors = [torch.cat([t.reshape(-1) for t in tensors])]

    def once() -> None:
        work = [t.clone() for t in tensors]
        dist.barrier()
        t0 = time.perf_counter()
        for t in work:
            dist.all_reduce(t)
            t.div_(WORLD)
        times.append(time.perf_counter() - t0)

    times: list[float] = []
    once()
    times.clear()
    for _ in range(REPS):
        once()
    out.put((rank, times, [], ""))
    dist.barrier()
    dist.destroy_process_group()


def _run(target: Any, args_for: Any) -> tuple[list[float], list[int], list[str]]:
    """The slowest rank's time per repetition; bytes rank 0 sent per step; each rank's result digest."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(rank), out), daemon=True) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    results = {}
    for _ in range(WORLD):
        rank, times, sent, digest = out.get(timeout=600)
        results[rank] = (times, sent, digest)
    for proc in procs:
        proc.join(30)
    slowest = [max(results[r][0][i] for r in range(WORLD)) for i in range(REPS)]
    return slowest, results[0][1], [results[r][2] for r in range(WORLD)]


def _reference_digest(compression: str, shapes: list[tuple[int, ...]]) -> str:
    """What every rank must end with: the mean computed in this process, in the same wire format."""
    from services.train.compression import Codec, compressed_mean

    torch.set_num_threads(1)
    return _digest(compressed_mean({r: _tensors(r, shapes) for r in range(WORLD)}, Codec(compression)))


def _loss_after(compression: str) -> tuple[float, float]:
    """Loss on every corpus window before training and after LOSS_OUTER simulated outer steps."""
    from node.logging import configure
    from services.train.config import DataConfig, DiLoCoConfig, OptimConfig, TrainPlan
    from services.train.corpus import builtin_documents
    from services.train.data import encode_documents
    from services.train.simulate import simulate_workers

    configure("bench-train", "warning")  # not a line per simulated outer step
    torch.set_num_threads(1)
    tokens = encode_documents(builtin_documents())
    plan = TrainPlan(
        optim=OptimConfig(lr=3e-3, warmup_steps=LOSS_H, total_steps=LOSS_H * LOSS_OUTER),
        diloco=DiLoCoConfig(inner_steps=LOSS_H, compression=compression),
        data=DataConfig(seq_length=64),
    )
    seq = plan.data.seq_length
    count = (tokens.numel() - 1) // seq
    windows = torch.stack([tokens[i * seq : i * seq + seq + 1] for i in range(count)]).long()

    def evaluate(model: Any) -> float:
        with torch.no_grad():
            losses = [float(model.loss(batch)) * len(batch) for batch in windows.split(256)]
        return sum(losses) / count

    before = evaluate(simulate_workers(plan, WORLD, 0, tokens=tokens)[0].model)
    workers = simulate_workers(plan, WORLD, LOSS_OUTER, tokens=tokens)
    return before, evaluate(workers[0].model)


def run() -> None:
    from node.identity import KeyPair

    shapes = _shapes()
    nbytes = sum(math.prod(s) for s in shapes) * 4
    keys = [KeyPair.generate() for _ in range(WORLD)]
    names = (*PEER, "gloo", "gloo flat")
    samples: dict[str, list[float]] = {name: [] for name in names}
    sent_by: dict[str, list[int]] = {name: [] for name in PEER}
    references = {compression: _reference_digest(compression, shapes) for _, compression in PEER.values()}
    load_before = os.getloadavg()[0]
    for _ in range(ROUNDS):
        for name in names:
            if name in PEER:
                ports = free_ports(WORLD)
                slowest, sent, digests = _run(_peer_worker, lambda r, p=ports, n=name: (r, p, keys, n))
                if set(digests) != {references[PEER[name][1]]}:
                    raise AssertionError(f"{name}: ranks or reference disagree on the result: {digests}")
                sent_by[name] += sent
            else:
                port = free_ports(1)[0]
                slowest, _, _ = _run(_gloo_worker, lambda r, p=port, f=(name == "gloo flat"): (r, p, f))
            samples[name] += slowest
            print(f"   {name}: {', '.join(f'{t * 1e3:.0f}' for t in slowest)} ms", flush=True)
    load_after = os.getloadavg()[0]
    timings = {name: statistics.median(values) for name, values in samples.items()}
    sent = {name: statistics.median(values) for name, values in sent_by.items()}
    gloo = timings["gloo"]
    ring = 2 * (WORLD - 1) / WORLD * nbytes  # what a ring all-reduce (gloo's) sends per node
    labels = {
        "none": "peer links, CURVE, reduce-scatter + all-gather, float32 (none)",
        "fp16": "peer links, CURVE, reduce-scatter + all-gather, fp16",
        "int8": "peer links, CURVE, reduce-scatter + all-gather, int8",
        "none, all_to_all": "peer links, CURVE, all-to-all, float32 (none)",
        "gloo": f"gloo all_reduce fp32, {len(shapes)} tensors, no encryption",
        "gloo flat": "gloo all_reduce fp32, one flat buffer, no encryption",
    }
    rows = []
    for name, t in timings.items():
        mb = sent.get(name, ring)
        rows.append([
            labels[name],
            f"{t * 1e3:,.0f}",
            f"{mb / 1e6:,.1f}" + ("" if name in sent else " (ring)"),
            f"{mb / sent['none']:.3f}",
            f"{gloo / t:.2f}",
            f"{timings['gloo flat'] / t:.2f}",
        ])
    print_table(
        f"train: outer-step all-reduce, {WORLD} processes on loopback, {nbytes / 1e6:.1f} MB float32 in "
        f"{len(shapes)} tensors; median of {ROUNDS}x{REPS} (slowest rank); {os.cpu_count()} CPUs, load "
        f"{load_before:.1f} -> {load_after:.1f}; chunk {CHUNK >> 20} MiB, window {WINDOW}, "
        f"{IO_THREADS} I/O thread(s)",
        ["exchange", "ms", "MB sent per node per step", "bytes vs none", "speed vs gloo",
         "speed vs gloo flat"],
        rows,
    )
    dp = H * ring
    print_table(
        f"train: bytes each node sends per outer step (H = {H} inner steps, W = {WORLD}, as measured)",
        ["scheme", "MB sent per node", "ratio to data-parallel"],
        [
            *[
                [f"DiLoCo, {labels[name][len('peer links, CURVE, '):]}", f"{v / 1e6:,.1f}", f"{v / dp:.4f}"]
                for name, v in sent.items()
            ],
            ["data-parallel: ring all-reduce of gradients every inner step", f"{dp / 1e6:,.1f}", "1.0000"],
        ],
    )
    losses = {compression: _loss_after(compression) for compression in ("none", "fp16", "int8")}
    base = losses["none"][1]
    print_table(
        f"train: loss after {LOSS_OUTER} outer steps (H = {LOSS_H}, {WORLD} ranks simulated, default tiny "
        "model, built-in corpus; evaluated on all its windows)",
        ["compression", "loss before", "loss after", "vs none"],
        [[c, f"{b:.4f}", f"{a:.4f}", f"{(a - base) / base:+.2%}"] for c, (b, a) in losses.items()],
    )
    checks = [
        ("none >= 0.5x gloo's speed", gloo / timings["none"] >= 0.5),
        ("int8 sends <= 0.27 of none's bytes", sent["int8"] <= 0.27 * sent["none"]),
        ("int8 finishes faster than gloo fp32", timings["int8"] < gloo),
        ("fp16 and int8 cost <= 2 % loss", all(losses[c][1] <= 1.02 * base for c in ("fp16", "int8"))),
    ]
    print_table("train: goals", ["goal", "met"], [[goal, "yes" if ok else "NO"] for goal, ok in checks])


if __name__ == "__main__":
    run()
