"""pow's client of one engine's PoC method: ``POST /collective_rpc`` with ``mlnode_poc_artifacts``.

The engines (vLLM with our worker extension, or the CPU engine) compute the artifacts; this module
only frames the call and checks the answer, so a half-broken engine reply becomes a clear error rather
than a wrong artifact reported to the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import msgspec

from contracts.pow_v2 import EngineAnswer
from node.errors import InvalidRequest, Unavailable

METHOD = "mlnode_poc_artifacts"
#: §2.3: a chunk of engine work that takes longer than this fails the job (503 when waited for).
CHUNK_TIMEOUT_S = 60.0


class EngineRefused(InvalidRequest):
    """The engine answered 4xx: the kwargs are wrong for it (seq_len, k_dim); retrying will not help."""


class EngineDown(Unavailable):
    """No usable answer (transport error, timeout, 5xx, malformed reply); retrying may help."""


@dataclass(frozen=True)
class Computed:
    """Artifacts by nonce (base64), plus the nonces the engine dropped as non-finite (§5.6)."""

    vectors: dict[int, str]
    dropped: list[int]


@dataclass(frozen=True)
class Seed:
    """What makes the numbers: the stage seed and the computation's shape."""

    block_hash: str
    public_key: str
    seq_len: int
    k_dim: int
    stronger_rng: bool


class EngineClient:
    """One shared async HTTP client for every engine on this host (loopback only, no proxies)."""

    def __init__(self, timeout_s: float = CHUNK_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0), trust_env=False)

    async def artifacts(self, port: int, seed: Seed, nonces: list[int]) -> Computed:
        body = {"method": METHOD, "kwargs": {
            "block_hash": seed.block_hash, "public_key": seed.public_key, "nonces": nonces,
            "seq_len": seed.seq_len, "k_dim": seed.k_dim, "stronger_rng": seed.stronger_rng}}
        try:
            resp = await self._client.post(f"http://127.0.0.1:{port}/collective_rpc", json=body)
        except httpx.TimeoutException:
            raise EngineDown(f"engine {port} did not compute {len(nonces)} nonces within "
                             f"{self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise EngineDown(f"engine {port} unreachable: {type(exc).__name__}: {exc}") from None
        if 400 <= resp.status_code < 500:
            raise EngineRefused(f"engine {port} refused the PoC call ({resp.status_code}): "
                                f"{_short(resp.text)}")
        if resp.status_code != 200:
            raise EngineDown(f"engine {port} failed the PoC call ({resp.status_code}): {_short(resp.text)}")
        return parse_answer(resp.content, port, nonces)

    async def close(self) -> None:
        await self._client.aclose()


def parse_answer(raw: bytes, port: int, nonces: list[int]) -> Computed:
    """The one non-null worker result, checked: only nonces we asked for, none twice."""
    try:
        answer = msgspec.json.decode(raw, type=EngineAnswer)
    except msgspec.DecodeError as exc:
        raise EngineDown(f"engine {port} answered the PoC call with an unexpected body: {exc}") from None
    results = [r for r in answer.results if r is not None]
    if len(results) != 1:
        raise EngineDown(f"engine {port}: expected exactly one non-null worker result, got {len(results)}")
    if results[0].error:
        raise EngineRefused(f"engine {port} refused the PoC call: {_short(results[0].error)}")
    asked = set(nonces)
    vectors: dict[int, str] = {}
    for artifact in results[0].artifacts:
        if artifact.nonce not in asked or artifact.nonce in vectors or not artifact.vector_b64:
            raise EngineDown(f"engine {port} returned an artifact for nonce {artifact.nonce} that was "
                             "not asked for, twice, or empty")
        vectors[artifact.nonce] = artifact.vector_b64
    return Computed(vectors, [n for n in results[0].dropped if n in asked])


def _short(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]
