"""GPU sensors and XID events through NVML.

There is no GPU (and no NVML library) on this machine, so these tests hand the collector a stand-in of
the ``pynvml`` module — the seam where NVML's answers enter — with pynvml's own constants and error
type. What they prove: every family is read from its NVML call and scaled to the schema's unit, a
sensor the device does not offer has no value (never a zero), and XID events come from the event set
(register, wait, count per GPU and XID, stop). The real NVML path runs only on a GPU host.
"""

from __future__ import annotations

import queue
import threading
import types
from typing import Any

import pynvml

from node import gpu
from services.inference import gpu_metrics
from tests.support.waiting import wait_until


class FakeNvml(types.SimpleNamespace):
    """pynvml's interface for two devices: device 1 has no HBM sensor, no ECC and no event support."""

    def __init__(self) -> None:
        constants = {k: getattr(pynvml, k) for k in dir(pynvml) if k.startswith(("NVML_", "nvmlEventType"))}
        super().__init__(**constants)
        self.NVMLError = pynvml.NVMLError
        self.events: queue.Queue[tuple[int, int]] = queue.Queue()
        self.freed = threading.Event()

    def _unsupported(self) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else b"NVIDIA GeForce RTX 4090"

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return 41 + handle

    def nvmlDeviceGetFieldValues(self, handle: int, fields: list[int]) -> list[Any]:
        assert fields == [pynvml.NVML_FI_DEV_MEMORY_TEMP]
        value = pynvml.c_nvmlFieldValue_t()
        value.fieldId = fields[0]
        if handle == 1:
            value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        else:
            value.nvmlReturn = pynvml.NVML_SUCCESS
            value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
            value.value.uiVal = 55
        return [value]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 312_500

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return 700_000

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return 1755

    def nvmlDeviceGetMaxClockInfo(self, handle: int, clock: int) -> int:
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return 0x4

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(total=80 << 30, used=10 << 30, free=70 << 30)

    def nvmlDeviceGetTotalEccErrors(self, handle: int, kind: int, counter: int) -> int:
        assert (kind, counter) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        if handle == 1:
            self._unsupported()
        return 3

    def nvmlDeviceGetPcieReplayCounter(self, handle: int) -> int:
        return 7

    # -- events ----------------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlDeviceRegisterEvents(self, handle: int, kinds: int, events: str) -> None:
        assert kinds == pynvml.nvmlEventTypeXidCriticalError and events == "set"
        if handle == 1:
            self._unsupported()

    def nvmlEventSetWait_v2(self, events: str, timeout_ms: int) -> Any:
        try:
            device, xid = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        return types.SimpleNamespace(device=device, eventType=pynvml.nvmlEventTypeXidCriticalError,
                                     eventData=xid)

    def nvmlEventSetFree(self, events: str) -> None:
        self.freed.set()


def test_each_family_is_read_and_scaled_and_missing_sensors_are_absent() -> None:
    first, second = gpu_metrics.sample(FakeNvml()) or []
    assert (first.gpu_index, first.gpu_model) == ("0", "NVIDIA H100 80GB HBM3")
    assert first.values == {
        "temp_core_celsius": 41.0, "temp_hbm_celsius": 55.0, "power_draw_watts": 312.5,
        "power_limit_watts": 700.0, "sm_clock_hertz": 1755e6, "sm_clock_max_hertz": 1980e6,
        "clocks_event_reasons": 4.0, "memory_used_bytes": float(10 << 30),
        "memory_free_bytes": float(70 << 30), "ecc_dbe_total": 3.0, "pcie_replay_total": 7.0}
    assert "temp_hbm_celsius" not in second.values and "ecc_dbe_total" not in second.values
    assert second.values["temp_core_celsius"] == 42.0


def test_xid_events_are_counted_per_gpu_from_the_event_set() -> None:
    nvml = FakeNvml()
    watcher = gpu_metrics.XidWatcher(nvml)
    assert watcher.start()
    try:
        for device, xid in ((0, 79), (0, 79), (0, 48)):
            nvml.events.put((device, xid))
        wait_until(lambda: sum(n for *_, n in watcher.snapshot()) == 3, 10)
        assert watcher.snapshot() == [("0", "48", 1.0), ("0", "79", 2.0)]
    finally:
        watcher.stop()
    assert nvml.freed.is_set()


def test_without_nvml_there_is_nothing_to_sample_or_watch() -> None:
    if gpu.nvml() is not None:  # a GPU host: the real path runs instead
        assert gpu_metrics.sample() is not None
        return
    assert gpu_metrics.sample() is None
    assert gpu_metrics.XidWatcher().start() is False
