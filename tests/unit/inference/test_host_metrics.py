"""Host figures from /proc and the cgroup: made-up trees for the cases, and this machine's own /proc."""

from __future__ import annotations

from pathlib import Path

from services.inference.host_metrics import Cgroups, CpuTimes, HostSampler, cpu_ratios, cpu_times
from tests.support.waiting import wait_until


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cpu_ratios_are_shares_of_the_interval(tmp_path: Path) -> None:
    write(tmp_path, {"stat": "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n"})
    before = cpu_times(tmp_path)
    assert before == CpuTimes(total=1000, idle=850, steal=0)
    after = CpuTimes(total=1200, idle=900, steal=20)
    assert cpu_ratios(before, after) == {"cpu_busy_ratio": 0.75, "cpu_steal_ratio": 0.1}
    assert cpu_ratios(after, after) == {}


def test_cgroup_v2_working_set_and_the_smallest_limit_up_the_tree(tmp_path: Path) -> None:
    write(tmp_path / "proc", {"self/cgroup": "0::/kubepods/pod1/ctr\n",
                              "meminfo": "MemTotal: 1000 kB\nMemAvailable: 400 kB\n"})
    sys = tmp_path / "sys"
    write(sys, {"kubepods/pod1/ctr/memory.current": "5000\n", "kubepods/pod1/ctr/memory.max": "max\n",
                "kubepods/pod1/ctr/memory.stat": "anon 3000\ninactive_file 1200\n",
                "kubepods/pod1/memory.current": "9000\n", "kubepods/pod1/memory.max": "8192\n"})
    cg = Cgroups(root=sys, proc=tmp_path / "proc")
    assert cg.memory() == {"memory_used_bytes": 3800.0, "memory_limit_bytes": 8192.0}


def test_no_limit_means_the_host_figure_and_no_limit_series(tmp_path: Path) -> None:
    write(tmp_path / "proc", {"self/cgroup": "4:memory:/a\n0::/\n",
                              "meminfo": "MemTotal: 1000 kB\nMemAvailable: 400 kB\n"})
    sys = tmp_path / "sys"
    write(sys, {"memory/a/memory.usage_in_bytes": "500\n",
                "memory/a/memory.limit_in_bytes": "9223372036854771712\n"})
    assert Cgroups(root=sys, proc=tmp_path / "proc").memory() == {"memory_used_bytes": 600.0 * 1024}


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    write(tmp_path / "proc", {"self/cgroup": "4:memory:/docker/abc\n", "meminfo": ""})
    sys = tmp_path / "sys"
    write(sys, {"memory/docker/abc/memory.usage_in_bytes": "7000\n",
                "memory/docker/abc/memory.limit_in_bytes": "16000\n",
                "memory/docker/abc/memory.stat": "cache 10\ntotal_inactive_file 2000\n"})
    assert Cgroups(root=sys, proc=tmp_path / "proc").memory() == {"memory_used_bytes": 5000.0,
                                                                 "memory_limit_bytes": 16000.0}


def test_this_machine(tmp_path: Path) -> None:
    sampler = HostSampler(tmp_path / "not-yet" / "hub")
    first = sampler.sample()
    assert "cpu_busy_ratio" not in first  # a ratio needs two samples
    assert first["memory_used_bytes"] > 0 and first["hf_cache_free_bytes"] > 0
    start = cpu_times()
    assert start is not None
    wait_until(lambda: (now := cpu_times()) is not None and now.total > start.total, 10)
    second = sampler.sample()
    assert 0 <= second["cpu_busy_ratio"] <= 1 and 0 <= second["cpu_steal_ratio"] <= 1
