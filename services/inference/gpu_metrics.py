"""GPU sensors for the network's metrics, read through NVML, and XID errors through NVML's event API.

Every sensor is read on its own: a sensor the device or driver does not offer (no HBM temperature on a
consumer card, no ECC on a GPU without it) raises an NVML error and simply has no value — never a zero.
XID errors are not polled: :class:`XidWatcher` registers every device for
``nvmlEventTypeXidCriticalError`` and waits on the event set in a thread, counting each XID per GPU.
Nothing here runs without NVML (a CPU host): :func:`sample` answers None and the watcher never starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from contracts.network_metrics import Gpu
from node import gpu
from node.logging import get_logger

log = get_logger(__name__)

#: How long one wait on the event set blocks before the watcher checks whether it should stop.
WAIT_MS = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _memory_temperature(nvml: Any, handle: Any) -> float:
    field = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_MEMORY_TEMP])[0]
    if field.nvmlReturn != nvml.NVML_SUCCESS:
        raise nvml.NVMLError(field.nvmlReturn)
    kinds = {nvml.NVML_VALUE_TYPE_DOUBLE: "dVal", nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
             nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal", nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
             nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal", nvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal"}
    return float(getattr(field.value, kinds.get(field.valueType, "uiVal")))


def _clock_reasons(nvml: Any, handle: Any) -> float:
    read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
        or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return float(read(handle))


def _sensors(nvml: Any, handle: Any) -> dict[str, Callable[[], float]]:
    """Each network family's reading for one device (key: the family name without ``mlnode_gpu_``)."""
    def memory() -> Any:
        return nvml.nvmlDeviceGetMemoryInfo(handle)

    return {
        "temp_core_celsius": lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        "temp_hbm_celsius": lambda: _memory_temperature(nvml, handle),
        "power_draw_watts": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "power_limit_watts": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
        "sm_clock_hertz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM) * 1e6,
        "sm_clock_max_hertz": lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM) * 1e6,
        "clocks_event_reasons": lambda: _clock_reasons(nvml, handle),
        "memory_used_bytes": lambda: float(memory().used),
        "memory_free_bytes": lambda: float(memory().free),
        "ecc_dbe_total": lambda: float(nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)),
        "pcie_replay_total": lambda: float(nvml.nvmlDeviceGetPcieReplayCounter(handle)),
    }


def sample(nvml: Any | None = None) -> list[Gpu] | None:
    """Every device's sensors now; None without NVML. Blocking (NVML calls): run it in a thread."""
    nvml = nvml if nvml is not None else gpu.nvml()
    if nvml is None:
        return None
    found: list[Gpu] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(nvml.nvmlDeviceGetName(handle))
        except nvml.NVMLError as exc:
            log.debug("gpu_unreadable", index=index, error=str(exc))
            continue
        values: dict[str, float] = {}
        for key, read in _sensors(nvml, handle).items():
            try:
                values[key] = read()
            except nvml.NVMLError:
                continue  # not offered by this device or driver: no series
        found.append(Gpu(gpu_index=str(index), gpu_model=name, values=values))
    return found


class XidWatcher:
    """Counts XID critical errors per GPU from NVML's event set, in a daemon thread."""

    def __init__(self, nvml: Any | None = None) -> None:
        self.nvml = nvml
        self.counts: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Register every device and start waiting; False when NVML or its event API is unavailable."""
        nvml = self.nvml if self.nvml is not None else gpu.nvml()
        if nvml is None:
            return False
        self.nvml = nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.warning("gpu_xid_events_unavailable", error=str(exc))
            return False
        indices: dict[Any, str] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                indices[_key(handle)] = str(index)
            except nvml.NVMLError as exc:  # e.g. NOT_SUPPORTED on some devices
                log.warning("gpu_xid_events_unavailable", index=index, error=str(exc))
        if not indices:
            nvml.nvmlEventSetFree(events)
            return False
        self._thread = threading.Thread(target=self._wait, args=(events, indices), name="xid-events",
                                        daemon=True)
        self._thread.start()
        log.info("gpu_xid_events_watched", gpus=sorted(indices.values()))
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def snapshot(self) -> list[tuple[str, str, float]]:
        with self._lock:
            return [(g, x, float(n)) for (g, x), n in sorted(self.counts.items())]

    def _wait(self, events: Any, indices: dict[Any, str]) -> None:
        nvml: Any = self.nvml
        try:
            while not self._stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait_v2(events, WAIT_MS)
                except nvml.NVMLError as exc:
                    if getattr(exc, "value", None) == nvml.NVML_ERROR_TIMEOUT:
                        continue
                    log.warning("gpu_xid_wait_failed", error=str(exc))
                    self._stop.wait(WAIT_MS / 1000)
                    continue
                if data.eventType != nvml.nvmlEventTypeXidCriticalError:
                    continue
                gpu_index = indices.get(_key(data.device), "?")
                xid = str(int(data.eventData))
                with self._lock:
                    self.counts[(gpu_index, xid)] += 1
                log.error("gpu_xid_event", gpu_index=gpu_index, xid=xid)
        finally:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlEventSetFree(events)


def _key(handle: Any) -> Any:
    """A device handle's identity: NVML's handles are pointers, compared by address."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return handle
