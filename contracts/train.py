"""Training request bodies: the original trainer's ``train_config`` sections and ``train_env``, typed.

Every per-field rule is stated here (bounds, enums, patterns) and the gateway enforces it. Rules that
relate fields to each other, or to this node's state dir, are checked once by the train service
(:mod:`services.train.config`) and spelled out in the descriptions below, so the published document
still states every rule the node applies. Keys the node does not use are accepted and reported back
to the client as ``notes`` (the service lists them), never dropped silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from contracts.checked import PATTERN_PHRASES
from contracts.fields import FLOAT_MAX, INT64_MAX, Count, Positive, PositiveNumber

SECTIONS = ("train", "data", "optim", "diloco", "ckpt", "model")
MAX_PEERS = 4096
MAX_WORLD = 4096

#: Cross-field rules (the service's own messages carry these phrases; the fuzzer checks they are
#: stated in the document).
SPLIT_HEADS = "must split into n_heads heads of even size"
HEADS_MULTIPLE = "n_heads must be a multiple of n_kv_heads"
BATCH_MULTIPLE = "batch_size must be a multiple of train.micro_bs"
WARMUP_LIMIT = "warmup_steps must be <= total_steps"
NESTEROV_MOMENTUM = "nesterov needs outer_momentum > 0"
RANK_BELOW_WORLD = "GLOBAL_RANK must be < GLOBAL_WORLD_SIZE"
ADDR_REQUIRED = "GLOBAL_ADDR and GLOBAL_PORT are required when GLOBAL_WORLD_SIZE > 1"
INSIDE_STATE = "a relative path inside the node's state dir"
RANK_TAKEN = "a rank already taken by another node of the task"
KEY_TAKEN = "a public_key already registered for another node of the task"
RANK_0_REGISTERED = "rank 0 must be registered with its rank (a peer without one may not speak as rank 0)"

_FRACTION = Annotated[float, msgspec.Meta(ge=0, lt=1)]
_NON_NEGATIVE = Annotated[float, msgspec.Meta(ge=0, le=FLOAT_MAX)]
_IGNORED_METADATA = "Run metadata: accepted and ignored (no experiment tracker here; reported in notes)."

RELATIVE_PATH = Annotated[str, msgspec.Meta(
    min_length=1, max_length=4096,
    description=f"{INSIDE_STATE[0].upper()}{INSIDE_STATE[1:]} (not blank, no leading / or ~, no '..', "
                "no NUL; a symlink out of it is refused).")]


class ModelSection(msgspec.Struct, kw_only=True):
    """Shape of the seeded Llama-style model. Also required: dim must split into n_heads heads of even
    size (dim divisible by n_heads, dim / n_heads even); n_heads must be a multiple of n_kv_heads."""

    dim: Annotated[int, msgspec.Meta(ge=2, le=16384, description=f"Model width; {SPLIT_HEADS}.")] = 64
    n_layers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 2
    n_heads: Annotated[Positive, msgspec.Meta(description=f"{HEADS_MULTIPLE}.")] = 4
    n_kv_heads: Annotated[Positive, msgspec.Meta(
        description=f"Default: min(2, n_heads); {HEADS_MULTIPLE}.")] | None = None
    ffn_hidden: Annotated[Positive, msgspec.Meta(
        description="SwiGLU width; default: 8/3 of dim rounded up to a multiple of 32.")] | None = None
    rope_theta: PositiveNumber = 10000.0
    norm_eps: PositiveNumber = 1e-5
    seed: Count = 0


class OptimSection(msgspec.Struct, kw_only=True):
    """The inner AdamW and its LR schedule (in inner steps). Also required: batch_size must be a multiple
    of train.micro_bs; warmup_steps must be <= total_steps."""

    lr: PositiveNumber = 1e-3
    weight_decay: _NON_NEGATIVE = 0.1
    adam_betas1: _FRACTION = 0.9
    adam_betas2: _FRACTION = 0.95
    warmup_steps: Annotated[Count, msgspec.Meta(description=f"{WARMUP_LIMIT}.")] = 0
    total_steps: Positive = 1000
    sched_type: Literal["cosine", "linear", "constant"] = "cosine"
    batch_size: Annotated[Positive, msgspec.Meta(description=f"{BATCH_MULTIPLE}.")] = 8


class TrainSection(msgspec.Struct, kw_only=True):
    """How a batch is split into micro-batches."""

    micro_bs: Annotated[Positive, msgspec.Meta(
        description=f"Default: optim.batch_size; optim.{BATCH_MULTIPLE}.")] | None = None
    eval_interval: Annotated[Any, msgspec.Meta(
        description="Accepted and ignored: no evaluation loop, the training loss is reported.")] = None


class DiLoCoSection(msgspec.Struct, kw_only=True):
    """H inner steps per round, then one outer SGD step on the averaged pseudo-gradient. Also required:
    nesterov needs outer_momentum > 0."""

    inner_steps: Annotated[Positive, msgspec.Meta(
        description="H; default: min(50, optim.total_steps).")] | None = None
    outer_lr: PositiveNumber = 0.7
    outer_momentum: _FRACTION = 0.9
    nesterov: Annotated[bool, msgspec.Meta(
        description=f"Default: outer_momentum > 0; {NESTEROV_MOMENTUM}.")] | None = None
    compression: Annotated[Literal["none", "fp16", "int8"], msgspec.Meta(
        description="How pseudo-gradients travel between nodes: 'none' (float32), 'fp16' or 'int8' "
                    "(absmax/127 scale per 1024 values).")] = "none"
    peer_timeout_s: Annotated[float, msgspec.Meta(
        ge=0.05, le=3600, description="Seconds after which a silent peer is dropped from an outer step "
                                      "(default 30; train_env.PEER_TIMEOUT_S sets it too).")] | None = None


class DataSection(msgspec.Struct, kw_only=True):
    """Where text comes from and how it is cut."""

    seq_length: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 64
    path: Annotated[RELATIVE_PATH | list[RELATIVE_PATH], msgspec.Meta(
        description="One path or a list; none means the built-in corpus.")] | None = None
    seed: Count = 0


class CkptSection(msgspec.Struct, kw_only=True):
    """Checkpoint directory, cadence in inner steps, and retention."""

    path: Annotated[RELATIVE_PATH, msgspec.Meta(
        description=f"{INSIDE_STATE}; default: checkpoints/task-<TASK_ID>.")] | None = None
    interval: Positive | None = None
    topk: Positive = 3
    resume: bool = False


class TrainConfig(msgspec.Struct, kw_only=True):
    """The trainer's configuration; keys the node does not use are reported back as notes."""

    train: TrainSection | None = None
    data: DataSection | None = None
    optim: OptimSection | None = None
    diloco: DiLoCoSection | None = None
    ckpt: CkptSection | None = None
    model: ModelSection | None = None
    project: Annotated[Any, msgspec.Meta(description=_IGNORED_METADATA)] = None
    name: Annotated[Any, msgspec.Meta(description=_IGNORED_METADATA)] = None
    description: Annotated[Any, msgspec.Meta(description=_IGNORED_METADATA)] = None
    group: Annotated[Any, msgspec.Meta(description=_IGNORED_METADATA)] = None
    tags: Annotated[Any, msgspec.Meta(description=_IGNORED_METADATA)] = None


