"""``node/`` is the bottom layer: no module of it imports a service (the CLI's model command lives in
``services.cli``, the composition root), and the ``mlnode`` console script is that root."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

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


def test_no_module_of_node_imports_services() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("services"))
        for path in (ROOT / "node").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


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
