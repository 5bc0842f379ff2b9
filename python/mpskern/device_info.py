"""The GPU as NVML sees it, from a process that must never create a CUDA context (the driver).

NVML talks to the kernel driver directly, so the driver process can find the device, read its memory and
sample its counters without joining (or disturbing) the MPS daemon its clients use.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any


class NoGpuError(RuntimeError):
    """No NVIDIA GPU is visible to this process (or NVML cannot be loaded)."""


_nvml: ModuleType | None = None


def nvml() -> ModuleType:
    """pynvml, initialised once per process; raises NoGpuError where NVML or a GPU is missing."""
    global _nvml
    if _nvml is not None:
        return _nvml
    try:
        import pynvml
    except ImportError as exc:  # nvidia-ml-py is a dependency, but say so clearly if it is missing
        raise NoGpuError(f"NVML bindings missing (pip install nvidia-ml-py): {exc}") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoGpuError(f"no NVIDIA GPU visible (NVML: {exc})") from None
    _nvml = pynvml
    return pynvml


def visible_device_handle(lib: ModuleType | None = None) -> Any:
    """NVML handle of the GPU the clients will use: the first entry of CUDA_VISIBLE_DEVICES, else GPU 0.

    NVML ignores CUDA_VISIBLE_DEVICES, so the mapping is done here (index or UUID entries).
    """
    lib = lib or nvml()
    try:
        count = lib.nvmlDeviceGetCount()
    except lib.NVMLError as exc:
        raise NoGpuError(f"no NVIDIA GPU visible (NVML: {exc})") from None
    if count == 0:
        raise NoGpuError("no NVIDIA GPU visible (NVML found 0 devices)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible is not None else "0"
    if visible is not None and not first:
        raise NoGpuError("no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES is empty)")
    try:
        if first.isdigit():
            return lib.nvmlDeviceGetHandleByIndex(int(first))
        return lib.nvmlDeviceGetHandleByUUID(first)
    except lib.NVMLError as exc:
        raise NoGpuError(f"CUDA_VISIBLE_DEVICES={visible!r} names no usable GPU (NVML: {exc})") from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def free_memory_bytes(handle: Any = None) -> int:
    lib = nvml()
    return int(lib.nvmlDeviceGetMemoryInfo(handle or visible_device_handle(lib)).free)


def describe_device(handle: Any = None) -> dict:
    """What NVML knows about the device and driver; fields it cannot read are left out."""
    lib = nvml()
    handle = handle or visible_device_handle(lib)
    out: dict[str, Any] = {}
    readers = {
        "name": lambda: _text(lib.nvmlDeviceGetName(handle)),
        "uuid": lambda: _text(lib.nvmlDeviceGetUUID(handle)),
        "memory_bytes": lambda: int(lib.nvmlDeviceGetMemoryInfo(handle).total),
        "compute_capability": lambda: "%d.%d" % lib.nvmlDeviceGetCudaComputeCapability(handle),
        "driver_version": lambda: _text(lib.nvmlSystemGetDriverVersion()),
        "cuda_driver_version": lambda: _cuda_version_text(lib.nvmlSystemGetCudaDriverVersion()),
        "nvml_version": lambda: _text(lib.nvmlSystemGetNVMLVersion()),
        "compute_mode": lambda: _compute_mode(lib, lib.nvmlDeviceGetComputeMode(handle)),
    }
    for key, read in readers.items():
        try:
            out[key] = read()
        except Exception:  # an NVML call a device or driver does not support: omit the field
            continue
    return out


def _cuda_version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _compute_mode(lib: ModuleType, mode: int) -> str:
    names = {
        getattr(lib, "NVML_COMPUTEMODE_DEFAULT", 0): "default",
        getattr(lib, "NVML_COMPUTEMODE_EXCLUSIVE_THREAD", 1): "exclusive_thread",
        getattr(lib, "NVML_COMPUTEMODE_PROHIBITED", 2): "prohibited",
        getattr(lib, "NVML_COMPUTEMODE_EXCLUSIVE_PROCESS", 3): "exclusive_process",
    }
    return names.get(mode, str(mode))


def mps_client_pids(handle: Any = None) -> set[int]:
    """PIDs NVML lists as MPS clients on the device (host PIDs where the process sits in a container)."""
    lib = nvml()
    handle = handle or visible_device_handle(lib)
    return {int(p.pid) for p in lib.nvmlDeviceGetMPSComputeRunningProcesses(handle)}


def torch_device_properties() -> dict:
    """The current CUDA device as torch sees it (creates a CUDA context: clients and benchmarks only, never
    the driver)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory,
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