def _phrased(regex: str, phrase: str) -> str:
    PATTERN_PHRASES[regex] = phrase
    return regex


_RANK_TEXT = _phrased(r"^ *[0-9]{1,18} *$", "an integer string >= 0")
_WORLD_TEXT = _phrased(r"^ *0*([1-9][0-9]{0,2}|[1-3][0-9]{3}|40[0-8][0-9]|409[0-6]) *$",
                       f"an integer string from 1 to {MAX_WORLD}")
#: 1 to 65535 in decimal, leading zeros allowed.
_PORT_DIGITS = "0*(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_PORT_TEXT = _phrased(f"^ *{_PORT_DIGITS} *$", "an integer string from 1 to 65535")
_SECONDS_TEXT = _phrased(r"^ *([0-9]{1,9}(\.[0-9]{0,9})?|\.[0-9]{1,9}) *$", "a number of seconds")
_HOST_TEXT = _phrased(r"^ *[A-Za-z0-9._:\-\[\]]* *$", "a host name or IP address")

_AnyInt = Annotated[int, msgspec.Meta(ge=-INT64_MAX, le=INT64_MAX)]
_EnvText = str | _AnyInt
_Port = Annotated[str, msgspec.Meta(pattern=_PORT_TEXT)] | Annotated[int, msgspec.Meta(ge=1, le=65535)]


