"""The layers import downwards only: ``node`` <- ``bus`` <- ``services``, ``contracts`` (over ``node``)
below ``services``; only ``bus`` knows zmq, only the gateway serves HTTP, and the ``mlnode`` console
script is the composition root (``services.cli``) that adds what needs the bus or a service."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

import node

ROOT = Path(node.__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for item in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(item, ast.Import):
            names.update(alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.module and not item.level:
            names.add(item.module)
    return names


def top(module: str) -> str:
    return module.split(".")[0]


def offenders(folder: str, refused: Callable[[str], bool]) -> dict[str, list[str]]:
    found = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if refused(m))
        for path in (ROOT / folder).rglob("*.py")
    }
    return {k: v for k, v in found.items() if v}


OURS = {"node", "bus", "contracts", "services"}
#: What each layer may import of ours (services may import every layer).
BELOW = {"node": {"node"}, "bus": {"node", "bus"}, "contracts": {"node", "contracts"}}
#: The HTTP servers of the node's API; the CPU engine (a stand-in for vLLM) serves with plain uvicorn.
HTTP_SERVERS = {"falcon", "gunicorn", "uvicorn_worker", "httptools"}


def test_no_module_of_node_imports_services() -> None:
    assert not offenders("node", lambda m: m.startswith("services"))


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    assert not offenders(layer, lambda m: top(m) in OURS and top(m) not in BELOW[layer])


def test_only_bus_knows_zmq() -> None:
    # node.identity reads and writes keys in Z85, ZeroMQ's text encoding of CURVE keys; it opens no socket.
    allowed = {"zmq.utils"}
    for folder in ("node", "contracts", "services"):
        assert not offenders(folder, lambda m: top(m) == "zmq" and m not in allowed), folder


def test_only_the_gateway_serves_http_and_it_knows_no_other_service() -> None:
    for folder in ("node", "bus", "contracts", "services/inference", "services/pow", "services/train"):
        assert not offenders(folder, lambda m: top(m) in HTTP_SERVERS), folder
    other = ("services.inference", "services.pow", "services.train", "services.cli")
    assert not offenders("services/gateway", lambda m: m.startswith(other) or top(m) == "zmq")


def test_the_console_script_is_the_composition_root() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert doc["project"]["scripts"]["mlnode"] == "services.cli:main"


def test_the_console_script_keeps_every_command() -> None:
    from services.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["model", "create-tiny", "d", "--arch", "qwen3", "--seed", "3"])
    assert (args.directory, args.arch, args.seed) == ("d", "qwen3", 3)
    assert parser.parse_args(["up", "--tiny-model-if-missing"]).tiny_model_if_missing
    assert parser.parse_args(["ctl", "status"]).args == ["status"]
