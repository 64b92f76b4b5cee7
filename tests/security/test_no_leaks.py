"""Secrets stay secret: in logs, error bodies and status, in what engines inherit, in what the gateway
holds, and in the modes of the files the node writes.

The operator here allows ``--api-key`` (``MLNODE_ENGINE_ALLOW_FLAGS``) and passes one variable of its
own to engines (``MLNODE_ENGINE_ENV``); the node's environment also holds secrets engines must not get.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.conftest import strict
from tests.support.node import Node
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

API_KEY = "sekrit-api-key-4711"
SECRETS = (API_KEY, "aws-sekrit-0815", "hf_sekrit_token")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = strict(tmp_path_factory.mktemp("secrets"), MLNODE_ENGINE_ALLOW_FLAGS="--api-key",
               MLNODE_ENGINE_ENV="MLNODE_SEC_PASSED", MLNODE_SEC_PASSED="passed-through",
               AWS_SECRET_ACCESS_KEY=SECRETS[1], HF_TOKEN=SECRETS[2]).start()
    yield n
    n.stop()


def written(node: Node) -> str:
    """Everything the node wrote where operators and clients read: logs, engine logs, status."""
    texts = [p.read_text(errors="replace") for p in [*(node.state_dir / "logs").glob("*.log"),
                                                     *(node.state_dir / "inference").glob("engine-*.log")]]
    texts += [node.api("GET", path).body.decode() for path in
              ("/api/v1/state", "/api/v1/inference/up/status", "/health", "/metrics")]
    texts.append(node.cli("status", "--json", check=False).stdout)
    return "\n".join(texts)


def test_an_allowed_secret_flag_is_never_written_down(node: Node, tmp_path: Path) -> None:
    body = {"model": "org/secret-model", "dtype": "auto", "additional_args": ["--api-key", API_KEY]}
    assert node.api("POST", "/api/v1/inference/up", body, timeout=180).status == 200
    [pid, *_] = sorted(node.engine_pids())
    assert API_KEY in Path(f"/proc/{pid}/cmdline").read_bytes().decode()  # the engine does get it
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    failed = node.api("POST", "/api/v1/inference/up", {**body, "model": str(broken)}, timeout=180)
    assert failed.status == 503 and "last log lines" in failed.json()["detail"]
    text = written(node) + failed.body.decode()
    for secret in SECRETS:
        assert secret not in text
    assert "[redacted]" in text


def test_engines_get_an_explicit_environment(node: Node) -> None:
    body = {"model": "org/secret-model", "dtype": "auto", "additional_args": []}
    assert node.api("POST", "/api/v1/inference/up", body, timeout=180).status == 200
    [pid, *_] = sorted(node.engine_pids())
    environ = dict(entry.split("=", 1) for entry in
                   Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in entry)
    assert environ["MLNODE_SEC_PASSED"] == "passed-through"  # what the operator passes
    assert environ["HF_TOKEN"] == SECRETS[2] and "PATH" in environ  # what the hub and vLLM need
    assert not {"AWS_SECRET_ACCESS_KEY", "MLNODE_STATE_DIR", "MLNODE_API_PORT", "MLNODE_ENGINE_ALLOW_FLAGS",
                "SUPERVISOR_SERVER_URL", "MLNODE_PYTHON"} & set(environ)
    assert Path(f"/proc/{pid}/cwd").resolve() == node.state_dir / "inference" / "engine-cwd"
    assert node.api("POST", "/api/v1/inference/down").status == 200


def test_the_gateway_holds_only_its_own_bus_key(node: Node, tmp_path: Path) -> None:
    """With every secret key file but its own ruined, a restarted gateway serves as before: it never
    reads the node's identity (or another program's key), it knows their public halves only."""
    keys = node.state_dir / "keys"
    identity = node.api("GET", "/api/v1/identity").json()
    others = [keys / "node.key", *(p for p in (keys / "local").glob("*.key") if p.name != "gateway.key")]
    saved = tmp_path / "saved"
    saved.mkdir()
    for path in others:
        shutil.copy2(path, saved / path.name)
        path.write_text("{not a key")
    try:
        before = node.pid("gateway")
        node.ctl("restart", "gateway")
        wait_until(lambda: node.pid("gateway") not in (0, before), 60, 0.3)
        node.wait_services()
        assert node.api("GET", "/api/v1/identity").json() == identity
        assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"  # it reaches the services
    finally:
        for path in others:
            shutil.copy2(saved / path.name, path)


def test_state_files_are_private(node: Node) -> None:
    loose = []
    for root, dirs, files in os.walk(node.state_dir):
        for name in [*dirs, *files]:
            path = Path(root) / name
            mode = path.lstat().st_mode
            if stat.S_ISSOCK(mode) or stat.S_ISLNK(mode):
                continue
            if stat.S_IMODE(mode) & 0o077:
                loose.append(f"{path.relative_to(node.state_dir)} {stat.S_IMODE(mode):o}")
    assert loose == []
    assert json.loads((node.state_dir / "keys" / "public.json").read_text())["format"]
