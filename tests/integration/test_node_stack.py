"""The real supervised node: four processes, the client's first calls, crashes and restarts."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node import REPO, Node
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("node")).start()
    yield n
    n.stop()


def test_client_first_contact_state_and_stop_without_content_type(node: Node) -> None:
    resp = node.api("GET", "/api/v1/state")
    assert resp.status == 200
    assert resp.json()["state"] == "STOPPED"
    assert isinstance(resp.json()["version"], str)
    # The Network Node's stop: POST, no body, no Content-Type.
    resp = node.api("POST", "/api/v1/stop")
    assert (resp.status, resp.json()) == (200, {"status": "OK"})
    resp = node.api("POST", "/api/v1/stop", b"")
    assert (resp.status, resp.json()) == (200, {"status": "OK"})
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"


def test_unknown_routes_are_404_or_405_never_200(node: Node) -> None:
    assert node.api("GET", "/api/v1/nope").status == 404
    assert node.api("GET", "/api/v2/state").status == 404
    assert node.api("POST", "/api/v1/state").status == 405
    assert node.api("GET", "/api/v1/stop").status == 405
    assert node.api("DELETE", "/api/v1/identity").status == 405
    assert node.api("GET", "/api/v1/pow/phase/generate").status == 405


def test_bad_json_is_a_400_with_a_reason(node: Node) -> None:
    resp = node.api("POST", "/api/v1/pow/init/generate", b"{not json")
    assert resp.status == 400
    assert "JSON" in resp.json()["detail"]
    resp = node.api("POST", "/api/v1/pow/init/generate", b'{"r_target": NaN}')
    assert resp.status == 400
    assert "NaN" in resp.json()["detail"]


def test_identity_is_the_key_file_public_half(node: Node) -> None:
    body = node.api("GET", "/api/v1/identity").json()
    key_file = node.state_dir / "keys" / "node.key"
    assert body["public_key"] in key_file.read_text()
    assert len(body["public_key"]) == 40 and len(body["public_key_hex"]) == 64
    assert "secret" not in body
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((node.state_dir / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((node.state_dir / "run").stat().st_mode) == 0o700
    cli = node.cli("identity", "--json").stdout
    assert body["public_key"] in cli and "secret" not in cli


def test_supervisorctl_works_for_operators_and_socket_is_private(node: Node) -> None:
    status = node.ctl("status")
    for program in ("gateway", "pow", "inference", "train"):
        assert program in status and "RUNNING" in status.split(program, 1)[1].splitlines()[0]
    sock = node.state_dir / "run" / "supervisor.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    conf = (REPO / "supervisord.conf").read_text()
    assert "[inet_http_server]" not in conf


def test_logs_are_json_lines_with_the_process_name(node: Node) -> None:
    for program in ("gateway", "pow", "inference", "train"):
        entries = node.log_lines(program)
        assert entries, program
        assert all("unparsed" not in e for e in entries), (program, [e for e in entries if "unparsed" in e])
        assert {e.get("process") for e in entries} == {program}
    for path in (node.state_dir / "logs").glob("*.log"):
        assert "secret" not in path.read_text().lower()


def test_kill_9_of_a_service_is_restarted_and_state_answers_again(node: Node) -> None:
    for program in ("pow", "inference", "train"):
        old = node.pid(program)
        assert old > 0
        os.kill(old, signal.SIGKILL)
        wait_until(lambda p=program, o=old: node.pid(p) not in (0, o), 20, message=f"{program} not restarted")
        wait_until(lambda: node.api("GET", "/api/v1/state", timeout=10).status == 200, 20)
        body = wait_until(lambda: node.api("GET", "/health").status == 200 and node.api("GET", "/health"), 30)
        assert body.json()["managers"][program]["running"] is True


def test_kill_9_of_the_gateway_is_restarted(node: Node) -> None:
    old = node.pid("gateway")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: node.pid("gateway") not in (0, old), 20)
    resp = wait_until(lambda: node.api("GET", "/api/v1/state", timeout=5), 30)
    assert resp.status == 200 and resp.json()["state"] == "STOPPED"


def test_health_names_the_process_that_is_down(node: Node) -> None:
    node.ctl("stop", "train")
    try:
        resp = node.api("GET", "/health")
        assert resp.status == 503
        body = resp.json()
        assert body["status"] == "unhealthy"
        assert body["down"] == ["train"]
        assert body["managers"]["train"]["running"] is False
        assert body["managers"]["pow"]["running"] is True
        assert node.api("GET", "/readyz").status == 503
        assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    finally:
        node.ctl("start", "train")
    node.wait_services()
    assert node.api("GET", "/readyz").json() == {"ready": True, "service_state": "STOPPED"}


def test_inference_port_is_bound_and_says_no_backend(node: Node) -> None:
    resp = node.inference("GET", "/health")
    assert resp.status == 503
    assert "backend" in resp.json()["detail"]


def test_bad_setting_stops_a_process_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    env = dict(os.environ, MLNODE_STATE_DIR=str(tmp_path / "s"), MLNODE_API_PORT="80800")
    proc = subprocess.run([sys.executable, "-m", "services.pow"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 78
    assert proc.stderr.strip().splitlines() == [
        "mlnode pow: MLNODE_API_PORT must be a TCP port between 1 and 65535, got '80800'"
    ]


def test_corrupt_key_file_stops_the_node_with_a_clear_error(tmp_path: Path) -> None:
    keys = tmp_path / "s" / "keys"
    keys.mkdir(parents=True)
    (keys / "node.key").write_text("{garbage")
    os.chmod(keys / "node.key", 0o600)
    env = dict(os.environ, MLNODE_STATE_DIR=str(tmp_path / "s"))
    proc = subprocess.run([sys.executable, "-m", "services.train"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 78
    assert "node.key is corrupt" in proc.stderr
    assert (keys / "node.key").read_text() == "{garbage"  # never silently replaced
