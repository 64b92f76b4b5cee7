"""Host figures for the network's metrics: CPU from ``/proc/stat``, memory from the cgroup, cache disk.

CPU ratios are deltas between two samples (the collector samples every few seconds), so the first
sample has none. Inside a cgroup with a memory limit (a container), used memory is the cgroup's
working set — usage minus inactive file cache, what kubelet and ``docker stats`` call used — read from
cgroup v2 (``memory.current``, ``memory.max``) or, failing that, v1 (``memory.usage_in_bytes``,
``memory.limit_in_bytes``); without a limit it is the host's ``MemTotal - MemAvailable``. A limit is
the smallest one set on the process's cgroup or its ancestors; no limit, no value. The roots are
parameters so that tests can point them at a made-up tree.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above this is none.
NO_LIMIT_ABOVE = 1 << 60


@dataclass
class CpuTimes:
    total: int
    idle: int
    steal: int


def cpu_times(proc: Path = Path("/proc")) -> CpuTimes | None:
    """The aggregate ``cpu`` line of ``/proc/stat`` (jiffies); None when unreadable."""
    try:
        with open(proc / "stat", encoding="ascii") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:]]
    values += [0] * (8 - len(values))
    # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user/nice]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return CpuTimes(total=total, idle=idle + iowait, steal=steal)


def cpu_ratios(before: CpuTimes, after: CpuTimes) -> dict[str, float]:
    """Busy (not idle, not waiting for I/O) and steal shares of the CPU time between two samples."""
    total = after.total - before.total
    if total <= 0:
        return {}
    idle = after.idle - before.idle
    steal = after.steal - before.steal
    return {"cpu_busy_ratio": max(0.0, min(1.0, (total - idle) / total)),
            "cpu_steal_ratio": max(0.0, min(1.0, steal / total))}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Cgroups:
    """Where this process's memory cgroup lives, for v2 (unified) and v1."""

    root: Path = Path("/sys/fs/cgroup")
    proc: Path = Path("/proc")
    pid: str = "self"
    _paths: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            lines = (self.proc / self.pid / "cgroup").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            if not controllers:
                self._paths["v2"] = path
            elif "memory" in controllers.split(","):
                self._paths["v1"] = path

    def _chain(self, base: Path, path: str) -> list[Path]:
        """``base/path`` and each ancestor up to ``base`` (limits may be set on a parent)."""
        here = base / path.lstrip("/")
        chain = [here]
        while here != base and base in here.parents:
            here = here.parent
            chain.append(here)
        return chain

    def memory(self) -> dict[str, float]:
        """``memory_used_bytes`` and, when a limit is set, ``memory_limit_bytes``."""
        if "v2" in self._paths:
            dirs = [d for d in self._chain(self.root, self._paths["v2"]) if (d / "memory.current").exists()]
            if dirs:
                used = (_read_int(dirs[0] / "memory.current") or 0) - _stat(dirs[0] / "memory.stat",
                                                                           "inactive_file")
                limits = [v for d in dirs if (v := _read_int(d / "memory.max")) is not None]
                if limits:
                    return _memory(used, min(limits))
        if "v1" in self._paths:
            base = self.root / "memory"
            dirs = [d for d in self._chain(base, self._paths["v1"]) if (d / "memory.usage_in_bytes").exists()]
            if dirs:
                used = (_read_int(dirs[0] / "memory.usage_in_bytes") or 0) - _stat(
                    dirs[0] / "memory.stat", "total_inactive_file")
                limits = [v for d in dirs if (v := _read_int(d / "memory.limit_in_bytes")) is not None
                          and v < NO_LIMIT_ABOVE]
                if limits:
                    return _memory(used, min(limits))
        return host_memory(self.proc)


def _memory(used: int, limit: int | None) -> dict[str, float]:
    out = {"memory_used_bytes": float(max(0, used))}
    if limit is not None and limit < NO_LIMIT_ABOVE:
        out["memory_limit_bytes"] = float(limit)
    return out


def host_memory(proc: Path = Path("/proc")) -> dict[str, float]:
    """The host's ``MemTotal - MemAvailable`` (no limit)."""
    total = _meminfo(proc, "MemTotal")
    available = _meminfo(proc, "MemAvailable")
    if total is None or available is None:
        return {}
    return {"memory_used_bytes": float(total - available)}


def _meminfo(proc: Path, key: str) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_bytes(path: Path) -> float | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return float(shutil.disk_usage(here).free)
    except OSError:
        return None


class HostSampler:
    """Keeps the previous CPU sample so each call returns ratios over the interval since."""

    def __init__(self, cache_dir: Path, cgroups: Cgroups | None = None, proc: Path = Path("/proc")) -> None:
        self.cache_dir = cache_dir
        self.cgroups = cgroups or Cgroups(proc=proc, pid=str(os.getpid()))
        self.proc = proc
        self._cpu: CpuTimes | None = None

    def sample(self) -> dict[str, float]:
        values: dict[str, float] = {}
        now = cpu_times(self.proc)
        if now is not None and self._cpu is not None:
            values.update(cpu_ratios(self._cpu, now))
        self._cpu = now or self._cpu
        values.update(self.cgroups.memory())
        free = free_bytes(self.cache_dir)
        if free is not None:
            values["hf_cache_free_bytes"] = free
        return values
