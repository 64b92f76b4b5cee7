"""Which engine serves, and how many instances of it on which GPUs and ports.

``MLNODE_ENGINE=auto`` picks vLLM when NVML sees GPUs and ``vllm`` is importable, else the CPU engine.
vLLM runs under ``MLNODE_VLLM_PYTHON`` when set (an interpreter of a separate vLLM environment, as the
test tier's ``.venv-vllm``), else under the node's own interpreter. Its engines run with
``VLLM_SERVER_DEV_MODE=1`` so that the node's own components reach ``/collective_rpc`` on loopback (the
proxy never exposes it), and on a host without GPUs with a CPU KV cache of ``VLLM_CPU_KVCACHE_SPACE``
GiB (1 unless set: vLLM-CPU needs it sized), on the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``: the
plugin's sampler is written for it) with the default logprobs mode in ``MLNODE_LOGPROBS_MODE``.
vLLM runs one instance per block of ``tp*pp`` GPUs (the i-th block of the GPUs this node was given,
respecting ``CUDA_VISIBLE_DEVICES``) on port ``INFERENCE_PORT+1+i``; the CPU engine runs one instance
on ``INFERENCE_PORT+1``. Both come out as the same :class:`InstancePlan`, which the launcher runs
without caring which engine it is.

Engines get an explicit environment (:func:`engine_environment`): what vLLM, torch, CUDA and the Hugging
Face hub read (``PATH``, ``HOME``, locale, ``CUDA_*``, ``NCCL_*``, ``VLLM_*``, ``HF_*``, thread and
proxy settings, ...) plus the names the operator lists in ``MLNODE_ENGINE_ENV`` -- never the node's
own settings or whatever else the node's environment holds.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from node import gpu
from node.errors import ConfigError
from services.inference import vllm_cmd
from services.inference.up_request import UpRequest
from services.inference.validation.request import PROCESSED
from services.inference.vllm_plugin.request_state import DEFAULT_MODE_ENV


@dataclass(frozen=True)
class EngineKind:
    name: str
    #: Seconds between launching instance i and i+1 (model loads compete for disk and host memory).
    stagger_s: float
    #: How long a launch may take to answer ``/health`` 200 (big vLLM models load for tens of minutes).
    start_timeout_s: float
    #: SIGTERM -> SIGKILL grace on stop.
    stop_grace_s: float


VLLM = EngineKind("vllm", stagger_s=10.0, start_timeout_s=90 * 60.0, stop_grace_s=20.0)
CPU = EngineKind("cpu", stagger_s=0.0, start_timeout_s=300.0, stop_grace_s=8.0)
KINDS = {k.name: k for k in (VLLM, CPU)}


@dataclass(frozen=True)
class InstancePlan:
    index: int
    port: int
    gpus: tuple[str, ...]
    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False, compare=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


VLLM_PYTHON_ENV = "MLNODE_VLLM_PYTHON"
CPU_KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KVCACHE_GIB = "1"


#: Variables engines get when the node's environment has them (besides ``MLNODE_ENGINE_ENV``'s names).
ENGINE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TMP", "TEMP",
    "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "TOKENIZERS_PARALLELISM", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
    # The engines' own MLNode switch (PoC attention on vLLM).
    "MLNODE_POC_ATTENTION",
})
ENGINE_ENV_PREFIXES = re.compile(
    r"(LC_|CUDA_|NVIDIA_|NCCL_|NVSHMEM_|CUBLAS|CUDNN_|VLLM_|HF_|HUGGING_FACE_|TRANSFORMERS_|TORCH_|"
    r"TORCHINDUCTOR_|PYTORCH_|TRITON_|FLASHINFER_|OMP_|KMP_|MKL_|OPENBLAS_|GLOO_|UCX_|HIP_|ROCM_)")
#: vLLM would demand this key from the node's own probes: never passed, whatever its prefix.
ENGINE_ENV_REFUSED = frozenset({"VLLM_API_KEY"})


def engine_environment(environ: Mapping[str, str], passed: tuple[str, ...] = ()) -> dict[str, str]:
    """The part of the node's environment an engine gets: the allowlist plus the operator's names."""
    extra = set(passed)
    return {name: value for name, value in environ.items()
            if name not in ENGINE_ENV_REFUSED
            and (name in ENGINE_ENV_NAMES or name in extra or ENGINE_ENV_PREFIXES.match(name))}


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_python(environ: Mapping[str, str]) -> str:
    """The interpreter that runs vLLM: ``MLNODE_VLLM_PYTHON``, else the node's own."""
    return environ.get(VLLM_PYTHON_ENV) or sys.executable


