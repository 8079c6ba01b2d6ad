"""GPU identity, live telemetry and software versions, read through NVML (nvidia-ml-py).

Everything here degrades instead of failing: without an NVIDIA GPU, or when NVML cannot be
loaded, :func:`gpu_identity` returns ``None``, :func:`telemetry` returns ``{}`` and a
:class:`TelemetrySampler` summarises to ``{}``. A device ``index`` is the CUDA index when
torch sees CUDA (matched to NVML by UUID, so ``CUDA_VISIBLE_DEVICES`` is respected), else the
NVML index.
"""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import re
import statistics
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pynvml
import torch
import triton

# Bits of nvmlDeviceGetCurrentClocksEventReasons (née ...ThrottleReasons); same values in both.
_CLOCK_EVENT_REASONS = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
_NUMERIC_FIELDS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c")

_nvml_lock = threading.Lock()
_nvml_ok: bool | None = None


def slugify(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _nvml() -> bool:
    """Initialise NVML once per process; True when it is usable."""
    global _nvml_ok
    with _nvml_lock:
        if _nvml_ok is None:
            try:
                pynvml.nvmlInit()
                _nvml_ok = True
            except pynvml.NVMLError:
                _nvml_ok = False
    return _nvml_ok


def _text(value: str | bytes) -> str:
    """Old nvidia-ml-py releases return bytes where newer ones return str."""
    return value.decode() if isinstance(value, bytes) else value


@functools.lru_cache(maxsize=None)
def _handle(index: int) -> Any:
    """NVML handle of device ``index`` (see the module docstring); raises NVMLError."""
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        try:
            uuid = torch.cuda.get_device_properties(index).uuid
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass  # e.g. a MIG instance: fall back to the index
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _query(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or None when NVML does not support it on this device."""
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


@dataclass(frozen=True)
class GpuInfo:
    """What identifies a GPU in results and config files."""

    name: str
    slug: str
    driver: str
    index: int
    memory_gib: float
    sm_count: int | None
    compute_capability: str | None


def gpu_identity(index: int = 0) -> GpuInfo | None:
    """Name, slug, driver and size of GPU ``index``; None without an NVIDIA GPU or NVML."""
    if not _nvml():
        return None
    try:
        handle = _handle(index)
        name = _text(pynvml.nvmlDeviceGetName(handle))
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        memory_gib = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
    except pynvml.NVMLError:
        return None
    sm_count = compute_capability = None
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        props = torch.cuda.get_device_properties(index)
        sm_count = props.multi_processor_count
        compute_capability = f"{props.major}.{props.minor}"
    return GpuInfo(name, slugify(name), driver, index, memory_gib, sm_count, compute_capability)


def _clock_event_reasons(handle: Any) -> list[str]:
    """Decoded clock-event (throttle) bitmask; the newer NVML call first, then the older."""
    for fn_name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        fn = getattr(pynvml, fn_name, None)
        mask = None if fn is None else _query(fn, handle)
        if mask is not None:
            return [
                _CLOCK_EVENT_REASONS.get(bit, f"unknown_{bit:#x}")
                for bit in (1 << i for i in range(64))
                if mask & bit
            ]
    return []


def telemetry(index: int = 0) -> dict:
    """One reading: SM and memory clocks (MHz), power (W), temperature (C), throttle reasons.

    A field NVML does not support on this device is None; ``{}`` without NVML.
    """
    if not _nvml():
        return {}
    try:
        handle = _handle(index)
    except pynvml.NVMLError:
        return {}
    power_mw = _query(pynvml.nvmlDeviceGetPowerUsage, handle)
    return {
        "sm_clock_mhz": _query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": _query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
        "power_w": None if power_mw is None else power_mw / 1000,
        "temp_c": _query(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
        "throttle_reasons": _clock_event_reasons(handle),
    }


class TelemetrySampler:
    """Samples :func:`telemetry` on a daemon thread while the ``with`` block runs.

    >>> with TelemetrySampler() as sampler:
    ...     run_benchmark()
    >>> sampler.summary()  # {"samples": 12, "power_w": {"min": .., "median": .., "max": ..}, ...}
    """

    def __init__(self, index: int = 0, interval_s: float = 0.05) -> None:
        self.index = index
        self.interval_s = interval_s
        self._samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TelemetrySampler:
        self._samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if not _nvml():
            return
        while not self._stop.is_set():
            sample = telemetry(self.index)
            if sample:
                self._samples.append(sample)
            self._stop.wait(self.interval_s)

    def summary(self) -> dict:
        """``{"samples": n, field: {"min", "median", "max"}, "throttle_reasons": [...]}``; {} if none."""
        samples = list(self._samples)
        if not samples:
            return {}
        out: dict[str, Any] = {"samples": len(samples)}
        for field in _NUMERIC_FIELDS:
            values = [s[field] for s in samples if s[field] is not None]
            if values:
                out[field] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        out["throttle_reasons"] = sorted(set().union(*(s["throttle_reasons"] for s in samples)))
        return out


def versions() -> dict:
    """Versions of python, torch, triton, CUDA (torch's build), the driver and this package."""
    try:
        package = importlib.metadata.version("kernel-workbench")
    except importlib.metadata.PackageNotFoundError:
        package = None
    driver = _query(pynvml.nvmlSystemGetDriverVersion) if _nvml() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "driver": None if driver is None else _text(driver),
        "kernel_workbench": package,
    }