class TrainEnv(msgspec.Struct, kw_only=True, rename="upper"):
    """This node's place in the run. Values are strings (integers are tolerated); null or a missing key
    takes the default. Also required: GLOBAL_RANK must be < GLOBAL_WORLD_SIZE; GLOBAL_ADDR and
    GLOBAL_PORT are required when GLOBAL_WORLD_SIZE > 1 (and the task's peers registered first with POST
    /api/v1/train/peers). Keys the node does not use are reported back as notes."""

    task_id: Annotated[_EnvText, msgspec.Meta(
        description="The task's id (default 'local'); a multi-node run's peers are registered under it.")] \
        | None = None
    node_id: _EnvText | None = None
    global_rank: Annotated[Annotated[str, msgspec.Meta(pattern=_RANK_TEXT)] | Count, msgspec.Meta(
        description=f"This node's rank (default 0); {RANK_BELOW_WORLD}.")] | None = None
    global_world_size: Annotated[
        Annotated[str, msgspec.Meta(pattern=_WORLD_TEXT)] | Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD)],
        msgspec.Meta(description="Nodes in the run (default 1).")] | None = None
    global_addr: Annotated[Annotated[str, msgspec.Meta(pattern=_HOST_TEXT)] | Count, msgspec.Meta(
        description=f"Rank 0's host, where peers meet; {ADDR_REQUIRED}.")] | None = None
    global_port: Annotated[_Port, msgspec.Meta(description=f"Rank 0's port; {ADDR_REQUIRED}.")] | None = None
    base_port: Annotated[_Port, msgspec.Meta(
        description="The port a rank other than 0 listens on when the peer registry has no entry for it.")] \
        | None = None
    global_unique_id: _EnvText | None = None
    store_api_url: Annotated[Any, msgspec.Meta(
        description="Accepted and ignored: checkpoints stay on this node (reported in notes).")] = None
    peer_timeout_s: Annotated[
        Annotated[str, msgspec.Meta(pattern=_SECONDS_TEXT)]
        | Annotated[float, msgspec.Meta(ge=0.05, le=3600)],
        msgspec.Meta(description="Seconds after which a silent peer is dropped from an outer step: "
                                 "between 0.05 and 3600 (as train_config.diloco.peer_timeout_s).")] \
        | None = None


class TrainStart(msgspec.Struct, kw_only=True):
    """The original trainer's request; the train service reports the keys it ignored as notes."""

    train_config: TrainConfig | None = None
    train_env: TrainEnv | None = None


_Z85 = r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]"
#: A Z85 group of 5 characters whose value fits 32 bits (at most "%nSc0").
_Z85_GROUP = (r"(?:[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@]" + _Z85 + "{4}|%(?:[0-9a-m]" + _Z85 + "{3}"
              + "|n(?:[0-9a-zA-R]" + _Z85 + "{2}|S(?:[0-9ab]" + _Z85 + "|c0))))")
#: Ends with ``$(?!\n)``: Python's ``$`` (msgspec, jsonschema) would also match before a final newline.
_END = r"$(?!\n)"
PUBLIC_KEY = f"^(?:{_Z85_GROUP}{{8}}|[0-9a-fA-F]{{64}}){_END}"
PATTERN_PHRASES[PUBLIC_KEY] = "a CURVE public key (40 Z85 or 64 hex characters)"

_H16 = "[0-9a-fA-F]{1,4}"
_IPV6 = "|".join((
    f"(?:{_H16}:){{7}}{_H16}",
    f"(?:{_H16}:){{1,7}}:",
    f"(?:{_H16}:){{1,6}}:{_H16}",
    f"(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}",
    f"(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}",
    f"(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}",
    f"(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}",
    f"{_H16}:(?::{_H16}){{1,6}}",
    f":(?:(?::{_H16}){{1,7}}|:)",
))
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A label that is not all digits (so a host name never reads as a broken IPv4 address).
_NAMED_LABEL = "(?:[0-9]{0,62}[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
_HOST = f"(?:{_OCTET}(?:\\.{_OCTET}){{3}}|(?:{_LABEL}\\.)*{_NAMED_LABEL}(?:\\.{_LABEL})*)"
PEER_ADDRESS = f"^(?:{_HOST}|\\[(?:{_IPV6})\\]):{_PORT_DIGITS}{_END}"
PATTERN_PHRASES[PEER_ADDRESS] = "'host:port' (a host name, an IPv4 address or [IPv6]; port 1-65535)"

PRINTABLE = r"^[\x21-\x7e]+" + _END
PATTERN_PHRASES[PRINTABLE] = "printable ASCII without spaces"
#: Task and node ids: 1 to 256 printable ASCII characters, no spaces.
PeerText = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=PRINTABLE)]


