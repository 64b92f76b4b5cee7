"""Settings: defaults, and a bad value stops with a reason that names the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import config
from node.errors import ConfigError


def test_defaults_are_the_contract_ports(tmp_path: Path) -> None:
    s = config.load({"MLNODE_STATE_DIR": str(tmp_path)})
    assert (s.api_port, s.inference_port, s.log_level) == (8080, 5000, "info")
    assert s.state_dir == tmp_path.resolve()
    assert s.run_dir == tmp_path.resolve() / "run"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MLNODE_API_PORT", "80800", "MLNODE_API_PORT must be a TCP port"),
        ("MLNODE_API_PORT", "http", "MLNODE_API_PORT must be an integer"),
        ("INFERENCE_PORT", "0", "INFERENCE_PORT must be a TCP port"),
        ("MLNODE_LOG_LEVEL", "loud", "MLNODE_LOG_LEVEL must be one of"),
        ("MLNODE_GATEWAY_WORKERS", "0", "MLNODE_GATEWAY_WORKERS must be a positive integer"),
        ("MLNODE_BUS_TIMEOUT", "nan", "MLNODE_BUS_TIMEOUT must be a positive finite number"),
        ("MLNODE_POW_DEVICE", "tpu", "MLNODE_POW_DEVICE must be one of"),
        ("MLNODE_STATE_DIR", "  ", "MLNODE_STATE_DIR must be a directory path"),
    ],
)
def test_bad_values_name_the_variable(tmp_path: Path, name: str, value: str, message: str) -> None:
    env = {"MLNODE_STATE_DIR": str(tmp_path), name: value}
    with pytest.raises(ConfigError, match=message):
        config.load(env)


def test_ports_must_differ_and_state_dir_must_fit_unix_sockets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must differ"):
        config.load({"MLNODE_STATE_DIR": str(tmp_path), "MLNODE_API_PORT": "5000"})
    with pytest.raises(ConfigError, match="too long for unix sockets"):
        config.load({"MLNODE_STATE_DIR": str(tmp_path / ("x" * 120))})


def test_settings_round_trip_through_the_environment(tmp_path: Path) -> None:
    s = config.load({"MLNODE_STATE_DIR": str(tmp_path), "MLNODE_API_PORT": "18080"})
    assert config.load(s.to_env()) == s


def test_env_template_lists_every_variable_with_its_default() -> None:
    text = config.env_template()
    for var in config.VARIABLES:
        assert f"# {var.name}={var.default}" in text
