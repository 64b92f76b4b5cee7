"""``inference/up`` cannot take the node over: engine arguments and model names, as an attacker sends them.

Every refusal is a 400 naming the flag (or field), answered before anything is saved or started; a
refused request never stops what serves; a request saved before (or tampered with on disk) is judged
again when it is replayed after a restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import Node
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

ATTACKS = [
    # code from the hub, or imported by name
    (["--trust-remote-code"], "--trust-remote-code"),
    (["--worker-cls", "os.system"], "--worker-cls"),
    (["--middleware", "evil.app"], "--middleware"),
    (["--tool-parser-plugin", "/tmp/evil.py"], "--tool-parser-plugin"),
    (["--logits-processors", "evil:Proc"], "--logits-processors"),
    (["--compilation-config", '{"backend": "evil.backend"}'], "--compilation-config"),
    (["--speculative-config", '{"method": "custom_class"}'], "--speculative-config"),
    # host files read or written
    (["--chat-template", "/etc/shadow"], "--chat-template"),
    (["--download-dir", "/"], "--download-dir"),
    (["--config", "/etc/passwd"], "--config"),
    (["--tokenizer", "/etc"], "--tokenizer"),
    # listeners, and the node's own flags spelled so that argparse would take them
    (["--hos=0.0.0.0"], "--hos"),
    (["--host", "0.0.0.0"], "--host"),
    (["--po", "9999"], "--po"),
    (["--grpc-port", "9999"], "--grpc-port"),
    (["--kv-transfer-config", '{"kv_connector": "x"}'], "--kv-transfer-config"),
    # values read as flags by vLLM, dotted keys, bare values
    (["--served-model-name", "-O3"], "--served-model-name"),
    (["--compilation-config.backend", "evil"], "--compilation-config.backend"),
    (["positional"], "additional_args[0]"),
    # secrets
    (["--api-key", "sekrit-key"], "--api-key"),
]


def up(node: Node, args: list[str], model: str = "org/sec-model",
       path: str = "/api/v1/inference/up") -> tuple[int, dict[str, Any]]:
    resp = node.api("POST", path, {"model": model, "dtype": "auto", "additional_args": args}, timeout=180)
    return resp.status, resp.json()


def nothing_runs_or_was_saved(node: Node) -> None:
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    assert not (node.state_dir / "inference" / "serving.json").exists()
    assert node.engine_pids() == []


def test_dangerous_engine_arguments_are_refused_naming_the_flag(stopped: Node) -> None:
    for args, flag in ATTACKS:
        for path in ("/api/v1/inference/up", "/api/v1/inference/up/async"):
            status, answer = up(stopped, args, path=path)
            assert status == 400, (args, answer)
            assert flag in answer["detail"], (args, answer)
            assert "sekrit" not in answer["detail"]
    nothing_runs_or_was_saved(stopped)


@pytest.mark.parametrize("model", ["/etc", "/", "../../etc", "./models/x", "~root/x", "a/b/c"])
def test_model_names_are_hub_ids_or_directories_under_the_roots(stopped: Node, model: str) -> None:
    status, answer = up(stopped, [], model=model)
    assert status == 400 and answer["detail"].startswith("model must be"), answer
    nothing_runs_or_was_saved(stopped)


def engine_argv(node: Node) -> list[str]:
    [pid, *_] = sorted(node.engine_pids())
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_an_accepted_request_is_saved_and_launched_in_its_canonical_form(stopped: Node) -> None:
    """What vLLM would read as the same flags is saved (and replayed) spelled out; the reference node's
    worker extension is replaced by the node's own; a repo id that names a directory relative to the node
    (``services/inference``) is a name, served by a stand-in, never that directory."""
    status, answer = up(stopped, ["-tp", "1", "--max-model-len=2k", "--served_model_name", "sec-model",
                                  "--worker-extension-cls", "evil.Extension"], model="services/inference")
    assert (status, answer) == (200, {"status": "OK"})
    saved = json.loads((stopped.state_dir / "inference" / "serving.json").read_text())
    assert saved["additional_args"] == ["--tensor-parallel-size", "1", "--max-model-len", "2k",
                                        "--served-model-name", "sec-model"]
    assert stopped.inference("GET", "/v1/models").json()["data"][0]["id"] == "sec-model"
    argv = engine_argv(stopped)
    assert "evil.Extension" not in argv
    model_dir = Path(argv[argv.index("--model") + 1])
    assert (stopped.state_dir / "inference" / "models") in model_dir.parents

    # A refused replacement stops nothing: the engine keeps serving.
    status, refused = up(stopped, ["--hos=0.0.0.0"])
    assert status == 400 and "--hos" in refused["detail"]
    assert stopped.api("GET", "/api/v1/inference/up/status").json()["is_running"]
    assert stopped.inference("GET", "/v1/models").status == 200


def test_a_replayed_request_is_judged_again(strict_node: Node) -> None:
    """``inference`` restarts with the node still in INFERENCE and a saved request someone changed on disk
    (or saved by an older version): the policy refuses it, nothing starts, the claim is dropped."""
    stopped = strict_node
    stopped.ctl("stop", "inference")
    directory = stopped.state_dir / "inference"
    tampered = {"model": "org/sec-model", "dtype": "auto", "additional_args": ["--hos=0.0.0.0"]}
    for path, doc in ((directory / "serving.json", tampered), (stopped.state_dir / "mode.json",
                                                               {"mode": "INFERENCE"})):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
    stopped.ctl("start", "inference")

    def refused() -> dict | None:
        for line in stopped.log_lines("inference"):
            if line.get("event") == "inference_not_started" and line.get("why") == "resume":
                return line
        return None

    line = wait_until(refused, 60, 0.3, "the replayed request was not judged")
    assert "--hos is not a full flag name" in line["error"]
    wait_until(lambda: stopped.api("GET", "/api/v1/state").json()["state"] == "STOPPED", 30, 0.3)
    nothing_runs_or_was_saved(stopped)
    assert json.loads((stopped.state_dir / "mode.json").read_text())["mode"] == "STOPPED"
