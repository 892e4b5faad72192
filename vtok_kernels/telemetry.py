"""GPU telemetry through NVML (the ``nvidia-ml-py`` package): what the device was doing while a
benchmark ran, so that a slow row can be told apart from a throttled or busy GPU.

Every function returns a plain dict that goes into a benchmark record as it is. Without NVML
(package missing, no driver, no GPU) the dict says so (``{"nvml": False, "reason": ...}``) instead
of raising: a CPU-only machine still benchmarks.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch

# NVML "clocks event" (formerly "throttle") reason bits, by the names NVML gives them. Looked up
# by attribute so that an older nvidia-ml-py without the newer names still works.
_REASON_NAMES = (
    ("GpuIdle", "gpu_idle"),
    ("ApplicationsClocksSetting", "applications_clocks_setting"),
    ("SwPowerCap", "sw_power_cap"),
    ("HwSlowdown", "hw_slowdown"),
    ("SyncBoost", "sync_boost"),
    ("SwThermalSlowdown", "sw_thermal_slowdown"),
    ("HwThermalSlowdown", "hw_thermal_slowdown"),
    ("HwPowerBrakeSlowdown", "hw_power_brake_slowdown"),
    ("DisplayClockSetting", "display_clock_setting"),
)

_nvml = None  # the pynvml module once nvmlInit succeeded
_nvml_error: Optional[str] = None


def _load_nvml():
    """pynvml after nvmlInit, or None with the reason kept in ``_nvml_error``."""
    global _nvml, _nvml_error
    if _nvml is not None or _nvml_error is not None:
        return _nvml
    try:
        import pynvml
    except ImportError as exc:
        _nvml_error = f"nvidia-ml-py is not installed ({exc}); pip install nvidia-ml-py"
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        _nvml_error = f"NVML could not start (no NVIDIA driver or GPU here): {exc}"
        return None
    _nvml = pynvml
    return _nvml


def unavailable_reason() -> Optional[str]:
    """None when NVML answers, else why it does not."""
    _load_nvml()
    return _nvml_error


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle(nvml, device_index: int):
    """The NVML handle of torch's CUDA device ``device_index``.

    CUDA_VISIBLE_DEVICES renumbers devices for CUDA but not for NVML; the PCI bus id is the
    same in both, so it is the key whenever torch can tell it.
    """
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device_index)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            domain = getattr(props, "pci_domain_id", 0)
            device = getattr(props, "pci_device_id", 0)
            try:
                return nvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{device:02x}.0")
            except Exception:
                pass
    return nvml.nvmlDeviceGetHandleByIndex(device_index)


def _field(fn, *args, scale: float = 1.0):
    """One NVML reading; a field the device does not support reads None instead of raising."""
    try:
        value = fn(*args)
    except Exception:
        return None
    return value * scale if scale != 1.0 else value


def throttle_reasons(mask: Optional[int]) -> Optional[list[str]]:
    """The names of the set bits of an NVML clocks-event mask ([] when clocks run free)."""
    if mask is None:
        return None
    names = []
    for nvml_name, name in _REASON_NAMES:
        for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
            bit = getattr(_nvml, prefix + nvml_name, None) if _nvml is not None else None
            if bit is not None:
                if mask & bit:
                    names.append(name)
                break
    return names


def device_info(device_index: int = 0) -> dict:
    """Static facts: name, driver, memory, maximum clocks. ``nvml`` False (with the reason) when
    NVML cannot answer."""
    nvml = _load_nvml()
    if nvml is None:
        return {"nvml": False, "reason": _nvml_error}
    try:
        handle = _handle(nvml, device_index)
    except Exception as exc:
        return {"nvml": False, "reason": f"NVML has no device {device_index}: {exc}"}
    memory = _field(nvml.nvmlDeviceGetMemoryInfo, handle)
    return {
        "nvml": True,
        "name": _decode(_field(nvml.nvmlDeviceGetName, handle)),
        "driver": _decode(_field(nvml.nvmlSystemGetDriverVersion)),
        "memory_total_bytes": getattr(memory, "total", None),
        "max_sm_clock_mhz": _field(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        "max_memory_clock_mhz": _field(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_limit_w": _field(nvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
    }


def snapshot(device_index: int = 0) -> dict:
    """What the device is doing now: SM and memory clocks, power, temperature, utilisation and
    the reasons its clocks are held down."""
    nvml = _load_nvml()
    if nvml is None:
        return {"nvml": False, "reason": _nvml_error}
    try:
        handle = _handle(nvml, device_index)
    except Exception as exc:
        return {"nvml": False, "reason": f"NVML has no device {device_index}: {exc}"}
    reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    mask = _field(reasons_fn, handle) if reasons_fn is not None else None
    utilization = _field(nvml.nvmlDeviceGetUtilizationRates, handle)
    return {
        "nvml": True,
        "sm_clock_mhz": _field(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        "memory_clock_mhz": _field(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_w": _field(nvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
        "temperature_c": _field(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "gpu_utilization_pct": getattr(utilization, "gpu", None),
        "throttle_mask": mask,
        "throttle_reasons": throttle_reasons(mask),
    }


def host_info() -> dict:
    """The host side of a record: CPU, threads and load, for CPU rows and for context."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
        info["cpu_count"] = os.cpu_count()
    except (OSError, AttributeError):
        pass
    return info
