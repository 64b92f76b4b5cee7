"""The network's metrics schema v1 (``network-node-today.md`` §4) as data, and the bus answer behind it.

The Network Node federates every node's ``GET /api/v1/metrics`` and accepts exactly this allowlist: the
families below, with these types and label names, and nothing else. The inference service collects the
values (engines, NVML, ``/proc`` and the cgroup) and answers :class:`Snapshot` from memory; the gateway
renders it, dropping anything not listed here. The vLLM families are relayed as the engines wrote them,
with ``model_name`` set to the served name, vLLM's ``engine`` label dropped and ``replica`` added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from msgspec import Struct, field

SCHEMA_VERSION = "1"
Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Family:
    """One allowed family: its exposition name (counters end in ``_total``), type, labels, and help."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    #: Relayed with whatever labels the engine gives it (``vllm:cache_config_info``: its settings).
    any_labels: bool = False

    @property
    def base(self) -> str:
        """The name a parser gives the family (a counter's without ``_total``)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


def _f(name: str, kind: Kind, help_text: str, *labels: str, any_labels: bool = False) -> Family:
    return Family(name, kind, help_text, labels, any_labels)


_GPU = ("gpu_index", "gpu_model")
#: Labels every relayed vLLM series carries besides its own (``finished_reason``, ``le``, ...).
VLLM_LABELS = ("model_name", "replica")
#: vLLM's labels that never leave the node (the engine index inside one instance).
VLLM_DROPPED = frozenset({"engine"})

NODE_FAMILIES: tuple[Family, ...] = (
    _f("gonka_metrics_schema_info", "gauge", "Always 1: the metrics schema this exporter follows.",
       "version"),
    _f("mlnode_version_info", "gauge", "Always 1; the version label is the MLNode's version.", "version"),
    _f("mlnode_config_info", "gauge",
       "Always 1; the serving configuration (an empty value: not passed explicitly).",
       "model_name", "dtype", "replicas", "max_num_seqs", "max_model_len", "tensor_parallel_size",
       "pipeline_parallel_size"),
    _f("mlnode_source_scrape_timestamp_seconds", "gauge",
       "Unix time of the last successful collection from the source (vllm per replica, nvml, host).",
       "source", "replica"),
)

VLLM_FAMILIES: tuple[Family, ...] = (
    # P0
    _f("vllm:num_requests_waiting", "gauge", "Requests waiting to be processed.", *VLLM_LABELS),
    _f("vllm:num_requests_running", "gauge", "Requests in model execution batches.", *VLLM_LABELS),
    _f("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage (1 means 100 percent).", *VLLM_LABELS),
    _f("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.", *VLLM_LABELS),
    _f("vllm:time_to_first_token_seconds", "histogram", "Time to first token.", *VLLM_LABELS),
    _f("vllm:request_queue_time_seconds", "histogram", "Time requests spent waiting.", *VLLM_LABELS),
    _f("vllm:prompt_tokens_total", "counter", "Prefill tokens processed.", *VLLM_LABELS),
    _f("vllm:generation_tokens_total", "counter", "Generation tokens processed.", *VLLM_LABELS),
    _f("vllm:request_success_total", "counter", "Successfully processed requests.", *VLLM_LABELS,
       "finished_reason"),
    # P1
    _f("vllm:inter_token_latency_seconds", "histogram", "Inter-token latency.", *VLLM_LABELS),
    _f("vllm:e2e_request_latency_seconds", "histogram", "End-to-end request latency.", *VLLM_LABELS),
    _f("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in tokens.", *VLLM_LABELS),
    _f("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in tokens.", *VLLM_LABELS),
    _f("vllm:request_prompt_tokens", "histogram", "Prompt tokens per request.", *VLLM_LABELS),
    _f("vllm:request_generation_tokens", "histogram", "Generated tokens per request.", *VLLM_LABELS),
    _f("vllm:iteration_tokens_total", "histogram", "Tokens per engine step.", *VLLM_LABELS),
    _f("vllm:cache_config_info", "gauge", "Information of the LLMEngine's cache configuration.",
       *VLLM_LABELS, any_labels=True),
)

GPU_FAMILIES: tuple[Family, ...] = (
    _f("mlnode_gpu_temp_core_celsius", "gauge", "GPU core temperature.", *_GPU),
    _f("mlnode_gpu_temp_hbm_celsius", "gauge", "GPU memory (HBM) temperature.", *_GPU),
    _f("mlnode_gpu_power_draw_watts", "gauge", "GPU power draw.", *_GPU),
    _f("mlnode_gpu_power_limit_watts", "gauge", "GPU enforced power limit.", *_GPU),
    _f("mlnode_gpu_sm_clock_hertz", "gauge", "GPU SM clock.", *_GPU),
    _f("mlnode_gpu_sm_clock_max_hertz", "gauge", "GPU maximum SM clock.", *_GPU),
    _f("mlnode_gpu_clocks_event_reasons", "gauge",
       "NVML clocks event (throttle) reasons bitmask; 0 means none.", *_GPU),
    _f("mlnode_gpu_memory_used_bytes", "gauge", "GPU memory used.", *_GPU),
    _f("mlnode_gpu_memory_free_bytes", "gauge", "GPU memory free.", *_GPU),
    _f("mlnode_gpu_ecc_dbe_total", "counter", "Uncorrected (double-bit) ECC errors since the driver loaded.",
       *_GPU),
    _f("mlnode_gpu_pcie_replay_total", "counter", "PCIe replay counter.", *_GPU),
    _f("mlnode_gpu_xid_events_total", "counter", "XID errors seen through NVML's event API since start.",
       "gpu_index", "xid"),
)

HOST_FAMILIES: tuple[Family, ...] = (
    _f("mlnode_host_cpu_busy_ratio", "gauge", "Share of CPU time not idle over the last sampling interval."),
    _f("mlnode_host_cpu_steal_ratio", "gauge", "Share of CPU time stolen by the hypervisor (same interval)."),
    _f("mlnode_host_memory_used_bytes", "gauge",
       "Memory in use: the cgroup's working set (usage minus inactive file cache), else the host's."),
    _f("mlnode_host_memory_limit_bytes", "gauge", "The cgroup's memory limit (no limit: no series)."),
    _f("mlnode_host_hf_cache_free_bytes", "gauge",
       "Free bytes on the file system of the Hugging Face cache."),
)

FAMILIES: tuple[Family, ...] = NODE_FAMILIES + VLLM_FAMILIES + GPU_FAMILIES + HOST_FAMILIES
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
#: Relayed vLLM families by the name a parser gives them.
VLLM_BY_BASE: dict[str, Family] = {f.base: f for f in VLLM_FAMILIES}
#: GPU sensor keys (the family name without ``mlnode_gpu_``) and host value keys.
GPU_KEYS: tuple[str, ...] = tuple(f.name.removeprefix("mlnode_gpu_") for f in GPU_FAMILIES
                                  if f.name != "mlnode_gpu_xid_events_total")
HOST_KEYS: tuple[str, ...] = tuple(f.name.removeprefix("mlnode_host_") for f in HOST_FAMILIES)


class Sample(Struct, array_like=True):
    """One relayed sample: its full name (``…_bucket``, ``…_total``), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


class Relayed(Struct, array_like=True):
    """One allowed vLLM family of one replica, as parsed from its ``/metrics``."""

    name: str
    samples: list[Sample]


class Replica(Struct):
    replica: str
    scraped_at: float
    families: list[Relayed] = field(default_factory=list)


class Gpu(Struct):
    gpu_index: str
    gpu_model: str
    #: Sensor key (:data:`GPU_KEYS`) -> value; a sensor NVML cannot read is absent.
    values: dict[str, float] = field(default_factory=dict)


class Nvml(Struct):
    scraped_at: float
    gpus: list[Gpu] = field(default_factory=list)
    #: ``[gpu_index, xid, count]`` since the collector started.
    xid: list[tuple[str, str, float]] = field(default_factory=list)


class Host(Struct):
    scraped_at: float
    #: Host key (:data:`HOST_KEYS`) -> value; what cannot be read is absent.
    values: dict[str, float] = field(default_factory=dict)


class Snapshot(Struct):
    """The inference service's ``network_metrics`` answer: everything but the version, from memory."""

    config: dict[str, str] | None = None
    vllm: list[Replica] = field(default_factory=list)
    nvml: Nvml | None = None
    host: Host | None = None
