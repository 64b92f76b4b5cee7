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

import msgspec

from contracts.checked import convert
from contracts.train import (
    CkptSection,
    DataSection,
    DiLoCoSection,
    ModelSection,
    OptimSection,
    TrainConfig,
    TrainEnv,
    TrainSection,
    TrainStart,
)
from node import config as node_config
from node.errors import InvalidRequest
from services.train.vocab import VOCAB_SIZE

SCHEDULES = ("cosine", "linear", "constant")
PLAN_VERSION = 1
_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_METADATA = "run metadata; no experiment tracker here"
#: Keys the contract accepts that the node cannot honour, and why (each becomes a note when sent).
IGNORED = {
    **{f"train_config.{key}": _METADATA for key in ("project", "name", "description", "group", "tags")},
    "train_config.train.eval_interval": "no evaluation loop; training loss is reported",
    "train_env.STORE_API_URL": "checkpoints stay on this node",
}


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

        The body is checked into the :class:`~contracts.train.TrainStart` contract (per-field rules);
        the rules between fields are checked here, once. Relative paths (``ckpt.path``, ``data.path``)
        resolve under ``state_dir`` (default: the node settings' ``train`` service dir,
        ``$MLNODE_STATE_DIR/train``); absolute paths and ``..`` are refused so a client cannot make the
        node read or write outside its own state.
        """
        if state_dir is None:
            state_dir = node_config.load().service_dir("train")
        root = Path(state_dir).resolve()
        start = convert({} if body is None else body, TrainStart)
        notes = ignored_keys(body, TrainStart)
        config = start.train_config or TrainConfig()
        env = _plan_env(start.train_env or TrainEnv())
        optim = _plan_optim(config.optim or OptimSection(), config.train or TrainSection())
        plan = cls(
            model=_plan_model(config.model or ModelSection()),
            optim=optim,
            diloco=_plan_diloco(config.diloco or DiLoCoSection(), optim),
            data=_plan_data(config.data or DataSection(), root),
            ckpt=_plan_ckpt(config.ckpt or CkptSection(), root, env),
            env=env,
        )
        return plan, notes


def ignored_keys(body: Any, kind: Any) -> list[str]:
    """Notes for the keys of ``body`` (already checked into ``kind``) that the node does not use: keys
    the contract does not declare, and those it declares as accepted but ignored."""
    notes: list[str] = []
    _walk(body, msgspec.inspect.type_info(kind), "", notes)
    return notes


def _walk(doc: Any, node: msgspec.inspect.Type, path: str, notes: list[str]) -> None:
    struct = _struct(node)
    if struct is None or not isinstance(doc, dict):
        return
    fields = {f.encode_name: f for f in struct.fields}
    for key, value in doc.items():
        name = f"{path}.{key}" if path else str(key)
        known = fields.get(key)
        if known is None:
            notes.append(f"ignored: {name} (unknown key)")
        elif name in IGNORED:
            notes.append(f"ignored: {name} ({IGNORED[name]})")
        else:
            _walk(value, known.type, name, notes)


def _struct(node: msgspec.inspect.Type) -> msgspec.inspect.StructType | None:
    """The Struct ``node`` is (through metadata and ``| None``), if any."""
    while isinstance(node, msgspec.inspect.Metadata):
        node = node.type
    options = node.types if isinstance(node, msgspec.inspect.UnionType) else (node,)
    for option in options:
        while isinstance(option, msgspec.inspect.Metadata):
            option = option.type
        if isinstance(option, msgspec.inspect.StructType):
            return option
    return None


def _plan_model(m: ModelSection) -> ModelConfig:
    n_kv_heads = m.n_kv_heads if m.n_kv_heads is not None else min(ModelConfig.n_kv_heads, m.n_heads)
    if m.dim % m.n_heads or (m.dim // m.n_heads) % 2:
        raise InvalidRequest(
            f"train_config.model.dim must split into {m.n_heads} heads of even size, got {m.dim}"
        )
    if m.n_heads % n_kv_heads:
        raise InvalidRequest(
            f"train_config.model.n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})"
        )
    return ModelConfig(
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=n_kv_heads,
        ffn_hidden=m.ffn_hidden if m.ffn_hidden is not None else _default_hidden(m.dim),
        rope_theta=float(m.rope_theta),
        norm_eps=float(m.norm_eps),
        seed=m.seed,
    )


def _default_hidden(dim: int) -> int:
    """Llama's SwiGLU width: 8/3 of dim, rounded up to a multiple of 32."""
    return -(-(8 * dim // 3) // 32) * 32


def _plan_optim(o: OptimSection, train: TrainSection) -> OptimConfig:
    micro_bs = o.batch_size if train.micro_bs is None else train.micro_bs
    if o.batch_size % micro_bs:
        raise InvalidRequest(
            f"train_config.optim.batch_size ({o.batch_size}) must be a multiple of "
            f"train_config.train.micro_bs ({micro_bs})"
        )
    if o.warmup_steps > o.total_steps:
        raise InvalidRequest(
            f"train_config.optim.warmup_steps ({o.warmup_steps}) must be <= total_steps ({o.total_steps})"
        )
    return OptimConfig(
        lr=float(o.lr),
        weight_decay=float(o.weight_decay),
        adam_betas1=float(o.adam_betas1),
        adam_betas2=float(o.adam_betas2),
        warmup_steps=o.warmup_steps,
        total_steps=o.total_steps,
        sched_type=o.sched_type,
        batch_size=o.batch_size,
        micro_bs=micro_bs,
    )


def _plan_diloco(d: DiLoCoSection, optim: OptimConfig) -> DiLoCoConfig:
    default = DiLoCoConfig()
    nesterov = default.nesterov and d.outer_momentum > 0 if d.nesterov is None else d.nesterov
    if nesterov and d.outer_momentum == 0:
        raise InvalidRequest("train_config.diloco.nesterov needs train_config.diloco.outer_momentum > 0")
    return DiLoCoConfig(
        inner_steps=min(default.inner_steps, optim.total_steps) if d.inner_steps is None else d.inner_steps,
        outer_lr=float(d.outer_lr),
        outer_momentum=float(d.outer_momentum),
        nesterov=nesterov,
        compression=d.compression,
    )


def _plan_data(d: DataSection, root: Path) -> DataConfig:
    raw_paths = [] if d.path is None else [d.path] if isinstance(d.path, str) else d.path
    return DataConfig(
        seq_length=d.seq_length,
        paths=tuple(_under(root, raw, "train_config.data.path") for raw in raw_paths),
        seed=d.seed,
    )


def _plan_ckpt(c: CkptSection, root: Path, env: EnvConfig) -> CheckpointConfig:
    default_dir = f"checkpoints/task-{_UNSAFE_NAME_RE.sub('_', env.task_id) or 'local'}"
    return CheckpointConfig(
        path=_under(root, default_dir if c.path is None else c.path, "train_config.ckpt.path"),
        interval=c.interval,
        topk=c.topk,
        resume=c.resume,
    )


def _plan_env(e: TrainEnv) -> EnvConfig:
    world = _env_int(e.global_world_size, 1)
    rank = _env_int(e.global_rank, 0)
    if rank >= world:
        raise InvalidRequest(f"train_env.GLOBAL_RANK must be < GLOBAL_WORLD_SIZE ({world}), got {rank}")
    addr = _env_text(e.global_addr) or None
    port = None if e.global_port is None else _env_int(e.global_port, 0)
    if world > 1 and (addr is None or port is None):
        raise InvalidRequest("train_env.GLOBAL_ADDR and GLOBAL_PORT are required when GLOBAL_WORLD_SIZE > 1")
    return EnvConfig(
        task_id=_env_text(e.task_id) or EnvConfig.task_id,
        node_id=_env_text(e.node_id) or "",
        rank=rank,
        world_size=world,
        global_addr=addr,
        global_port=port,
        base_port=None if e.base_port is None else _env_int(e.base_port, 0),
        unique_id=None if e.global_unique_id is None else _env_text(e.global_unique_id),
    )


def _env_int(value: str | int | None, default: int) -> int:
    """A ``train_env`` integer: the contract's pattern has checked the digits of a string one."""
    return default if value is None else int(value)


def _env_text(value: str | int | None) -> str:
    return "" if value is None else str(value).strip()


def _under(root: Path, raw: str, name: str) -> str:
    """Resolve a client path inside ``root``; absolute paths and ``..`` escapes are refused."""
    if not raw.strip() or "\x00" in raw:
        raise InvalidRequest(f"{name} must be a non-empty relative path inside the node's state dir")
    rel = PurePosixPath(raw)
    if rel.is_absolute() or raw.startswith("~") or ".." in rel.parts:
        raise InvalidRequest(f"{name} must be a relative path inside the node's state dir, got {raw!r}")
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        raise InvalidRequest(f"{name} escapes the node's state dir: {raw!r}")
    return str(resolved)
