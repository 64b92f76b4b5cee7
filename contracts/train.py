"""Training request bodies (owner from now on: the train helper; these mirror the previous schemas)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from contracts.fields import Text

SECTIONS = ("train", "data", "optim", "diloco", "ckpt", "model")
_Section = dict[str, Any] | None


class TrainConfig(msgspec.Struct):
    """The trainer's configuration; sections the node does not read are reported back as notes."""

    train: _Section = None
    data: _Section = None
    optim: _Section = None
    diloco: Annotated[_Section, msgspec.Meta(description=(
        "inner_steps, outer_lr, outer_momentum, nesterov, peer_timeout_s, and compression: how "
        "pseudo-gradients travel between nodes, 'none' (float32, default), 'fp16' or 'int8' "
        "(absmax/127 scale per 1024 values); any other value is a 400."))] = None
    ckpt: _Section = None
    model: _Section = None


class TrainStart(msgspec.Struct):
    """The original trainer's request; the train service reports fields it ignored."""

    train_config: TrainConfig | None = None
    train_env: Annotated[dict[str, str | int | None] | None, msgspec.Meta(
        description="String values (TASK_ID, GLOBAL_ADDR, GLOBAL_RANK, ...); integers are tolerated.")] = None


class TrainPeer(msgspec.Struct, forbid_unknown_fields=True):
    """One node of a training task: the key it proves on the peer link, where it listens."""

    node_id: Text
    public_key: Annotated[str, msgspec.Meta(
        description="CURVE public key: 40 Z85 or 64 hex characters (GET /api/v1/identity).")]
    address: Annotated[str, msgspec.Meta(
        description="host:port its peer listener is reachable at ([v6]:port for IPv6).")]
    rank: Annotated[int, msgspec.Meta(ge=0, description="GLOBAL_RANK, when known.")] | None = None


class TrainPeers(msgspec.Struct, forbid_unknown_fields=True):
    """Register (add or update) a task's peers; replace=true drops the ones not listed. This node's own
    entry may be listed: it sets the port its listener binds."""

    task_id: Annotated[Text, msgspec.Meta(description="The task's id (train_env TASK_ID).")]
    peers: Annotated[list[TrainPeer], msgspec.Meta(max_length=4096)]
    replace: bool = False


class TrainPeerRemove(msgspec.Struct, forbid_unknown_fields=True):
    """Forget one peer of a task; its connections stop being heard at once."""

    task_id: Annotated[Text, msgspec.Meta(description="The task's id (train_env TASK_ID).")]
    node_id: Text
