"""Node settings from the environment, validated once at process start.

Every variable the node reads is declared in :data:`VARIABLES` with its default and meaning; the README
table and the ``.env`` template are generated from the same list, so documentation cannot drift. A bad
value raises :class:`~node.errors.ConfigError` naming the variable; process entry points turn that
into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# sun_path is 108 bytes on Linux; the longest socket name we create is "<run>/inference.events".
_MAX_IPC_PATH = 100


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, default (as text), meaning, and parser."""

    name: str
    default: str
    doc: str
    parse: Callable[[str, str], Any]
    attr: str


def _port(name: str, raw: str) -> int:
    value = _int(name, raw)
    if not 1 <= value <= 65535:
        raise ConfigError(f"{name} must be a TCP port between 1 and 65535, got {raw!r}")
    return value


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _positive_int(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a positive finite number, got {raw!r}")
    return value


def at_least_one_second(name: str, raw: str) -> float:
    value = _positive_float(name, raw)
    if value < 1:
        raise ConfigError(f"{name} must be at least 1 second, got {raw!r}")
    return value


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}; got {raw!r}")
        return value

    return parse


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise ConfigError(f"{name} must be a directory path, got an empty value")
    return Path(raw).expanduser().resolve()


def _optional_path(name: str, raw: str) -> Path | None:
    return Path(raw).expanduser().resolve() if raw.strip() else None