class TrainPeer(msgspec.Struct, forbid_unknown_fields=True):
    """One node of a training task: the key it proves on the peer link, where it listens."""

    node_id: PeerText
    public_key: Annotated[str, msgspec.Meta(
        pattern=PUBLIC_KEY,
        description=f"CURVE public key: 40 Z85 or 64 hex characters (GET /api/v1/identity); {KEY_TAKEN} is "
                    "refused.")]
    address: Annotated[str, msgspec.Meta(
        pattern=PEER_ADDRESS, max_length=260,
        description="host:port its peer listener is reachable at ([v6]:port for IPv6; a host name has "
                    "labels of letters, digits and '-', not all of them digits).")]
    rank: Annotated[int, msgspec.Meta(
        ge=0, lt=MAX_PEERS, description=f"GLOBAL_RANK, when known; {RANK_TAKEN} is refused; "
                                        f"{RANK_0_REGISTERED}.")] | None = None


class TrainPeers(msgspec.Struct, forbid_unknown_fields=True):
    """Register (add or update) a task's peers; replace=true drops the ones not listed. This node's own
    entry may be listed: it sets the port its listener binds. Refused: a rank already taken by another
    node of the task, a public_key already registered for another node of the task (among the peers
    listed and, unless replace=true, those registered before)."""

    task_id: Annotated[PeerText, msgspec.Meta(description="The task's id (train_env TASK_ID).")]
    peers: Annotated[list[TrainPeer], msgspec.Meta(min_length=1, max_length=MAX_PEERS)]
    replace: bool = False


class TrainPeerRemove(msgspec.Struct, forbid_unknown_fields=True):
    """Forget one peer of a task; its connections stop being heard at once."""

    task_id: Annotated[PeerText, msgspec.Meta(description="The task's id (train_env TASK_ID).")]
    node_id: PeerText


# --- answers ----------------------------------------------------------------------------------------

class DroppedPeer(msgspec.Struct, kw_only=True):
    """A training peer this node dropped for breaking the peer protocol (until its registration changes)."""

    public_key: str
    rank: int | None
    reason: str


class TrainStatus(msgspec.Struct, kw_only=True):
    """``train/status`` (whether training runs, plus progress) and what start and stop answer."""

    status: Annotated[bool | str, msgspec.Meta(
        description="train/status: whether training runs; start/stop: the outcome.")]
    state: Literal["STARTING", "RUNNING", "STOPPING", "FINISHED", "STOPPED", "FAILED"] | msgspec.UnsetType = \
        msgspec.UNSET
    notes: Annotated[list[str], msgspec.Meta(description="Request fields accepted but not honoured.")] \
        | msgspec.UnsetType = msgspec.UNSET
    task_id: str | msgspec.UnsetType = msgspec.UNSET
    rank: int | msgspec.UnsetType = msgspec.UNSET
    world_size: int | msgspec.UnsetType = msgspec.UNSET
    outer_step: int | msgspec.UnsetType = msgspec.UNSET
    inner_step: int | msgspec.UnsetType = msgspec.UNSET
    total_steps: int | msgspec.UnsetType = msgspec.UNSET
    loss: float | msgspec.UnsetType | None = msgspec.UNSET
    loss_ema: float | msgspec.UnsetType | None = msgspec.UNSET
    contributors: list[int] | msgspec.UnsetType = msgspec.UNSET
    peers: list[TrainPeer] | msgspec.UnsetType = msgspec.UNSET
    bytes_sent: int | msgspec.UnsetType = msgspec.UNSET
    bytes_received: int | msgspec.UnsetType = msgspec.UNSET
    bytes_exchanged: int | msgspec.UnsetType = msgspec.UNSET
    weights_digest: Annotated[str | None, msgspec.Meta(
        description="sha256 of the global weights (float32, parameter order) after the last outer step; "
                    "equal on every node of a run.")] | msgspec.UnsetType = msgspec.UNSET
    peers_dropped: Annotated[list[DroppedPeer], msgspec.Meta(
        description="Peers dropped for breaking the peer protocol (a malformed message, a claim of "
                    "another rank, NaN/inf data, a state that is not this model's), with the reason.")] \
        | msgspec.UnsetType = msgspec.UNSET
    error: str | msgspec.UnsetType | None = msgspec.UNSET


class TrainPeerList(msgspec.Struct, kw_only=True):
    """One task's peers (``?task_id=``) or, without it, every task's under ``tasks``."""

    task_id: str | msgspec.UnsetType = msgspec.UNSET
    peers: list[TrainPeer] | msgspec.UnsetType = msgspec.UNSET
    tasks: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET
