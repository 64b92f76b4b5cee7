"""The engine-argument policy: what an ``inference/up`` may ask of the engine, decided once, up front.

``additional_args`` become a vLLM command line, and vLLM's flags can do far more than tune inference:
``--trust-remote-code`` runs a hub repository's Python, ``--worker-cls``/``--middleware``/
``--tool-parser-plugin`` import code, ``--chat-template``/``--config`` read host files,
``--download-dir`` writes anywhere, ``--host``/``--grpc-port``/``--kv-transfer-config`` open listeners and
``--api-key``/``--hf-token`` carry secrets. So every request passes :meth:`EnginePolicy.vet` before it is
saved (the request is replayed after a restart), planned or started, and the replay and the autostart
pass it again.

The rules:

* **An allowlist** (:data:`FLAGS`) of the flags the network's own configurations use -- parallelism,
  memory and scheduling, quantization, dtype, context length, KV cache dtype, expert parallelism, served
  model name, revision, speculative decoding, tool and reasoning parsing by name, compilation sizes --
  each with a checked value (a number, one of vLLM's choices, a name, a JSON object with listed keys).
* **Full names only**, as vLLM reads them (``--name value`` or ``--name=value``; underscores in long names
  mean dashes; vLLM's own short aliases such as ``-tp``). argparse would take any unique prefix
  (``--hos=0.0.0.0`` is ``--host``), so an abbreviation, an unknown flag, a bare value, a dotted JSON path
  (``--compilation-config.backend``) or a value starting with ``-`` is refused.
* **A 400 naming the flag** (and never echoing a value: it may be a secret) for everything else.
* **Models** are Hugging Face repo ids or directories under the operator's roots (``MLNODE_MODEL_ROOTS``),
  for ``model``, ``--tokenizer`` and a speculative draft model alike.
* **The operator loosens it in the node's settings, never through the API**: ``MLNODE_ENGINE_ALLOW_FLAGS``
  adds flags taken with any value, ``MLNODE_TRUST_REMOTE_CODE`` names the models (optionally pinned to a
  revision) that may run their own code. ``--host``, ``--port`` and ``--model`` always stay the node's;
  a ``--worker-extension-cls`` is replaced by the node's own (its PoC hooks), never imported.

The result is the canonical argument list (long names, values split off), which is what the node saves,
replays and launches. Flags the launcher adds itself (:mod:`.vllm_cmd`) are not the API's and are not
judged here. The vLLM tier test parses every accepted flag with vLLM's own parser and checks that it
means what :meth:`Flag.meaning` says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts import fields
from node.config import Settings
from node.errors import ConfigError, InvalidRequest
from node.logging import get_logger
from services.inference.up_request import UpRequest

log = get_logger(__name__)

#: Flags the node sets itself: never from a request, never allowed by the operator.
NODE_OWNED = {"--host": "the node binds each engine to loopback itself",
              "--port": "the node picks each engine's port itself",
              "--model": "the request's model field names the model"}
#: Flags whose value the node replaces with its own (dropped from the request, never imported).
REPLACED = {"--worker-extension-cls": "the node loads its own worker extension (the PoC hooks)"}
MAX_ARGS = 128
MAX_ARG_CHARS = 4096

# -- value checks: each returns None when the text is acceptable, else what it must be ---------------
Check = Callable[[str], str | None]

_DIGITS = re.compile(r"\d{1,12}")
_HUMAN = re.compile(r"(\d{1,12})([kKmMgG]?)")
_DECIMAL = re.compile(r"\d{1,9}(\.\d{1,9})?|\.\d{1,9}")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")
#: A Hugging Face repo id: ``name`` or ``org/name`` (no ``..`` or ``--``, 96 characters a part); the
#: contract's pattern, so the published document states the rule.
HUB_ID = re.compile(fields.HUB_ID)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def integer(minimum: int = 0) -> Check:
    def check(text: str) -> str | None:
        if _DIGITS.fullmatch(text) and int(text) >= minimum:
            return None
        return f"an integer >= {minimum}"
    return check


def human_integer(*, auto: bool = False) -> Check:
    """vLLM's ``human_readable_int``: ``4096``, ``4k`` (x1000), ``4K`` (x1024); ``auto`` where it takes it."""
    def check(text: str) -> str | None:
        if auto and text == "auto":
            return None
        match = _HUMAN.fullmatch(text)
        if match and int(match[1]) >= 1:
            return None
        return "a positive integer (4096, 4k, 4K" + (", or auto)" if auto else ")")
    return check


def number(*, above: float = 0.0, at_most: float | None = None, inclusive: bool = False) -> Check:
    def check(text: str) -> str | None:
        if _DECIMAL.fullmatch(text):
            value = float(text)
            if (value >= above if inclusive else value > above) and (at_most is None or value <= at_most):
                return None
        low = f">= {above:g}" if inclusive else f"> {above:g}"
        return f"a number {low}" + (f" and <= {at_most:g}" if at_most is not None else "")
    return check


def choice(*options: str) -> Check:
    def check(text: str) -> str | None:
        return None if text in options else f"one of {', '.join(options)}"
    check.options = options  # type: ignore[attr-defined]
    return check


def pattern(regex: re.Pattern[str], meaning: str, *, refused: Iterable[str] = ()) -> Check:
    banned = frozenset(refused)

    def check(text: str) -> str | None:
        if regex.fullmatch(text) and ".." not in text and text not in banned:
            return None
        return meaning + (f" other than {', '.join(sorted(banned))}" if banned else "")
    return check


WORD = pattern(_WORD, "a name (letters, digits, _ . + -)")
REVISION = pattern(_REVISION, "a revision (a commit, branch or tag name)")
SERVED_NAME = pattern(_SERVED_NAME, "a model name (letters, digits, _ . : / @ + -)")


@dataclass(frozen=True)
class Json:
    """A JSON object value with only the listed keys, each checked like a flag's value."""

    keys: dict[str, Check | str]

    def problem(self, text: str, policy: EnginePolicy) -> str | None:
        """None when ``text`` is an acceptable object, else what is wrong ("must be ...", "key ...")."""
        try:
            doc = json.loads(text)
        except ValueError:
            return "must be a JSON object"
        if not isinstance(doc, dict):
            return "must be a JSON object"
        for key, value in doc.items():
            rule = self.keys.get(key, self.keys.get("*"))
            where = f"key {key!r}" if len(key) <= 64 else "a key"
            if rule is None:
                known = ", ".join(k for k in self.keys if k != "*")
                return f"{where} is not allowed (allowed: {known})"
            reason = _json_value_problem(value, rule, policy)
            if reason is not None:
                return f"{where} must be {reason}"
        return None


def _json_value_problem(value: Any, rule: Check | str, policy: EnginePolicy) -> str | None:
    if rule == "model":
        return None if isinstance(value, str) and policy.model_problem(value) is None else \
            "a Hugging Face repo id or a directory under MLNODE_MODEL_ROOTS"
    if rule == "bool":
        return None if isinstance(value, bool) else "true or false"
    if rule == "scalar":
        ok = isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 256)
        return None if ok and value == value else "a number, a boolean or a short string"
    if rule == "ints":
        ok = isinstance(value, list) and len(value) <= 512 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in value)
        return None if ok else "a list of non-negative integers"
    assert callable(rule)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return rule("")
    text = str(value) if not isinstance(value, float) else repr(value)
    return rule(text)


@dataclass(frozen=True)
class Flag:
    """One allowed engine flag: its full name (as vLLM spells it), vLLM's ``dest``, and its value."""

    name: str
    dest: str
    #: The value's check; None: a switch that takes no value.
    value: Check | Json | None = None
    aliases: tuple[str, ...] = ()
    #: A switch that also has vLLM's ``--no-<name>`` form.
    negatable: bool = False
    #: Takes one or more values (``--served-model-name a b``).
    many: bool = False
    #: The value names a model (checked against the model rules).
    model: bool = False
    #: The value as vLLM's parser turns it into the namespace (the tier test compares).
    meaning: Callable[[str], Any] = str

    @property
    def names(self) -> tuple[str, ...]:
        negated = ("--no-" + self.name[2:],) if self.negatable else ()
        return (self.name, *negated, *self.aliases)


def _human(text: str) -> int:
    if text == "auto":
        return -1
    match = _HUMAN.fullmatch(text)
    assert match is not None
    return int(match[1]) * _SCALE[match[2]]


def _switch(name: str, dest: str, *, negatable: bool = True, aliases: tuple[str, ...] = ()) -> Flag:
    return Flag(name, dest, None, aliases=aliases, negatable=negatable)


def _int(name: str, dest: str, minimum: int = 0, aliases: tuple[str, ...] = ()) -> Flag:
    return Flag(name, dest, integer(minimum), aliases=aliases, meaning=int)


def _choice(name: str, dest: str, *options: str) -> Flag:
    return Flag(name, dest, choice(*options))


KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc",
                   "fp8_per_token_head", "int4_per_token_head", "int8_per_token_head", "nvfp4")
#: Speculative methods that load a class by name or write hidden states out are not decoding methods.
SPEC_METHODS_REFUSED = ("custom_class", "extract_hidden_states")
SPEC_METHOD = pattern(_WORD, "a speculative decoding method name", refused=SPEC_METHODS_REFUSED)

FLAGS: tuple[Flag, ...] = (
    # Parallelism and expert parallelism.
    _int("--tensor-parallel-size", "tensor_parallel_size", 1, aliases=("-tp",)),
    _int("--pipeline-parallel-size", "pipeline_parallel_size", 1, aliases=("-pp",)),
    _int("--decode-context-parallel-size", "decode_context_parallel_size", 1, aliases=("-dcp",)),
    _switch("--enable-expert-parallel", "enable_expert_parallel", aliases=("-ep",)),
    _switch("--enable-eplb", "enable_eplb"),
    _choice("--expert-placement-strategy", "expert_placement_strategy", "linear", "round_robin"),
    Flag("--all2all-backend", "all2all_backend", WORD),
    _switch("--enable-dbo", "enable_dbo"),
    _switch("--disable-custom-all-reduce", "disable_custom_all_reduce"),
    _choice("--distributed-executor-backend", "distributed_executor_backend", "mp", "uni"),
    # Memory, context length, batching and scheduling.
    Flag("--gpu-memory-utilization", "gpu_memory_utilization", number(at_most=1.0),
         aliases=("--device-memory-utilization",), meaning=float),
    Flag("--kv-cache-memory-bytes", "kv_cache_memory_bytes", human_integer(), meaning=_human),
    Flag("--max-model-len", "max_model_len", human_integer(auto=True), meaning=_human),
    _int("--max-num-seqs", "max_num_seqs", 1),
    Flag("--max-num-batched-tokens", "max_num_batched_tokens", human_integer(), meaning=_human),
    _int("--block-size", "block_size", 1),
    Flag("--cpu-offload-gb", "cpu_offload_gb", number(inclusive=True), meaning=float),
    _int("--num-gpu-blocks-override", "num_gpu_blocks_override", 1),
    _switch("--enable-prefix-caching", "enable_prefix_caching"),
    _choice("--prefix-caching-hash-algo", "prefix_caching_hash_algo", "sha256", "sha256_cbor", "xxhash",
            "xxhash_cbor"),
    _switch("--enable-chunked-prefill", "enable_chunked_prefill"),
    _int("--long-prefill-token-threshold", "long_prefill_token_threshold"),
    _choice("--scheduling-policy", "scheduling_policy", "fcfs", "priority"),
    _switch("--async-scheduling", "async_scheduling"),
    _int("--stream-interval", "stream_interval", 1),
    _int("--max-parallel-loading-workers", "max_parallel_loading_workers", 1),
    # Compilation and kernels.
    _switch("--enforce-eager", "enforce_eager"),
    _int("--max-cudagraph-capture-size", "max_cudagraph_capture_size"),
    Flag("--cudagraph-capture-sizes", "cudagraph_capture_sizes", integer(1), many=True, meaning=int),
    Flag("--compilation-config", "compilation_config", Json({
        "mode": integer(0), "max_cudagraph_capture_size": integer(0), "cudagraph_capture_sizes": "ints",
        "cudagraph_mode": choice("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"),
        "compile_sizes": "ints"}), aliases=("-cc",)),
    _choice("--optimization-level", "optimization_level", "0", "1", "2", "3"),
    _choice("--performance-mode", "performance_mode", "balanced", "interactivity", "throughput"),
    _switch("--enable-flashinfer-autotune", "enable_flashinfer_autotune"),
    Flag("--attention-backend", "attention_backend", WORD),
    Flag("--moe-backend", "moe_backend", WORD),
    Flag("--linear-backend", "linear_backend", WORD),
    _switch("--disable-cascade-attn", "disable_cascade_attn"),
    _switch("--disable-sliding-window", "disable_sliding_window"),
    # The model: quantization, dtypes, revisions, names, loading.
    Flag("--quantization", "quantization", WORD, aliases=("-q",)),
    _choice("--dtype", "dtype", "auto", "bfloat16", "float", "float16", "float32", "half"),
    _choice("--kv-cache-dtype", "kv_cache_dtype", *KV_CACHE_DTYPES),
    Flag("--revision", "revision", REVISION),
    Flag("--tokenizer-revision", "tokenizer_revision", REVISION),
    Flag("--code-revision", "code_revision", REVISION),
    Flag("--tokenizer", "tokenizer", None, model=True),
    Flag("--tokenizer-mode", "tokenizer_mode", WORD),
    Flag("--served-model-name", "served_model_name", SERVED_NAME, many=True),
    _switch("--trust-remote-code", "trust_remote_code"),
    _int("--seed", "seed"),
    _int("--max-logprobs", "max_logprobs"),
    _choice("--logprobs-mode", "logprobs_mode", "processed_logits", "processed_logprobs", "raw_logits",
            "raw_logprobs"),
    _choice("--load-format", "load_format", "auto", "safetensors", "fastsafetensors", "mistral",
            "bitsandbytes"),
    _choice("--safetensors-load-strategy", "safetensors_load_strategy", "eager", "lazy", "prefetch"),
    _choice("--config-format", "config_format", "auto", "hf", "mistral"),
    _choice("--generation-config", "generation_config", "auto", "vllm"),
    Flag("--override-generation-config", "override_generation_config", Json({"*": "scalar"})),
    _choice("--model-impl", "model_impl", "auto", "vllm", "transformers"),
    _choice("--runner", "runner", "auto", "generate", "pooling"),
    _choice("--convert", "convert", "auto", "none", "embed", "classify"),
    _switch("--skip-tokenizer-init", "skip_tokenizer_init"),
    _switch("--language-model-only", "language_model_only"),
    _choice("--mm-encoder-tp-mode", "mm_encoder_tp_mode", "data", "weights"),
    Flag("--limit-mm-per-prompt", "limit_mm_per_prompt", Json({"*": integer(0)})),
    Flag("--mm-processor-cache-gb", "mm_processor_cache_gb", number(inclusive=True), meaning=float),
    # Speculative decoding.
    Flag("--speculative-config", "speculative_config", Json({
        "method": SPEC_METHOD, "num_speculative_tokens": integer(1), "model": "model",
        "draft_tensor_parallel_size": integer(1), "tensor_parallel_size": integer(1), "quantization": WORD,
        "max_model_len": integer(1), "revision": REVISION, "code_revision": REVISION,
        "prompt_lookup_max": integer(1), "prompt_lookup_min": integer(1), "enforce_eager": "bool",
        "attention_backend": WORD, "moe_backend": WORD, "kv_cache_dtype": choice(*KV_CACHE_DTYPES),
        "disable_padded_drafter_batch": "bool", "parallel_drafting": "bool",
        "rejection_sample_method": WORD, "draft_sample_method": WORD}), aliases=("-sc",)),
    Flag("--spec-method", "spec_method", SPEC_METHOD),
    Flag("--spec-model", "spec_model", None, model=True),
    _int("--spec-tokens", "spec_tokens", 1),
    # Tool calling and reasoning, by registered parser name (never a plugin file).
    _switch("--enable-auto-tool-choice", "enable_auto_tool_choice"),
    Flag("--tool-call-parser", "tool_call_parser", WORD),
    Flag("--reasoning-parser", "reasoning_parser", WORD),
    _choice("--tool-strict-level", "tool_strict_level", "auto", "function", "parameter"),
    _switch("--exclude-tools-when-tool-choice-none", "exclude_tools_when_tool_choice_none"),
    _choice("--chat-template-content-format", "chat_template_content_format", "auto", "openai", "string"),
    Flag("--default-chat-template-kwargs", "default_chat_template_kwargs", Json({"*": "scalar"})),
    Flag("--response-role", "response_role", WORD),
    # The OpenAI front end's answers and logs.
    _switch("--enable-prompt-tokens-details", "enable_prompt_tokens_details"),
    _switch("--enable-force-include-usage", "enable_force_include_usage"),
    _switch("--enable-server-load-tracking", "enable_server_load_tracking"),
    _switch("--return-tokens-as-token-ids", "return_tokens_as_token_ids"),
    _switch("--enable-log-requests", "enable_log_requests"),
    _switch("--disable-log-stats", "disable_log_stats", negatable=False),
    _switch("--disable-uvicorn-access-log", "disable_uvicorn_access_log"),
    _choice("--uvicorn-log-level", "uvicorn_log_level", "critical", "error", "warning", "info", "debug"),
    _int("--max-log-len", "max_log_len"),
    _int("--shutdown-timeout", "shutdown_timeout"),
)

#: Known vLLM flags the policy refuses, with the reason the 400 gives (anything else unknown is refused
#: too; these get a clearer word).
REASONS: dict[str, str] = {
    **{name: "loads code into the engine" for name in (
        "--worker-cls", "--middleware", "--tool-parser-plugin", "--reasoning-parser-plugin",
        "--logits-processors", "--io-processor-plugin", "--scheduler-cls", "--model-class-overrides",
        "--hf-overrides", "--additional-config", "--pooler-config", "--model-loader-extra-config")},
    **{name: "reads or writes host paths" for name in (
        "--chat-template", "--download-dir", "--config", "--allowed-local-media-path", "--lora-modules",
        "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--log-config-file", "--logging-config",
        "--hf-config-path", "--mm-encoder-fp8-scale-path", "--mm-encoder-fp8-scale-save-path",
        "--quantization-config", "--ignore-patterns", "--pt-load-map-location", "--profiler-config",
        "--enable-prompt-embeds", "--trust-request-chat-template")},
    **{name: "opens a listener or reaches out to the network" for name in (
        "--grpc", "--grpc-port", "--uds", "--headless", "--api-server-count", "--data-parallel-address",
        "--data-parallel-rpc-port", "--data-parallel-size", "--data-parallel-size-local", "--master-addr",
        "--master-port", "--nnodes", "--node-rank", "--kv-transfer-config", "--kv-events-config",
        "--ec-transfer-config", "--otlp-traces-endpoint", "--allowed-origins", "--allowed-media-domains",
        "--weight-transfer-config", "--tool-server", "--enable-sleep-mode", "--root-path")},
    **{name: "carries a secret (pass it in the engines' environment instead)" for name in (
        "--api-key", "--hf-token")},
}


def _canonical(arg: str) -> str:
    """The flag name of ``arg`` as vLLM reads it: ``--a_b=1`` -> ``--a-b`` (short names as given)."""
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        return "--" + name[2:].replace("_", "-")
    return name


def _is_flag(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1


def _show(name: str) -> str:
    """A flag name fit for a message (a client could send anything as a "name")."""
    clean = name if re.fullmatch(r"-{1,2}[A-Za-z0-9_.+-]{1,80}", name) else repr(name[:40])
    return clean


@dataclass(frozen=True)
class EnginePolicy:
    """The policy with the operator's settings applied; :meth:`vet` judges one request."""

    model_roots: tuple[Path, ...]
    allowed_flags: frozenset[str] = frozenset()
    trust_remote_code: tuple[str, ...] = ()
    #: Directories the operator's own settings name (the autostart model): always allowed.
    operator_models: tuple[Path, ...] = ()
    _by_name: dict[str, Flag] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for allowed in self.allowed_flags:
            if allowed in NODE_OWNED or allowed in REPLACED:
                raise ConfigError(f"MLNODE_ENGINE_ALLOW_FLAGS cannot allow {allowed}: "
                                  f"{NODE_OWNED.get(allowed) or REPLACED[allowed]}")
        for flag in FLAGS:
            for name in flag.names:
                self._by_name[name] = flag

    @classmethod
    def from_settings(cls, settings: Settings) -> EnginePolicy:
        autostart = (settings.inference_autostart,) if settings.inference_autostart is not None else ()
        return cls(model_roots=settings.local_model_roots,
                   allowed_flags=frozenset(settings.engine_allow_flags),
                   trust_remote_code=settings.trust_remote_code, operator_models=autostart)

    # -- models ----------------------------------------------------------------------------------------
    def model_problem(self, name: str) -> str | None:
        """None when ``name`` is a hub repo id or a directory under the roots; else why not."""
        if name.startswith("/"):
            resolved = Path(name).resolve()
            allowed = (*self.model_roots, *self.operator_models)
            if any(resolved == root or resolved.is_relative_to(root.resolve()) for root in allowed):
                return None
            roots = ", ".join(str(r) for r in self.model_roots)
            return f"a directory under the model roots ({roots}; MLNODE_MODEL_ROOTS)"
        if HUB_ID.fullmatch(name):
            return None
        return "a Hugging Face repo id (org/name) or an absolute directory under MLNODE_MODEL_ROOTS"

    def is_local(self, name: str) -> bool:
        """Whether the engine reads ``name`` from disk (only absolute paths are; a repo id never is)."""
        return name.startswith("/")

    # -- the request -----------------------------------------------------------------------------------
    def vet(self, req: UpRequest) -> UpRequest:
        """``req`` with canonical ``additional_args``; InvalidRequest naming the field or flag otherwise."""
        problem = self.model_problem(req.model)
        if problem is not None:
            raise InvalidRequest(f"model must be {problem}")
        args = list(req.additional_args)
        if len(args) > MAX_ARGS:
            raise InvalidRequest(f"additional_args has {len(args)} entries; at most {MAX_ARGS} are allowed")
        for i, arg in enumerate(args):
            if len(arg) > MAX_ARG_CHARS:
                raise InvalidRequest(f"additional_args[{i}] is longer than {MAX_ARG_CHARS} characters")
        out: list[str] = []
        models: list[str] = [req.model]
        trusted = False
        i = 0
        while i < len(args):
            arg = args[i]
            if not _is_flag(arg):
                raise InvalidRequest(f"additional_args[{i}] is a value without a flag before it; "
                                     "engine arguments are --name value or --name=value")
            name = _canonical(arg)
            inline = arg.split("=", 1)[1] if "=" in arg else None
            values, i = self._values(args, i, inline)
            if name in self.allowed_flags and name not in self._by_name:
                out += [name, *values]  # the operator's choice: taken as given
                continue
            flag = self._by_name.get(name)
            if flag is None:
                if name in REPLACED:
                    log.warning("engine_arg_replaced", flag=name, reason=REPLACED[name])
                    continue
                raise InvalidRequest(self._refusal(name))
            if name in self.allowed_flags:  # allowed with any value
                out += [flag.name if name in flag.aliases else name, *values]
                continue
            out += self._checked(flag, name, values)
            if flag.model:
                models += values
            if flag.value is not None and isinstance(flag.value, Json) and values:
                models += _json_models(values[0])
            if flag.name == "--trust-remote-code":
                trusted = name == flag.name  # --no-trust-remote-code turns it off again
        if trusted:
            self._check_trusted(models, out)
        return UpRequest(model=req.model, dtype=req.dtype, additional_args=tuple(out))

    def _values(self, args: list[str], i: int, inline: str | None) -> tuple[list[str], int]:
        """The values after the flag at ``i`` (the inline one, or every following non-flag argument)."""
        if inline is not None:
            return [inline], i + 1
        j = i + 1
        while j < len(args) and not _is_flag(args[j]):
            j += 1
        return args[i + 1:j], j

    def _checked(self, flag: Flag, name: str, values: list[str]) -> list[str]:
        shown = _show(name)
        if flag.value is None and not flag.model:
            if values:
                raise InvalidRequest(f"additional_args: {shown} takes no value")
            negated = name.startswith("--no-")
            return ["--no-" + flag.name[2:]] if negated else [flag.name]
        if not values:
            raise InvalidRequest(f"additional_args: {shown} needs a value")
        if len(values) > 1 and not flag.many:
            raise InvalidRequest(f"additional_args: {shown} takes one value, got {len(values)}")
        for value in values:
            reason = self._value_problem(flag, value)
            if reason is not None:
                raise InvalidRequest(f"additional_args: {shown} {reason}")
        return [flag.name, *values]

    def _value_problem(self, flag: Flag, value: str) -> str | None:
        """None when ``value`` is acceptable for ``flag``, else what is wrong ("must be ...")."""
        if value.startswith("-"):  # vLLM's parser would read it as a flag (``-O3``, ``--x.y``)
            return "must have a value that does not start with '-'"
        if isinstance(flag.value, Json):
            return flag.value.problem(value, self)
        reason = self.model_problem(value) if flag.model else flag.value(value) if flag.value else None
        return None if reason is None else f"must be {reason}"

    def _refusal(self, name: str) -> str:
        shown = _show(name)
        if name in NODE_OWNED:
            return f"additional_args: {shown} is not allowed: {NODE_OWNED[name]}"
        if name in REASONS:
            return (f"additional_args: {shown} is not allowed: it {REASONS[name]}; an operator may allow "
                    "it with MLNODE_ENGINE_ALLOW_FLAGS")
        known = [*self._by_name, *REASONS, *NODE_OWNED, *REPLACED]
        longer = sorted(k for k in known if k.startswith(name) and k != name)
        if longer and name.startswith("--") and len(name) > 2:
            return (f"additional_args: {shown} is not a full flag name (it abbreviates "
                    f"{', '.join(longer[:3])}); spell flags out")
        if "." in name:
            return (f"additional_args: {shown} is not allowed: pass the whole JSON object to "
                    f"{_show(name.split('.', 1)[0])} instead of a dotted key")
        return (f"additional_args: {shown} is not an engine flag the node allows; an operator may allow it "
                "with MLNODE_ENGINE_ALLOW_FLAGS")

    def _check_trusted(self, models: list[str], args: list[str]) -> None:
        """``--trust-remote-code``: every model the engine loads must be one the operator named."""
        revision = _value_of(args, "--revision")
        for model in dict.fromkeys(models):
            if not any(_trusts(entry, model, revision, main=model == models[0])
                       for entry in self.trust_remote_code):
                raise InvalidRequest(
                    "additional_args: --trust-remote-code is not allowed for this model: it runs the model "
                    "repository's own code; an operator may allow it per model (and revision) with "
                    "MLNODE_TRUST_REMOTE_CODE")


def _trusts(entry: str, model: str, revision: str | None, *, main: bool) -> bool:
    if entry == "*":
        return True
    name, _, pinned = entry.partition("@")
    if name != model:
        return False
    return not pinned or (main and revision == pinned)


def _value_of(args: list[str], name: str) -> str | None:
    found = None
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            found = args[i + 1]
    return found


def _json_models(text: str) -> list[str]:
    try:
        doc = json.loads(text)
    except ValueError:
        return []
    model = doc.get("model") if isinstance(doc, dict) else None
    return [model] if isinstance(model, str) else []
