"""The training plan: what one node trains, how, and with whom, decoded from the client's request.

The client speaks the payload of the original trainer (``train_config`` + string-valued
``train_env``); :meth:`TrainPlan.from_request` maps it onto typed, frozen dataclasses once, so the
rest of the code never touches raw JSON. Fields we accept but cannot honour come back as notes, so a
client learns what was dropped instead of guessing. Plans round-trip through plain dicts
(:meth:`TrainPlan.to_dict` / :meth:`TrainPlan.from_dict`) to travel over the bus and into checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from node import config as node_config
from node.errors import InvalidRequest
from services.train.compression import COMPRESSIONS
from services.train.fields import Fields
from services.train.vocab import VOCAB_SIZE

SCHEDULES = ("cosine", "linear", "constant")
PLAN_VERSION = 1
_HOST_RE = re.compile(r"^[A-Za-z0-9._:\-\[\]]+$")
_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_METADATA_KEYS = ("project", "name", "description", "group", "tags")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the seeded Llama-style model; the defaults make a CPU step take milliseconds."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 192
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int = VOCAB_SIZE
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class OptimConfig:
    """The inner AdamW, its LR schedule (in inner steps) and the batch split into micro-batches."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    adam_betas1: float = 0.9
    adam_betas2: float = 0.95
    warmup_steps: int = 0
    total_steps: int = 1000
    sched_type: str = "cosine"
    batch_size: int = 8
    micro_bs: int = 8

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_bs


@dataclass(frozen=True)
class DiLoCoConfig:
    """H inner steps per round, then one outer SGD step on the averaged pseudo-gradient.

    ``compression`` is the wire format of the pseudo-gradients (``none`` = float32, ``fp16``, ``int8``);
    it changes the averaged values, so it is part of what the simulation must be given too.
    """

    inner_steps: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    compression: str = "none"


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from (absolute paths; empty means the built-in corpus) and how it is cut."""

    seq_length: int = 64
    paths: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint directory (absolute, inside the state dir), cadence in inner steps, and retention."""

    path: str = ""
    interval: int | None = None
    topk: int = 3
    resume: bool = False


@dataclass(frozen=True)
class EnvConfig:
    """This node's place in the run: ``train_env`` parsed from strings."""

    task_id: str = "local"
    node_id: str = ""
    rank: int = 0
    world_size: int = 1
    global_addr: str | None = None
    global_port: int | None = None
    base_port: int | None = None
    unique_id: str | None = None

    @property
    def rendezvous(self) -> tuple[str, int] | None:
        """Rank 0's ``(GLOBAL_ADDR, GLOBAL_PORT)`` where peers meet; None for a one-node run."""
        if self.global_addr is None or self.global_port is None:
            return None
        return self.global_addr, self.global_port


@dataclass(frozen=True)
class TrainPlan:
    """Everything a worker needs to train; identical on every rank except ``env``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    @property
    def outer_rounds(self) -> int:
        """Rounds needed to reach ``total_steps``; the last one may be shorter than H."""
        return -(-self.optim.total_steps // self.diloco.inner_steps)

    def with_rank(self, rank: int, world_size: int) -> TrainPlan:
        """The same plan seen from another rank (simulation, tests)."""
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank must be in [0, {world_size}), got {rank}")
        env = dataclasses.replace(self.env, rank=rank, world_size=world_size)
        return dataclasses.replace(self, env=env)

    def to_dict(self) -> dict[str, Any]:
        """msgpack/JSON-safe form (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["data"]["paths"] = list(self.data.paths)
        out["version"] = PLAN_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainPlan:
        """Rebuild a plan written by :meth:`to_dict` (trusted shape: our own bus or checkpoint)."""
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise InvalidRequest(f"plan must be a dict with version {PLAN_VERSION}")
        try:
            data_section = dict(data["data"])
            data_section["paths"] = tuple(data_section.get("paths", ()))
            return cls(
                model=ModelConfig(**data["model"]),
                optim=OptimConfig(**data["optim"]),
                diloco=DiLoCoConfig(**data["diloco"]),
                data=DataConfig(**data_section),
                ckpt=CheckpointConfig(**data["ckpt"]),
                env=EnvConfig(**data["env"]),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidRequest(f"plan is malformed: {exc}") from None

    @classmethod
    def from_request(cls, body: Any, *, state_dir: str | Path | None = None) -> tuple[TrainPlan, list[str]]:
        """Map ``{"train_config": ..., "train_env": ...}`` to a plan plus notes on what was dropped.

        Relative paths (``ckpt.path``, ``data.path``) resolve under ``state_dir`` (default: the node
        settings' ``train`` service dir, ``$MLNODE_STATE_DIR/train``); absolute paths and ``..`` are
        refused so a client cannot make the node read or write outside its own state.
        """
        if state_dir is None:
            state_dir = node_config.load().service_dir("train")
        root = Path(state_dir).resolve()
        notes: list[str] = []
        top = Fields(body, "", notes)
        config = top.section("train_config")
        env = _parse_env(top.section("train_env"))
        for key in _METADATA_KEYS:
            config.ignore(key, "run metadata; no experiment tracker here")
        optim = _parse_optim(config.section("optim"), config.section("train"))
        plan = cls(
            model=_parse_model(config.section("model")),
            optim=optim,
            diloco=_parse_diloco(config.section("diloco"), optim),
            data=_parse_data(config.section("data"), root),
            ckpt=_parse_ckpt(config.section("ckpt"), root, env),
            env=env,
        )
        config.finish()
        top.finish()
        return plan, notes


def _parse_model(f: Fields) -> ModelConfig:
    d = ModelConfig()
    dim = f.integer("dim", d.dim, minimum=2, maximum=16384)
    n_heads = f.integer("n_heads", d.n_heads, minimum=1)
    n_kv_heads = f.integer("n_kv_heads", min(d.n_kv_heads, n_heads), minimum=1)
    if dim % n_heads or (dim // n_heads) % 2:
        raise InvalidRequest(f"{f.name('dim')} must split into {n_heads} heads of even size, got {dim}")
    if n_heads % n_kv_heads:
        raise InvalidRequest(
            f"{f.name('n_heads')} ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})"
        )
    model = ModelConfig(
        dim=dim,
        n_layers=f.integer("n_layers", d.n_layers, minimum=1, maximum=256),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_hidden=f.integer("ffn_hidden", _default_hidden(dim), minimum=1),
        rope_theta=f.number("rope_theta", d.rope_theta, above=0.0),
        norm_eps=f.number("norm_eps", d.norm_eps, above=0.0),
        seed=f.integer("seed", d.seed, minimum=0, maximum=2**63 - 1),
    )
    f.finish()
    return model


def _default_hidden(dim: int) -> int:
    """Llama's SwiGLU width: 8/3 of dim, rounded up to a multiple of 32."""
    return -(-(8 * dim // 3) // 32) * 32


def _parse_optim(f: Fields, train: Fields) -> OptimConfig:
    d = OptimConfig()
    sched = f.string("sched_type", d.sched_type)
    if sched not in SCHEDULES:
        raise InvalidRequest(f"{f.name('sched_type')} must be one of {', '.join(SCHEDULES)}, got {sched!r}")
    batch_size = f.integer("batch_size", d.batch_size, minimum=1)
    micro_bs = train.integer("micro_bs", batch_size, minimum=1)
    if batch_size % micro_bs:
        raise InvalidRequest(
            f"{f.name('batch_size')} ({batch_size}) must be a multiple of "
            f"{train.name('micro_bs')} ({micro_bs})"
        )
    total = f.integer("total_steps", d.total_steps, minimum=1)
    warmup = f.integer("warmup_steps", d.warmup_steps, minimum=0)
    if warmup > total:
        raise InvalidRequest(f"{f.name('warmup_steps')} ({warmup}) must be <= total_steps ({total})")
    optim = OptimConfig(
        lr=f.number("lr", d.lr, above=0.0),
        weight_decay=f.number("weight_decay", d.weight_decay, minimum=0.0),
        adam_betas1=f.number("adam_betas1", d.adam_betas1, minimum=0.0, below=1.0),
        adam_betas2=f.number("adam_betas2", d.adam_betas2, minimum=0.0, below=1.0),
        warmup_steps=warmup,
        total_steps=total,
        sched_type=sched,
        batch_size=batch_size,
        micro_bs=micro_bs,
    )
    train.ignore("eval_interval", "no evaluation loop; training loss is reported")
    f.finish()
    train.finish()
    return optim


def _parse_diloco(f: Fields, optim: OptimConfig) -> DiLoCoConfig:
    d = DiLoCoConfig()
    momentum = f.number("outer_momentum", d.outer_momentum, minimum=0.0, below=1.0)
    nesterov = f.boolean("nesterov", d.nesterov and momentum > 0)
    if nesterov and momentum == 0:
        raise InvalidRequest(f"{f.name('nesterov')} needs {f.name('outer_momentum')} > 0")
    compression = f.string("compression", d.compression)
    if compression not in COMPRESSIONS:
        raise InvalidRequest(
            f"{f.name('compression')} must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"[:200]
        )
    diloco = DiLoCoConfig(
        inner_steps=f.integer("inner_steps", min(d.inner_steps, optim.total_steps), minimum=1),
        outer_lr=f.number("outer_lr", d.outer_lr, above=0.0),
        outer_momentum=momentum,
        nesterov=nesterov,
        compression=compression,
    )
    f.finish()
    return diloco


def _parse_data(f: Fields, root: Path) -> DataConfig:
    d = DataConfig()
    raw_paths = f.strings("path")
    data = DataConfig(
        seq_length=f.integer("seq_length", d.seq_length, minimum=1, maximum=1 << 20),
        paths=tuple(_under(root, raw, f.name("path")) for raw in raw_paths),
        seed=f.integer("seed", d.seed, minimum=0, maximum=2**63 - 1),
    )
    f.finish()
    return data


def _parse_ckpt(f: Fields, root: Path, env: EnvConfig) -> CheckpointConfig:
    default_dir = f"checkpoints/task-{_UNSAFE_NAME_RE.sub('_', env.task_id) or 'local'}"
    ckpt = CheckpointConfig(
        path=_under(root, f.string("path", default_dir), f.name("path")),
        interval=f.optional_integer("interval", minimum=1),
        topk=f.integer("topk", CheckpointConfig.topk, minimum=1),
        resume=f.boolean("resume", CheckpointConfig.resume),
    )
    f.finish()
    return ckpt


def _parse_env(f: Fields) -> EnvConfig:
    world = f.env_integer("GLOBAL_WORLD_SIZE", 1, minimum=1, maximum=4096)
    assert world is not None
    rank = f.env_integer("GLOBAL_RANK", 0, minimum=0)
    assert rank is not None
    if rank >= world:
        raise InvalidRequest(f"{f.name('GLOBAL_RANK')} must be < GLOBAL_WORLD_SIZE ({world}), got {rank}")
    addr = f.env_string("GLOBAL_ADDR") or None
    if addr is not None and not _HOST_RE.match(addr):
        raise InvalidRequest(f"{f.name('GLOBAL_ADDR')} must be a host name or IP address, got {addr!r}")
    port = f.env_integer("GLOBAL_PORT", None, minimum=1, maximum=65535)
    if world > 1 and (addr is None or port is None):
        raise InvalidRequest(f"{f.path}.GLOBAL_ADDR and GLOBAL_PORT are required when GLOBAL_WORLD_SIZE > 1")
    f.ignore("STORE_API_URL", "checkpoints stay on this node")
    env = EnvConfig(
        task_id=f.env_string("TASK_ID") or EnvConfig.task_id,
        node_id=f.env_string("NODE_ID") or "",
        rank=rank,
        world_size=world,
        global_addr=addr,
        global_port=port,
        base_port=f.env_integer("BASE_PORT", None, minimum=1, maximum=65535),
        unique_id=f.env_string("GLOBAL_UNIQUE_ID"),
    )
    f.finish()
    return env


def _under(root: Path, raw: str, name: str) -> str:
    """Resolve a client path inside ``root``; absolute paths and ``..`` escapes are refused."""
    if not raw.strip() or "\x00" in raw:
        raise InvalidRequest(f"{name} must be a non-empty relative path")
    rel = PurePosixPath(raw)
    if rel.is_absolute() or raw.startswith("~") or ".." in rel.parts:
        raise InvalidRequest(f"{name} must be a relative path inside the node's state dir, got {raw!r}")
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        raise InvalidRequest(f"{name} escapes the node's state dir: {raw!r}")
    return str(resolved)
