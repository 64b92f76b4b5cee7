"""PoC v2 bodies (pow-v2.md §2), as the Network Node's Go client sends them.

Top-level unknown keys are ignored (the client adds fields over time); ``params`` rejects unknown keys
with 422 (§2.1), because a parameter we do not understand would silently change which artifacts we
compute. Optional members use ``UNSET`` rather than ``None`` so that "absent" and the §6.4 defaults stay
distinguishable and the published JSON Schema stays plain (no ``anyOf``). The one cross-field rule (the
validation artifacts name exactly the requested nonces) is in ``Generate.__post_init__`` and its
description.

The answer of the engines' ``/collective_rpc`` method ``mlnode_poc_artifacts`` is declared here too:
pow parses it with these Structs, the engines produce it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from contracts.checked import PATTERN_PHRASES
from contracts.fields import INT64_MAX, URL_BODY, Count, Text
from node.errors import InvalidRequest, Unprocessable

Nonce = Annotated[int, Meta(ge=0, le=INT64_MAX, description="A nonce (int64, never negative).")]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]

CALLBACK_URL = rf"^$|^{URL_BODY}$"
PATTERN_PHRASES[CALLBACK_URL] = "an http(s) URL (or empty: no callbacks)"
#: A callback base, used as opaque bytes (§4.1); empty means "report nothing".
CallbackUrl = Annotated[str, Meta(pattern=CALLBACK_URL, description=(
    "An http(s) URL with a host (printable ASCII), or empty. Refused when it resolves to this node's own "
    "ports, loopback (unless MLNODE_CALLBACK_ALLOW_LOOPBACK), link-local, unspecified or multicast "
    "addresses, or a host outside MLNODE_CALLBACK_HOSTS when that is set."))]
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
PATTERN_PHRASES[BASE64] = "standard base64 with padding"
Base64 = Annotated[str, Meta(pattern=BASE64)]

#: Go's client never sends it; 12 numbers per fingerprint (§5.5).
DEFAULT_K_DIM = 12
DEFAULT_BATCH_SIZE = 32
#: §6.4: the reference engine's defaults, used when ``stat_test`` or one of its fields is absent.
DEFAULT_DIST_THRESHOLD = 0.02
DEFAULT_P_MISMATCH = 0.001
DEFAULT_FRAUD_THRESHOLD = 0.01
NONCES_MISMATCH = "validation.artifacts nonces must match nonces field"


class PocStatus(StrEnum):
    """PoC v2 status of the engines (§2.5, §2.7; a str enum: it encodes as its wire string)."""

    GENERATING = "GENERATING"
    MIXED = "MIXED"
    IDLE = "IDLE"
    NO_BACKENDS = "NO_BACKENDS"


GENERATING, IDLE = PocStatus.GENERATING, PocStatus.IDLE
MIXED, NO_BACKENDS = PocStatus.MIXED, PocStatus.NO_BACKENDS


def aggregate(statuses: list[str]) -> str:
    """§2.5: GENERATING if every engine is, IDLE if every engine is, MIXED otherwise."""
    if statuses and all(s == GENERATING for s in statuses):
        return GENERATING
    if statuses and all(s == IDLE for s in statuses):
        return IDLE
    return MIXED


class PocParams(Struct, forbid_unknown_fields=True):
    """What to compute with: the served model, tokens per nonce, fingerprint length."""

    model: Text
    seq_len: Annotated[int, Meta(ge=1, le=1 << 20)]
    k_dim: Annotated[int, Meta(ge=1, le=1 << 16)] = DEFAULT_K_DIM
    #: Decode scheme (§8), refused with 422 until a release of it exists.
    decode: bool = False
    max_tokens: Count = 0


class InitGenerate(Struct):
    """``POST /api/v1/inference/pow/init/generate``: start the endless generation loops."""

    block_hash: Text
    block_height: Count
    public_key: Text
    node_id: Count
    node_count: Annotated[int, Meta(ge=1, le=INT64_MAX)]
    params: PocParams
    url: CallbackUrl = ""
    poc_stronger_rng: bool = False
    batch_size: Annotated[int, Meta(ge=1, le=4096)] = DEFAULT_BATCH_SIZE


class Artifact(Struct):
    """One fingerprint: ``k_dim`` little-endian halves, base64 with padding."""

    nonce: Nonce
    vector_b64: Base64 = ""


class Validation(Struct):
    artifacts: list[Artifact]


class StatTest(Struct):
    """The binomial test's knobs; ``p_value_threshold`` (sent by Go) is not one of them (§6.4)."""

    dist_threshold: Annotated[float, Meta(ge=0.0)] | UnsetType = UNSET
    p_mismatch: Probability | UnsetType = UNSET
    fraud_threshold: Probability | UnsetType = UNSET


