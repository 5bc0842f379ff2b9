"""Workloads: a config (model, phase, kernel, batch, context, backend, fusion), its plan (layer count,
bytes and FLOPs per step, working set, memory) and the kernel stream a client runs.

``config`` and ``counts`` are host-only (the driver uses them without a CUDA context); ``streams``
allocates and launches, inside a client.
"""
from .config import DTYPES, FUSIONS, KERNELS, PHASES, WorkloadConfig
from .counts import DEFAULT_L2_BYTES, L2_FACTOR, OpCount, StreamPlan, op_counts, plan, validate
from .streams import Stream, build_stream

__all__ = ["DEFAULT_L2_BYTES", "DTYPES", "FUSIONS", "KERNELS", "L2_FACTOR", "OpCount", "PHASES", "Stream",
           "StreamPlan", "WorkloadConfig", "build_stream", "op_counts", "plan", "validate"]
