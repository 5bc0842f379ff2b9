"""NVML GPU Performance Monitoring (GPM) over a measurement window.

Two GPM samples, one at the window's start and one at its end, give the device-wide averages between them:
how busy the SMs were, how many warps they held, how much of the DRAM bandwidth and of the tensor pipes was
used. That is what explains a gain (or its absence). GPM needs Hopper or newer; elsewhere, and where NVML
is missing, every window reports ``{"supported": False, "reason": ...}`` instead of invented numbers.
The sampler runs in the driver, which has no CUDA context, so sampling never perturbs the clients.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from . import device_info

# NVML GPM metric ids (nvml.h: NVML_GPM_METRIC_*), all percentages.
GPM_METRICS: dict[str, int] = {
    "sm_util_pct": 2,  # SM_UTIL: % of time any warp was resident on an SM, averaged over SMs
    "sm_occupancy_pct": 3,  # SM_OCCUPANCY: resident warps / max warps, averaged over SMs and time
    "tensor_util_pct": 5,  # ANY_TENSOR_UTIL: % of cycles some tensor pipe was active
    "dram_bw_util_pct": 10,  # DRAM_BW_UTIL: % of peak DRAM bandwidth
}


class GpmSampler:
    """Takes GPM samples on the device the clients use. ``begin()`` then ``end(token)`` per window."""

    def __init__(self, nvml: ModuleType | None = None, handle: Any = None) -> None:
        self._lib: ModuleType | None = None
        self._handle = None
        self.reason: str | None = None
        self._failure: str | None = None  # why the last begin() took no sample
        try:
            lib = nvml or device_info.nvml()
            handle = handle or device_info.visible_device_handle(lib)
            support = lib.nvmlGpmQueryDeviceSupport(handle)
        except device_info.NoGpuError as exc:
            self.reason = f"NVML unavailable: {exc}"
            return
        except Exception as exc:  # an NVML too old for GPM raises NVMLError_FunctionNotFound here
            self.reason = f"GPM query failed: {exc}"
            return
        if not support.isSupportedDevice:
            self.reason = "GPM is not supported on this GPU (it needs Hopper or newer)"
            return
        self._lib, self._handle = lib, handle

    @property
    def supported(self) -> bool:
        return self._lib is not None

    def begin(self) -> Any:
        """A sample at the window's start (None where GPM is unsupported or sampling failed)."""
        if not self.supported:
            return None
        sample = self._lib.nvmlGpmSampleAlloc()
        try:
            self._lib.nvmlGpmSampleGet(self._handle, sample)
        except Exception as exc:  # a failed sample costs this window its metrics, not the measurement
            self._lib.nvmlGpmSampleFree(sample)
            self._failure = f"GPM sampling failed: {exc}"
            return None
        return sample

    def end(self, start: Any) -> dict:
        """The window's metrics from ``start`` to now."""
        if start is None:
            reason, self._failure = self._failure or self.reason, None
            return {"supported": False, "reason": reason}
        lib = self._lib
        stop = lib.nvmlGpmSampleAlloc()
        try:
            lib.nvmlGpmSampleGet(self._handle, stop)
            return self._metrics(start, stop)
        except Exception as exc:
            return {"supported": False, "reason": f"GPM sampling failed: {exc}"}
        finally:
            lib.nvmlGpmSampleFree(start)
            lib.nvmlGpmSampleFree(stop)

    def _metrics(self, start: Any, stop: Any) -> dict:
        lib = self._lib
        request = lib.c_nvmlGpmMetricsGet_t()
        request.version = lib.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(GPM_METRICS)
        request.sample1 = start
        request.sample2 = stop
        for i, metric_id in enumerate(GPM_METRICS.values()):
            request.metrics[i].metricId = metric_id
        lib.nvmlGpmMetricsGet(request)
        out: dict[str, Any] = {"supported": True}
        for i, name in enumerate(GPM_METRICS):
            metric = request.metrics[i]
            # a metric the device cannot count comes back with its own error code: None, not a made-up 0
            out[name] = float(metric.value) if metric.nvmlReturn == lib.NVML_SUCCESS else None
        return out