class Generate(Struct):
    """``POST /api/v1/inference/pow/generate``: artifacts of explicit nonces, or their validation.
    Also required: with ``validation``, its artifacts name exactly the set of ``nonces`` (refused as
    'validation.artifacts nonces must match nonces field')."""

    block_hash: Text
    block_height: Count
    public_key: Text
    nonces: list[Nonce]
    params: PocParams
    node_id: Count = 0
    node_count: Count = 0
    url: CallbackUrl = ""
    validation: Validation | UnsetType = UNSET
    stat_test: StatTest | UnsetType = UNSET
    wait: bool = False
    poc_stronger_rng: bool = False
    batch_size: Annotated[int, Meta(ge=1, le=4096)] = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        validation = self.validation
        if isinstance(validation, UnsetType):
            return
        if {a.nonce for a in validation.artifacts} != set(self.nonces):
            raise ValueError(NONCES_MISMATCH)


class Stop(Struct):
    """``POST /api/v1/inference/pow/stop``: Go sends ``{}``."""


class EngineResult(Struct):
    """What the one rank holding the final norm output answers (PLAN.md, "Engine PoC RPC").

    vLLM turns an exception in a worker method into a 500, so the worker answers bad kwargs with
    ``{"error": ...}`` instead; pow treats that like the CPU engine's 400.
    """

    artifacts: list[Artifact] = msgspec.field(default_factory=list)
    dropped: list[int] = msgspec.field(default_factory=list)
    error: str = ""


class EngineAnswer(Struct):
    results: list[EngineResult | None]


class JobQuery(Struct):
    """``GET /api/v1/inference/pow/generate/{request_id}``: the composite ``port:uuid`` id."""

    request_id: str


def refused(message: str) -> InvalidRequest:
    """How a v2 body the contract refuses is answered: 422 for an unknown ``params`` key, else 400."""
    if message.startswith("params.") and message.endswith(" is not a known field"):
        return Unprocessable(message)
    return InvalidRequest(message)


def check_scheme(params: PocParams) -> None:
    """Only the prefill scheme exists as a release; a decode request must not get prefill artifacts."""
    if params.decode or params.max_tokens > 0:
        raise Unprocessable("decode PoC scheme not supported (params.decode / params.max_tokens)")


# --- answers ----------------------------------------------------------------------------------------

class InitAnswer(Struct):
    """``init/generate``: how many engines run a loop, and each engine's answer."""

    status: str
    backends: int
    n_groups: int
    results: list[Any]
    errors: list[Any] | UnsetType | None = UNSET


class GenerateAnswer(Struct):
    """queued: ``request_id`` is ``port:uuid`` and ``queued_count``; completed (``wait``): the result."""

    status: Literal["queued", "completed"]
    request_id: str
    queued_count: int | UnsetType = UNSET


class JobAnswer(Struct):
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    request_id: str
    error: str | UnsetType = UNSET


class StatusAnswer(Struct):
    """Per engine IDLE or GENERATING with config and stats, aggregated."""

    status: PocStatus
    backends: list[Any]


class StopAnswer(Struct):
    status: str
    results: list[Any] | UnsetType = UNSET
