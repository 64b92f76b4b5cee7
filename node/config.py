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


def _items(_name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list (blanks dropped)."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _paths(name: str, raw: str) -> tuple[Path, ...]:
    paths = []
    for item in _items(name, raw):
        path = Path(item).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"{name} must list absolute directories, got {item!r}")
        paths.append(path.resolve())
    return tuple(paths)


def _flags(name: str, raw: str) -> tuple[str, ...]:
    flags = _items(name, raw)
    for flag in flags:
        if not flag.startswith("--") or len(flag) < 3 or "=" in flag or any(c.isspace() for c in flag):
            raise ConfigError(f"{name} must list full flag names such as --chat-template, got {flag!r}")
    return flags


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _seconds(name: str, raw: str) -> float:
    return _positive_float(name, raw)


#: The bus carries at most this per message (``bus.codec.MAX_MESSAGE_BYTES``); a REST body must leave
#: room for the envelope and msgpack's expansion of JSON numbers (checked again when encoding).
BUS_MESSAGE_BYTES = 8 * 1024 * 1024
_BODY_HEADROOM = 64 * 1024


def _api_body_bytes(name: str, raw: str) -> int:
    value = _positive_int(name, raw)
    if value > BUS_MESSAGE_BYTES - _BODY_HEADROOM:
        raise ConfigError(f"{name} must be at most {BUS_MESSAGE_BYTES - _BODY_HEADROOM} (what the bus "
                          f"carries less the envelope), got {raw!r}")
    return value


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
    # -- what reaches the node: the engine-argument policy, callbacks, browsers, limits at the edges --
    Variable("MLNODE_MODEL_ROOTS", "",
             "Directories (comma-separated) under which `inference/up` may name a local model; empty: "
             "`$MLNODE_STATE_DIR/models`. Any other model must be a Hugging Face repo id.",
             _paths, "model_roots"),
    Variable("MLNODE_ENGINE_ALLOW_FLAGS", "",
             "Engine flags (full names, comma-separated) `inference/up` may pass with any value besides "
             "the built-in allowlist, e.g. `--chat-template`; `--host`, `--port`, `--model` stay the node's.",
             _flags, "engine_allow_flags"),
    Variable("MLNODE_TRUST_REMOTE_CODE", "",
             "Hub ids (comma-separated, `id@revision` pins the `--revision`; `*` any model) for which "
             "`inference/up` may pass `--trust-remote-code`; empty: refused.",
             _items, "trust_remote_code"),
    Variable("MLNODE_ENGINE_ENV", "",
             "Names of further environment variables passed to engines (they get only PATH, HOME, locale, "
             "CUDA_*, NCCL_*, VLLM_*, HF_* and the like otherwise).",
             _items, "engine_env"),
    Variable("MLNODE_CALLBACK_HOSTS", "",
             "PoC callback hosts allowed (names, IPs or CIDRs, comma-separated); empty: any host whose "
             "address is not refused.",
             _items, "callback_hosts"),
    Variable("MLNODE_CALLBACK_ALLOW_LOOPBACK", "false",
             "true: PoC callbacks may go to loopback (a Network Node on this host); the node's own ports "
             "stay refused.",
             _bool, "callback_allow_loopback"),
    Variable("MLNODE_ALLOWED_ORIGINS", "",
             "Browser origins (comma-separated, `https://host[:port]`) whose requests the management port "
             "takes; empty: every request with an `Origin` is refused (403).",
             _items, "allowed_origins"),
    Variable("MLNODE_MAX_REQUESTS", "256",
             "Concurrent requests per gateway worker on the management port; beyond: 503 (stops are never "
             "refused).",
             _positive_int, "max_requests"),
    Variable("MLNODE_MAX_INFERENCE_REQUESTS", "1024",
             "Concurrent requests per gateway worker on the inference port; beyond: 503.",
             _positive_int, "max_inference_requests"),
    Variable("MLNODE_HEADER_TIMEOUT", "15",
             "Seconds a client gets for a request's line and headers, on both ports (408 after).",
             _seconds, "header_timeout_s"),
    Variable("MLNODE_BODY_TIMEOUT", "60",
             "Seconds a client gets to send a request body, on both ports (408 after).",
             _seconds, "body_timeout_s"),
    Variable("MLNODE_SEND_TIMEOUT", "300",
             "Seconds a client may take none of a response's bytes before it is dropped (its engine request "
             "is cancelled).",
             _seconds, "send_timeout_s"),
    Variable("MLNODE_MAX_BODY_BYTES", str(BUS_MESSAGE_BYTES - _BODY_HEADROOM),
             "Largest management API body (413 beyond); at most what the bus carries.",
             _api_body_bytes, "max_body_bytes"),
    Variable("MLNODE_MAX_INFERENCE_BODY_BYTES", str(64 * 1024 * 1024),
             "Largest inference request body (413 beyond).",
             _positive_int, "max_inference_body_bytes"),
    Variable("MLNODE_MAX_JSON_DEPTH", "32",
             "Deepest nesting of a management API JSON body (400 beyond).",
             _positive_int, "max_json_depth"),
    Variable("MLNODE_POW_MAX_QUEUED_BATCHES", "10000",
             "PoC v1 validation batches waiting at once (429 beyond).",
             _positive_int, "pow_max_queued_batches"),
    Variable("MLNODE_POW_MAX_QUEUED_NONCES", "2000000",
             "PoC v1 nonces waiting for validation at once (429 beyond).",
             _positive_int, "pow_max_queued_nonces"),
    Variable("MLNODE_POCV2_MAX_QUEUED_JOBS", "10000",
             "PoC v2 `/generate` jobs waiting per engine (429 beyond; also 429 above 100 000 nonces).",
             _positive_int, "pocv2_max_queued_jobs"),
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
    model_roots: tuple[Path, ...] = ()
    engine_allow_flags: tuple[str, ...] = ()
    trust_remote_code: tuple[str, ...] = ()
    engine_env: tuple[str, ...] = ()
    callback_hosts: tuple[str, ...] = ()
    callback_allow_loopback: bool = False
    allowed_origins: tuple[str, ...] = ()
    max_requests: int = 256
    max_inference_requests: int = 1024
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    send_timeout_s: float = 300.0
    max_body_bytes: int = BUS_MESSAGE_BYTES - _BODY_HEADROOM
    max_inference_body_bytes: int = 64 * 1024 * 1024
    max_json_depth: int = 32
    pow_max_queued_batches: int = 10_000
    pow_max_queued_nonces: int = 2_000_000
    pocv2_max_queued_jobs: int = 10_000

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

    @property
    def local_model_roots(self) -> tuple[Path, ...]:
        """Where a local model may live: ``MLNODE_MODEL_ROOTS``, else ``$MLNODE_STATE_DIR/models``."""
        return self.model_roots or (self.state_dir / "models",)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for var in VARIABLES:
            value = getattr(self, var.attr)
            if isinstance(value, tuple):
                env[var.name] = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                env[var.name] = "true" if value else "false"
            else:
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
