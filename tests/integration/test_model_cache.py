"""The model cache on the real node: the Network Node's exact requests, real huggingface_hub downloads
from a local stand-in of the hub (``HF_ENDPOINT``), faults on the hub's side, and serving from the cache.

One node for the module; each test uses its own repos on the stand-in so that they do not interfere.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hub import Hub
from tests.support.node import Node, Response
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "infval-tiny-qwen3"
STALL_S = 3


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    h = Hub()
    yield h
    h.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, hub: Hub) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("models")
    n = Node(root, HF_HOME=str(root / "hf"), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0",
             MLNODE_DOWNLOAD_STALL_SECONDS=str(STALL_S)).start()
    yield n
    n.stop()


def post(node: Node, path: str, body: dict[str, Any]) -> Response:
    """As the Network Node sends it: JSON, no Content-Type."""
    return node.api("POST", path, json.dumps(body).encode())


def delete(node: Node, body: dict[str, Any]) -> Response:
    """The client's DELETE carries application/json."""
    return node.api("DELETE", "/api/v1/models", json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"})


def status(node: Node, repo: str, commit: str | None = None) -> dict[str, Any]:
    resp = post(node, "/api/v1/models/status", {"hf_repo": repo, "hf_commit": commit})
    assert resp.status == 200, resp.body
    return dict(resp.json())


def downloaded(node: Node, repo: str, commit: str | None = None) -> dict[str, Any]:
    return wait_until(lambda: (s := status(node, repo, commit))["status"] == "DOWNLOADED" and s, 60, 0.2)


def test_client_flow_status_download_list_space(node: Node, hub: Hub) -> None:
    commit = hub.add_dir("org/tiny-qwen3", GOLDEN)
    body = status(node, "org/tiny-qwen3")
    assert body == {"model": {"hf_repo": "org/tiny-qwen3", "hf_commit": None}, "status": "NOT_FOUND",
                    "progress": None, "error_message": None}
    resp = post(node, "/api/v1/models/download", {"hf_repo": "org/tiny-qwen3", "hf_commit": None})
    assert resp.status == 202, resp.body
    assert resp.json() == {"task_id": "org/tiny-qwen3:latest", "status": "DOWNLOADING",
                           "model": {"hf_repo": "org/tiny-qwen3", "hf_commit": None}}
    done = downloaded(node, "org/tiny-qwen3")
    assert done["progress"] is None and done["error_message"] is None
    assert status(node, "org/tiny-qwen3", commit)["status"] == "DOWNLOADED"
    again = post(node, "/api/v1/models/download", {"hf_repo": "org/tiny-qwen3", "hf_commit": commit})
    assert (again.status, again.json()["status"]) == (202, "DOWNLOADED")
    listed = node.api("GET", "/api/v1/models/list").json()["models"]
    assert {"model": {"hf_repo": "org/tiny-qwen3", "hf_commit": commit}, "status": "DOWNLOADED"} in listed
    space = node.api("GET", "/api/v1/models/space").json()
    assert space["cache_path"] == str((Path(node.env["HF_HOME"]) / "hub").resolve())
    assert space["available_gb"] > 0 and space["cache_size_gb"] >= 0
    snapshot = Path(space["cache_path"]) / "models--org--tiny-qwen3" / "snapshots" / commit
    assert (snapshot / "model.safetensors").read_bytes() == (GOLDEN / "model.safetensors").read_bytes()
    events = [e.get("event") for e in node.log_lines("inference")]
    assert "model_download_started" in events and "model_download_finished" in events


def test_a_missing_repo_or_revision_fails_at_once_with_its_reason(node: Node, hub: Hub) -> None:
    hub.add("org/exists", {"config.json": b"{}"})
    for repo, commit, reason in (("org/missing", None, "RepositoryNotFound"),
                                 ("org/exists", "f" * 40, "RevisionNotFound")):
        assert post(node, "/api/v1/models/download", {"hf_repo": repo, "hf_commit": commit}).status == 202
        body = wait_until(lambda r=repo, c=commit: (s := status(node, r, c))["status"] != "DOWNLOADING" and s,
                          30, 0.2)
        assert body["status"] == "NOT_FOUND" and reason in body["error_message"], body
    # One attempt each: nothing is retried that cannot succeed.
    assert hub.count("GET", r"^/api/models/org/missing/revision/") == 1
    assert hub.count("GET", r"^/api/models/org/exists/tree/f{40}") == 1


def test_bad_bodies_are_400_with_the_field(node: Node) -> None:
    for body, field in (({}, "hf_repo"), ({"hf_repo": "../etc"}, "hf_repo"), ({"hf_repo": 7}, "hf_repo"),
                        ({"hf_repo": "a/b", "hf_commit": "../../x"}, "hf_commit")):
        for path in ("/api/v1/models/status", "/api/v1/models/download"):
            resp = post(node, path, body)
            assert resp.status == 400 and field in resp.json()["detail"], (path, body, resp.body)
        assert delete(node, body).status == 400


def test_a_stalled_download_is_killed_and_retried(node: Node, hub: Hub) -> None:
    files = {"config.json": b"{}", "model.safetensors": os.urandom(3 << 20)}
    commit = hub.add("org/stalls", files)
    stall = hub.stall("model.safetensors", after=1 << 20)
    assert post(node, "/api/v1/models/download", {"hf_repo": "org/stalls", "hf_commit": None}).status == 202
    assert stall.hit.wait(30)
    body = status(node, "org/stalls")
    assert body["status"] == "DOWNLOADING" and body["progress"]["attempt"] == 1
    assert body["progress"]["elapsed_seconds"] >= 0 and body["progress"]["start_time"] > 0
    # While it hangs, a second download of the same model is refused and the progress shows in /metrics.
    again = post(node, "/api/v1/models/download", {"hf_repo": "org/stalls", "hf_commit": None})
    assert (again.status, again.json()) == (409, {"detail": "Model org/stalls:latest is already downloading"})
    scrape = node.api("GET", "/metrics").body.decode()
    assert 'mlnode_model_downloads_active 1.0' in scrape
    assert 'mlnode_model_download_bytes{task_id="org/stalls:latest"}' in scrape
    downloaded(node, "org/stalls")
    stall.release.set()
    events = [e for e in node.log_lines("inference") if e.get("task_id") == "org/stalls:latest"]
    seen = [e["event"] for e in events if e["event"] in ("model_download_stalled", "model_download_finished")]
    assert seen == ["model_download_stalled", "model_download_finished"]
    repo = Path(node.env["HF_HOME"]) / "hub" / "models--org--stalls"
    assert (repo / "snapshots" / commit / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not list((repo / "blobs").glob("*.incomplete")), "the killed attempt left its partial file"


def test_a_dropped_connection_resumes_where_it_stopped(node: Node, hub: Hub) -> None:
    # huggingface_hub writes in 10 MiB chunks: a break 12 MiB in resumes from the 10 MiB it kept.
    files = {"model.safetensors": os.urandom(24 << 20)}
    commit = hub.add("org/drops", files)
    hub.stall("model.safetensors", after=12 << 20, drop=True)
    assert post(node, "/api/v1/models/download", {"hf_repo": "org/drops", "hf_commit": None}).status == 202
    downloaded(node, "org/drops")
    assert hub.ranges(r"/org/drops/resolve/.*model\.safetensors$") == [f"bytes={10 << 20}-"]
    cached = Path(node.env["HF_HOME"]) / "hub" / "models--org--drops" / "snapshots" / commit
    assert (cached / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not any(e.get("event") == "model_download_retry" and e.get("task_id") == "org/drops:latest"
                   for e in node.log_lines("inference"))


def test_a_failing_hub_is_retried(node: Node, hub: Hub) -> None:
    hub.add("org/flaky", {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(4096)})
    hub.fail_next("model.safetensors", times=1)
    assert post(node, "/api/v1/models/download", {"hf_repo": "org/flaky", "hf_commit": None}).status == 202
    downloaded(node, "org/flaky")
    assert any(e.get("event") == "model_download_retry" and e.get("task_id") == "org/flaky:latest"
               for e in node.log_lines("inference"))


def test_at_most_three_downloads_and_delete_cancels_a_running_one(node: Node, hub: Hub) -> None:
    stalls = []
    for i in range(3):
        hub.add(f"org/slow{i}", {f"w{i}.safetensors": os.urandom(1 << 20)})
        stalls.append(hub.stall(f"w{i}.safetensors", after=4096))
        resp = post(node, "/api/v1/models/download", {"hf_repo": f"org/slow{i}", "hf_commit": None})
        assert resp.status == 202
    for stall in stalls:
        assert stall.hit.wait(30)
    refused = post(node, "/api/v1/models/download", {"hf_repo": "org/tiny-other", "hf_commit": None})
    assert (refused.status, refused.json()) == (429, {"detail": "Maximum concurrent downloads (3) reached"})
    for i in range(3):
        resp = delete(node, {"hf_repo": f"org/slow{i}", "hf_commit": None})
        assert (resp.status, resp.json()) == (200, {"status": "cancelled",
                                                    "model": {"hf_repo": f"org/slow{i}", "hf_commit": None}})
        stalls[i].release.set()
    assert status(node, "org/slow0")["status"] != "DOWNLOADING"
    assert node.api("GET", "/metrics").body.decode().count("mlnode_model_download_bytes{") == 0


def test_delete_a_revision_and_unknown_models_are_404(node: Node, hub: Hub) -> None:
    commit = hub.add("org/deleteme", {"config.json": b"{}", "m.safetensors": os.urandom(1024)})
    post(node, "/api/v1/models/download", {"hf_repo": "org/deleteme", "hf_commit": commit})
    downloaded(node, "org/deleteme", commit)
    resp = delete(node, {"hf_repo": "org/deleteme", "hf_commit": "0" * 40})
    assert resp.status == 404 and "not in the cache" in resp.json()["detail"]
    resp = delete(node, {"hf_repo": "org/deleteme", "hf_commit": commit})
    assert (resp.status, resp.json()["status"]) == (200, "deleted")
    assert status(node, "org/deleteme", commit)["status"] == "NOT_FOUND"
    assert not (Path(node.env["HF_HOME"]) / "hub" / "models--org--deleteme" / "snapshots" / commit).exists()
    assert delete(node, {"hf_repo": "org/never-seen", "hf_commit": None}).status == 404


def test_downloaded_stays_downloaded_without_the_hub_and_unverified_is_partial(node: Node, hub: Hub) -> None:
    commit = hub.add("org/offline", {"config.json": b"{}", "m.safetensors": os.urandom(2048)})
    post(node, "/api/v1/models/download", {"hf_repo": "org/offline", "hf_commit": None})
    downloaded(node, "org/offline")
    hub.repos.pop("org/offline")  # the hub forgets it: only what the node recorded can tell
    assert status(node, "org/offline")["status"] == "DOWNLOADED"
    assert status(node, "org/offline", commit)["status"] == "DOWNLOADED"
    # A snapshot nobody verified (copied in by hand, a file missing): cached but not known complete.
    repo = Path(node.env["HF_HOME"]) / "hub" / "models--org--hand-copied"
    (repo / "snapshots" / ("c" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("c" * 40) / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    assert status(node, "org/hand-copied")["status"] == "PARTIAL"
    listed = node.api("GET", "/api/v1/models/list").json()["models"]
    assert {"model": {"hf_repo": "org/hand-copied", "hf_commit": "c" * 40}, "status": "PARTIAL"} in listed
    # Verified files that were damaged since are no longer complete.
    cache = Path(node.env["HF_HOME"]) / "hub"
    (cache / "models--org--offline" / "snapshots" / commit / "m.safetensors").unlink()
    assert status(node, "org/offline")["status"] == "PARTIAL"


def test_inference_up_of_a_hub_id_serves_the_cached_model_with_the_cpu_engine(node: Node, hub: Hub) -> None:
    commit = hub.add_dir("org/served-qwen3", GOLDEN)
    post(node, "/api/v1/models/download", {"hf_repo": "org/served-qwen3", "hf_commit": commit})
    downloaded(node, "org/served-qwen3", commit)
    up = post(node, "/api/v1/inference/up", {"model": "org/served-qwen3", "dtype": "auto",
                                             "additional_args": ["--revision", commit,
                                                                 "--served-model-name", "net/model-id"]})
    try:
        assert up.status == 200, up.body
        served = node.inference("GET", "/v1/models").json()
        assert served["data"][0]["id"] == "net/model-id"
        snapshot = str(Path(node.env["HF_HOME"]).resolve() / "hub" / "models--org--served-qwen3" / "snapshots"
                       / commit)
        assert any(e.get("event") == "inference_model_from_cache" and e.get("path") == snapshot
                   for e in node.log_lines("inference"))
        chat = node.api("POST", "/v1/chat/completions", {"model": "net/model-id", "max_tokens": 1,
                                                         "messages": [{"role": "user", "content": "ping"}]})
        assert chat.status == 200 and chat.json()["choices"]
        # The served model's files are not deleted under the engine.
        refused = delete(node, {"hf_repo": "org/served-qwen3", "hf_commit": None})
        assert refused.status == 409 and "being served" in refused.json()["detail"]
    finally:
        assert node.api("POST", "/api/v1/stop").status == 200
    assert delete(node, {"hf_repo": "org/served-qwen3", "hf_commit": None}).json()["status"] == "deleted"


def test_downloads_resume_after_the_inference_process_is_killed(node: Node, hub: Hub) -> None:
    hub.add("org/survives", {"config.json": b"{}", "big.safetensors": os.urandom(2 << 20)})
    stall = hub.stall("big.safetensors", after=1 << 19)
    post(node, "/api/v1/models/download", {"hf_repo": "org/survives", "hf_commit": None})
    assert stall.hit.wait(30)
    old = node.pid("inference")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: node.pid("inference") not in (0, old), 30)
    node.wait_services()
    downloaded(node, "org/survives")
    stall.release.set()
    assert any(e.get("event") == "model_download_resumed" for e in node.log_lines("inference"))