def _host(name: str, raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{name} must be a host name or IP address, got {raw!r}")
    return value


def _text(_name: str, raw: str) -> str:
    return raw.strip()


def _token(name: str, raw: str) -> str:
    value = raw.strip()
    if value and (len(value) < 16 or not value.isprintable() or any(c.isspace() for c in value)):
        raise ConfigError(f"{name} must be at least 16 printable characters without spaces (or empty)")
    return value


#: GONKA_METRICS values; anything else means "full" (with a warning at start, as the network's exporter).
METRICS_MODES = ("full", "off")


def _metrics_mode(_name: str, raw: str) -> str:
    return raw.strip().lower() or "full"


VARIABLES: tuple[Variable, ...] = (
    Variable("MLNODE_STATE_DIR", "~/.mlnode", "Keys, bus sockets, PoC outbox, logs, checkpoints.", _path,
             "state_dir"),
    Variable("MLNODE_API_HOST", "0.0.0.0", "Address the management and inference ports bind to.", _host,
             "api_host"),
    Variable("MLNODE_API_PORT", "8080", "Management API (`/api/v1/*`, `/health`, `/v1/*` proxy).", _port,
             "api_port"),
    Variable("INFERENCE_PORT", "5000",
             "Inference port (every path proxied to the engine); engine i listens on INFERENCE_PORT+1+i.",
             _port, "inference_port"),
    Variable("MLNODE_LOG_LEVEL", "info", "debug, info, warning, error or critical.", _choice(*LOG_LEVELS),
             "log_level"),
    Variable("MLNODE_GATEWAY_WORKERS", "2", "gunicorn worker processes serving both HTTP ports.",
             _positive_int, "gateway_workers"),
    Variable("MLNODE_BUS_TIMEOUT", "10", "Seconds a gateway waits for a service's answer on the bus.",
             _positive_float, "bus_timeout_s"),
    Variable("MLNODE_PEER_HOST", "0.0.0.0", "Address the training peer listener binds to.", _host,
             "peer_host"),
    Variable("MLNODE_PEER_PORT", "0",
             "Training peer listener port; 0 means the client's BASE_PORT (or GLOBAL_PORT on rank 0).",
             _int, "peer_port"),
    Variable("MLNODE_POW_DEVICE", "auto", "PoC compute: auto (every CUDA GPU, else CPU), cuda or cpu.",
             _choice("auto", "cuda", "cpu"), "pow_device"),
    Variable("MLNODE_ENGINE", "auto", "Inference engine: auto (vLLM when a GPU and vLLM exist), vllm, cpu.",
             _choice("auto", "vllm", "cpu"), "engine"),
    Variable("MLNODE_INFERENCE_AUTOSTART", "",
             "Model directory to serve at start (make run sets a tiny CPU model); empty: none.",
             _optional_path, "inference_autostart"),
    Variable("MLNODE_ENGINE_HANG_SECONDS", "60",
             "Seconds without observed engine progress before an engine is declared hung and restarted.",
             at_least_one_second, "engine_hang_s"),
    Variable("MLNODE_VERSION_TAG", "", "Version reported by /api/v1/state; empty: the package version.",
             _text, "version_tag"),
    Variable("MLNODE_LOGPROBS_MODE", "processed_logprobs",
             "Logprobs of a request that names no logprobs_mode: processed_logprobs (the network's) or "
             "raw_logprobs.", _choice("processed_logprobs", "raw_logprobs"), "logprobs_mode"),
    Variable("MLNODE_API_TOKEN", "",
             "Bearer token both HTTP ports require (except /api/v1/clock, /livez, /readyz); empty: open.",
             _token, "api_token"),
    Variable("GONKA_METRICS", "full",
             "/api/v1/metrics: full serves the network's schema v1, off answers 404 (other values: full).",
             _metrics_mode, "gonka_metrics"),
    Variable("MLNODE_DOWNLOAD_STALL_SECONDS", "600",
             "A model download whose files stop growing this long is killed and retried.",
             at_least_one_second, "download_stall_s"),
)


@dataclass(frozen=True)
class Settings:
    """Validated node settings. Paths are absolute; see :data:`VARIABLES` for each field's meaning."""

    state_dir: Path
    api_host: str
    api_port: int
    inference_port: int
    log_level: str
    gateway_workers: int
    bus_timeout_s: float
    peer_host: str
    peer_port: int
    pow_device: str
    engine: str
    inference_autostart: Path | None
    engine_hang_s: float
    version_tag: str
    logprobs_mode: str
    api_token: str = field(default="", repr=False)
    gonka_metrics: str = "full"
    download_stall_s: float = 600.0
    extra: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def run_dir(self) -> Path:
        """Bus sockets and locks: private (0700), recreated at every start."""
        return self.state_dir / "run"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def network_metrics(self) -> bool:
        """GONKA_METRICS: anything but ``off`` serves the schema."""
        return self.gonka_metrics != "off"

    def service_dir(self, service: str) -> Path:
        """Where one service keeps its durable files (outbox, checkpoints, engine logs)."""
        return self.state_dir / service

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for var in VARIABLES:
            value = getattr(self, var.attr)
            env[var.name] = "" if value is None else str(value)
        return env


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate every variable; the first bad one raises ConfigError naming it."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = env.get(var.name)
        values[var.attr] = var.parse(var.name, var.default if raw is None else raw)
    if values["api_port"] == values["inference_port"]:
        raise ConfigError("MLNODE_API_PORT and INFERENCE_PORT must differ")
    if not 0 <= values["peer_port"] <= 65535:
        raise ConfigError(f"MLNODE_PEER_PORT must be 0 or a TCP port, got {values['peer_port']}")
    run_sock = values["state_dir"] / "run" / "inference.events"
    if len(str(run_sock)) > _MAX_IPC_PATH:
        raise ConfigError(
            f"MLNODE_STATE_DIR is too long for unix sockets ({len(str(run_sock))} > {_MAX_IPC_PATH} bytes)"
        )
    return Settings(**values)


def ensure_dirs(settings: Settings) -> None:
    """Create the state tree with private permissions (keys and sockets live there)."""
    for path in (settings.state_dir, settings.run_dir, settings.keys_dir, settings.logs_dir):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)


def env_template() -> str:
    """A commented ``.env`` listing every variable with its default (all left commented out)."""
    lines = ["# MLNode settings. Uncomment and edit; the Makefile and `mlnode` read this file.", ""]
    for var in VARIABLES:
        lines.append(f"# {var.doc}")
        lines.append(f"# {var.name}={var.default}")
        lines.append("")
    return "\n".join(lines)
