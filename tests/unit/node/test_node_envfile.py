"""The .env file: parsed strictly, never overriding what the environment already says."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import config, envfile
from node.errors import ConfigError


def test_parse_forms() -> None:
    text = "# comment\n\nA=1\nexport B = two words\nC='quoted # not a comment'\nD=\"x\"\nE=v # trailing\n"
    assert envfile.parse(text) == {
        "A": "1", "B": "two words", "C": "quoted # not a comment", "D": "x", "E": "v"
    }


def test_bad_line_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"\.env:2"):
        envfile.parse("A=1\nnot a setting\n")


def test_environment_wins_and_template_round_trips(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(config.env_template() + "MLNODE_API_PORT=9999\nINFERENCE_PORT=7000\n")
    env = {"MLNODE_API_PORT": "8081"}
    envfile.apply(path, env)
    assert env["MLNODE_API_PORT"] == "8081" and env["INFERENCE_PORT"] == "7000"
    assert envfile.apply(tmp_path / "missing", env) == {}