#: Run by the engine's interpreter: vLLM's version without importing vLLM (which takes seconds).
_VERSION_PROBE = (
    "import importlib.metadata as m, importlib.util as u, sys\n"
    "if u.find_spec('vllm') is None: sys.exit('no module named vllm')\n"
    "names = m.packages_distributions().get('vllm') or ['vllm']\n"
    "print(m.version(names[0]))\n"
)


def vllm_version(environ: Mapping[str, str], timeout_s: float = 60.0) -> str:
    """The version of vLLM in the interpreter that runs it; ConfigError with the fix when it has none."""
    python = vllm_python(environ)
    try:
        proc = subprocess.run([python, "-c", _VERSION_PROBE], capture_output=True, text=True,
                              timeout=timeout_s, env=dict(environ), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"{python} could not be run ({exc})"
    else:
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[-1]
        reason = f"{python} cannot import vllm ({(proc.stderr.strip().splitlines() or ['?'])[-1][:200]})"
    raise ConfigError(f"MLNODE_ENGINE=vllm but {reason}: install vLLM there, point {VLLM_PYTHON_ENV} at an "
                      "interpreter that has it, or set MLNODE_ENGINE=cpu")


def vllm_env(environ: Mapping[str, str], gpus: list[str], logprobs_mode: str = PROCESSED,
             passed: tuple[str, ...] = ()) -> dict[str, str]:
    """One instance's environment (:func:`engine_environment`) plus its GPUs, dev mode for
    ``/collective_rpc``, the V1 model runner, the plugin's default logprobs mode, a CPU KV cache size, and
    no usage reports to vLLM's maintainers (the network's rule for its engines)."""
    env = {**engine_environment(environ, passed), "CUDA_VISIBLE_DEVICES": ",".join(gpus),
           "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0", DEFAULT_MODE_ENV: logprobs_mode,
           "VLLM_NO_USAGE_STATS": "1"}
    if not gpus:
        env.setdefault(CPU_KVCACHE_ENV, DEFAULT_CPU_KVCACHE_GIB)
    return env


def choose_engine(setting: str, gpu_count: int | None = None, has_vllm: bool | None = None) -> EngineKind:
    """The engine for ``MLNODE_ENGINE`` (auto/vllm/cpu); auto probes NVML and the vllm package."""
    if setting in KINDS:
        return KINDS[setting]
    if setting != "auto":
        raise ConfigError(f"MLNODE_ENGINE must be auto, vllm or cpu; got {setting!r}")
    count = len(gpu.devices()) if gpu_count is None else gpu_count
    available = vllm_importable() if has_vllm is None else has_vllm
    return VLLM if count > 0 and available else CPU


def _port(inference_port: int, index: int) -> int:
    port = inference_port + 1 + index
    if port > 65535:
        raise ConfigError(f"INFERENCE_PORT {inference_port} leaves no port for engine instance {index}")
    return port


def plan_vllm(req: UpRequest, inference_port: int, environ: Mapping[str, str],
              detected_gpus: int, logprobs_mode: str = PROCESSED,
              passed: tuple[str, ...] = ()) -> list[InstancePlan]:
    """One vLLM instance per GPU block (InvalidRequest for bad parallel sizes in additional_args)."""
    args, mode = vllm_cmd.take_logprobs_mode(list(req.additional_args), logprobs_mode)
    tp, pp = vllm_cmd.parse_parallelism(args)
    blocks = vllm_cmd.plan_instances(vllm_cmd.visible_gpus(environ, detected_gpus), tp, pp)
    plans = []
    for i, block in enumerate(blocks):
        port = _port(inference_port, i)
        argv = vllm_cmd.vllm_command(req.model, req.dtype, args, port, python=vllm_python(environ))
        plans.append(InstancePlan(i, port, tuple(block), tuple(argv), vllm_env(environ, block, mode, passed)))
    return plans


def plan_cpu(req: UpRequest, model_dir: Path | None, inference_port: int,
             environ: Mapping[str, str], logprobs_mode: str = PROCESSED,
             passed: tuple[str, ...] = ()) -> list[InstancePlan]:
    """One CPU engine instance; ``model_dir`` is the stand-in for a model name (None: a directory)."""
    args, mode = vllm_cmd.take_logprobs_mode(list(req.additional_args), logprobs_mode)
    model = req.model
    if model_dir is not None:
        model = str(model_dir)
        names_given = any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in args)
        if not names_given:
            args += ["--served-model-name", req.model]
    port = _port(inference_port, 0)
    argv = vllm_cmd.cpu_engine_command(model, req.dtype, args, port, logprobs_mode=mode)
    # Keep the CPU engine off any GPU this host might have (MLNODE_ENGINE=cpu on a GPU box).
    env = {**engine_environment(environ, passed), "CUDA_VISIBLE_DEVICES": "", "VLLM_NO_USAGE_STATS": "1"}
    return [InstancePlan(0, port, (), tuple(argv), env)]
