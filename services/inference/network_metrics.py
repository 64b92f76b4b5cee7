"""What the inference service contributes to the network's metrics (``GET /api/v1/metrics``).

Three sources, each collected off the request path and answered from memory:

* **vllm** — each engine instance's ``/metrics`` text, read by its liveness poll every few seconds
  (:mod:`.liveness`); here only the schema's families are kept, ``model_name`` is set to the served
  name (never a cache path), vLLM's ``engine`` label is dropped and ``replica`` (the instance index) added.
* **nvml** — GPU sensors every :data:`SAMPLE_S` seconds (in a thread) and XID errors from NVML's event
  API (:mod:`.gpu_metrics`).
* **host** — CPU, memory and the Hugging Face cache's free space (:mod:`.host_metrics`).

Each source carries the time of its last successful collection; a source that never answered has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from contracts import network_metrics as schema
from contracts.network_metrics import Host, Nvml, Relayed, Replica, Sample, Snapshot
from node.logging import get_logger
from services.inference import gpu_metrics, vllm_cmd
from services.inference.host_metrics import HostSampler
from services.inference.instance import Instance
from services.inference.up_request import UpRequest

log = get_logger(__name__)

SAMPLE_S = 5.0


def relay(text: str, served_name: str) -> list[Relayed]:
    """The schema's vLLM families in one engine's exposition ``text``, relabelled for the network."""
    out: list[Relayed] = []
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, IndexError) as exc:  # a truncated or odd answer: nothing relayed this time
        log.debug("engine_metrics_unparsed", error=str(exc)[:200])
        return out
    for family in families:
        allowed = schema.VLLM_BY_BASE.get(family.name)
        if allowed is None or (family.type != allowed.kind and family.type != "unknown"):
            continue
        samples = []
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = {k: v for k, v in s.labels.items() if k not in schema.VLLM_DROPPED}
            labels["model_name"] = served_name
            samples.append(Sample(s.name, labels, float(s.value)))
        if samples:
            out.append(Relayed(family.name, samples))
    return out


def config_labels(request: UpRequest, replicas: int) -> dict[str, str]:
    """``mlnode_config_info``'s labels: what the ``up`` asked for; empty where it did not say."""
    args = list(request.additional_args)

    def flag(*names: str) -> str:
        return vllm_cmd.last_flag_value(args, names) or ""

    return {
        "model_name": request.served_names[0],
        "dtype": flag("--dtype") or request.dtype,
        "replicas": str(replicas),
        "max_num_seqs": flag("--max-num-seqs"),
        "max_model_len": flag("--max-model-len"),
        "tensor_parallel_size": flag("--tensor-parallel-size", "-tp"),
        "pipeline_parallel_size": flag("--pipeline-parallel-size", "-pp"),
    }


class Collector:
    """The inference service's collectors and its ``network_metrics`` answer."""

    def __init__(self, cache_dir: Path, serving: Callable[[], tuple[UpRequest | None, list[Instance]]],
                 *, sample_s: float = SAMPLE_S) -> None:
        self.serving = serving
        self.sample_s = sample_s
        self.host_sampler = HostSampler(cache_dir)
        self.xid = gpu_metrics.XidWatcher()
        self.host: Host | None = None
        self.nvml: Nvml | None = None
        self._parsed: dict[int, tuple[str, str, list[Relayed]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.xid.start)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="network-metrics")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.xid.stop)

    async def _loop(self) -> None:
        while True:
            try:
                await self.collect()
            except Exception:  # a collector bug must not end the collection
                log.exception("network_metrics_collect_failed")
            await asyncio.sleep(self.sample_s)

    async def collect(self) -> None:
        host = await asyncio.to_thread(self.host_sampler.sample)
        self.host = Host(scraped_at=time.time(), values=host)
        gpus = await asyncio.to_thread(gpu_metrics.sample)
        if gpus is not None:
            self.nvml = Nvml(scraped_at=time.time(), gpus=gpus, xid=self.xid.snapshot())

    async def snapshot(self) -> Snapshot:
        request, instances = self.serving()
        config = config_labels(request, len(instances)) if request is not None else None
        replicas = await asyncio.to_thread(self._replicas, request, instances)
        return Snapshot(config=config, vllm=replicas, nvml=self.nvml, host=self.host)

    def _replicas(self, request: UpRequest | None, instances: list[Instance]) -> list[Replica]:
        if request is None:
            return []
        name = request.served_names[0]
        out = []
        for inst in instances:
            text, at = inst.metrics_text()
            if not text:
                continue
            index = inst.plan.index
            cached = self._parsed.get(index)
            if cached is None or cached[0] is not text or cached[1] != name:
                cached = (text, name, relay(text, name))
                self._parsed[index] = cached
            out.append(Replica(replica=str(index), scraped_at=at, families=cached[2]))
        return out
