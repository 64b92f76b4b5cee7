"""The network's schema v1 in Prometheus text (format 0.0.4): what ``GET /api/v1/metrics`` answers.

Exactly the allowlist of :mod:`contracts.network_metrics`, nothing else: a relayed family or label the
schema does not list is dropped here even if a collector sent it, and no label value may carry a path,
a URL, an address or a port (such a value becomes empty). Counters are typed ``counter``; every family
has its ``# HELP`` and ``# TYPE``; no ``*_created`` series.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from contracts import network_metrics as schema
from contracts.network_metrics import Family, Snapshot

_HOST_PORT = re.compile(r"^\[?[A-Za-z0-9.:-]+\]?:\d{1,5}$")
_PATHLIKE = re.compile(r"^(?:/|~|\.{1,2}/|[A-Za-z]:\\)")


def clean_label(value: str) -> str:
    """``value``, or empty when it would reveal a path, a URL, an address or a port."""
    text = value.strip()
    if not text:
        return ""
    if _PATHLIKE.match(text) or "://" in text or "\\" in text or _HOST_PORT.match(text):
        return ""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return value
    return ""


class _Out:
    """Families in schema order, each made once, samples checked against their family's labels."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def add(self, family: Family, value: float, labels: dict[str, str] | None = None,
            sample: str | None = None) -> None:
        if not math.isfinite(value):
            return
        labels = {k: clean_label(v) for k, v in (labels or {}).items()
                  if k in family.labels or (k == "le" and family.kind == "histogram")
                  or (family.any_labels and k not in schema.VLLM_DROPPED)}
        metric = self.metrics.get(family.name)
        if metric is None:
            metric = self.metrics[family.name] = Metric(family.base, family.help, family.kind)
        metric.add_sample(sample or family.name, labels, value)


class _Collector(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def render(version: str, snapshot: Snapshot | None) -> bytes:
    """The exposition of one scrape; ``snapshot`` None: the inference service did not answer."""
    out = _Out()
    by = schema.BY_NAME
    out.add(by["gonka_metrics_schema_info"], 1, {"version": schema.SCHEMA_VERSION})
    out.add(by["mlnode_version_info"], 1, {"version": version})
    snap = snapshot or Snapshot()
    if snap.config is not None:
        config = by["mlnode_config_info"]
        out.add(config, 1, {k: snap.config.get(k, "") for k in config.labels})
    stamp = by["mlnode_source_scrape_timestamp_seconds"]
    for replica in snap.vllm:
        out.add(stamp, replica.scraped_at, {"source": "vllm", "replica": replica.replica})
    if snap.nvml is not None:
        out.add(stamp, snap.nvml.scraped_at, {"source": "nvml"})
    if snap.host is not None:
        out.add(stamp, snap.host.scraped_at, {"source": "host"})
    _relayed(out, snap)
    if snap.nvml is not None:
        _gpus(out, snap)
    if snap.host is not None:
        for key in schema.HOST_KEYS:
            if key in snap.host.values:
                out.add(by[f"mlnode_host_{key}"], snap.host.values[key])
    ordered = [out.metrics[f.name] for f in schema.FAMILIES if f.name in out.metrics]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(ordered))
    return generate_latest(registry)


def _relayed(out: _Out, snap: Snapshot) -> None:
    for family in schema.VLLM_FAMILIES:
        for replica in snap.vllm:
            for relayed in replica.families:
                if relayed.name != family.base:
                    continue
                for s in relayed.samples:
                    if s.name.endswith("_created") or not s.name.startswith(family.base):
                        continue
                    out.add(family, s.value, {**s.labels, "replica": replica.replica}, sample=s.name)


def _gpus(out: _Out, snap: Snapshot) -> None:
    assert snap.nvml is not None
    for key in schema.GPU_KEYS:
        family = schema.BY_NAME[f"mlnode_gpu_{key}"]
        for gpu in snap.nvml.gpus:
            if key in gpu.values:
                out.add(family, gpu.values[key], {"gpu_index": gpu.gpu_index, "gpu_model": gpu.gpu_model})
    xid = schema.BY_NAME["mlnode_gpu_xid_events_total"]
    for gpu_index, code, count in snap.nvml.xid:
        out.add(xid, count, {"gpu_index": gpu_index, "xid": code})
