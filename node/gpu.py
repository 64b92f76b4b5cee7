"""GPU facts through NVML when present; an honest empty answer when not, never a crash."""

from __future__ import annotations

import threading
from typing import Any

from node.errors import Unavailable

_lock = threading.Lock()
_nvml: Any = None
_nvml_error = ""


def _load() -> Any:
    """Initialise NVML once per process; remember why it is unavailable."""
    global _nvml, _nvml_error
    with _lock:
        if _nvml is not None or _nvml_error:
            return _nvml
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            _nvml_error = f"NVML unavailable: {type(exc).__name__}: {exc}"[:300]
        return _nvml


def nvml() -> Any:
    """The initialised ``pynvml`` module, or None where NVML is unavailable (a CPU host)."""
    return _load()


def unavailable_reason() -> str:
    return _nvml_error


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def devices() -> list[dict[str, Any]]:
    nvml = _load()
    if nvml is None:
        return []
    out: list[dict[str, Any]] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        entry: dict[str, Any] = {"index": index, "name": "", "total_memory_mb": 0, "free_memory_mb": 0,
                                 "used_memory_mb": 0, "utilization_percent": None, "temperature_c": None,
                                 "is_available": False, "error_message": None}
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            entry["name"] = _text(nvml.nvmlDeviceGetName(handle))
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            entry.update(total_memory_mb=mem.total // 2**20, free_memory_mb=mem.free // 2**20,
                         used_memory_mb=mem.used // 2**20)
            entry["utilization_percent"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            entry["temperature_c"] = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            entry["is_available"] = True
        except Exception as exc:
            entry["error_message"] = f"{type(exc).__name__}: {exc}"[:200]
        out.append(entry)
    return out


def driver() -> dict[str, str]:
    nvml = _load()
    if nvml is None:
        raise Unavailable(_nvml_error or "NVML unavailable")
    cuda = nvml.nvmlSystemGetCudaDriverVersion()
    return {
        "driver_version": _text(nvml.nvmlSystemGetDriverVersion()),
        "cuda_driver_version": f"{cuda // 1000}.{(cuda % 1000) // 10}",
        "nvml_version": _text(nvml.nvmlSystemGetNVMLVersion()),
    }


def summary() -> dict[str, Any]:
    found = devices()
    body: dict[str, Any] = {"available": bool(found), "count": len(found), "devices": found}
    if not found and _nvml_error:
        body["error"] = _nvml_error
    return body
