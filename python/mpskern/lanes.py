"""Real lanes: a workload's kernel stream on its own CUDA stream, replayed as a CUDA graph or launched eagerly.

Imported only inside client processes (it touches CUDA); the driver refers to ``build_cuda_lane`` by name.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from . import device_info, workloads
from .client import LaneSpec, one_line

WARMUP_STEPS = 3  # eager steps before capture (compiles, cuBLAS handles), then replays before "ready"


def build_cuda_lane(spec: LaneSpec) -> CudaLane:
    return CudaLane(spec)


class CudaLane:
    """One workload stream. Built, warmed and captured on its own (non-default) CUDA stream, so N lanes in one
    process (mode ``streams``) run concurrently, and one lane per process never touches the legacy stream."""

    def __init__(self, spec: LaneSpec) -> None:
        self.spec = spec
        started = time.monotonic()
        self.cuda_stream = torch.cuda.Stream()
        with torch.cuda.stream(self.cuda_stream):  # buffers belong to the stream that uses them
            self.stream = workloads.build_stream(spec.workload, device="cuda", seed=spec.seed, warmup=False)
        self.build_s = time.monotonic() - started
        self.prepare_s = 0.0
        self.graph: torch.cuda.CUDAGraph | None = None
        # a ring of reusable events: the window loop never holds more than in_flight unfinished ones
        self._events = [torch.cuda.Event() for _ in range(spec.in_flight + 1)]
        self._next_event = 0
        self._fault = None

    def prepare(self) -> None:
        started = time.monotonic()
        with torch.cuda.stream(self.cuda_stream):
            for _ in range(WARMUP_STEPS):
                self.stream.step()
        self.cuda_stream.synchronize()
        if self.spec.launch == "graph":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.cuda_stream):
                self.stream.step()
            self.graph = graph
        for _ in range(WARMUP_STEPS):
            self.launch()
        if self.spec.may_fault:
            from .faults import FaultKernel

            self._fault = FaultKernel(self.cuda_stream)
        self.cuda_stream.synchronize()
        self.prepare_s = time.monotonic() - started

    def launch(self) -> None:
        with torch.cuda.stream(self.cuda_stream):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.stream.step()

    def fence(self) -> torch.cuda.Event:
        event = self._events[self._next_event]
        self._next_event = (self._next_event + 1) % len(self._events)
        event.record(self.cuda_stream)
        return event

    def done(self, token: torch.cuda.Event) -> bool:
        return token.query()

    def wait(self, token: torch.cuda.Event) -> None:
        token.synchronize()

    def synchronize(self) -> None:
        self.cuda_stream.synchronize()

    def inject_fault(self) -> None:
        if self._fault is None:
            raise RuntimeError("fault injection was not prepared for this lane (LaneSpec.may_fault)")
        self._fault.fire()

    def describe(self) -> dict:
        s = self.stream
        return {
            "tokens_per_step": s.tokens_per_step,
            "bytes_per_step": s.bytes_per_step,
            "flops_per_step": s.flops_per_step,
            "layers": s.layers,
            "layers_reason": s.plan.layers_reason,
            "working_set_bytes": s.plan.working_set_bytes,
            "memory_bytes": s.plan.memory_bytes,
            "op_backends": dict(s.op_backends),
            "launch": self.spec.launch,
            "build_s": self.build_s,
            "prepare_s": self.prepare_s,
            "kernels": kernel_occupancy(s),
            "device": device_info.torch_device_properties(),
            "process_memory_reserved_bytes": torch.cuda.memory_reserved(),
        }


# --- theoretical occupancy of the custom (csrc) kernels a stream launches ------------------------------------

def _decode_attention_info(stream: Any) -> dict:
    from . import cuda_backend

    c, m = stream.config, stream.plan.model
    return cuda_backend.kernel_info(batch=c.batch, heads=m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim,
                                    max_context=stream.plan.pages_per_seq * c.page_size,
                                    dtype=getattr(torch, c.dtype_name), page_size=c.page_size)


_KERNEL_INFO = {"decode_attention": _decode_attention_info}  # stream role -> its launch's resources


def kernel_occupancy(stream: Any) -> dict:
    """Registers, shared memory, block/grid and theoretical occupancy of every cuda-backend op of the stream,
    for the launch it makes; ``{"available": False, "reason": ...}`` where there is nothing to report."""
    roles = [role for role, backend in stream.op_backends.items() if backend == "cuda"]
    if not roles:
        return {"available": False, "reason": "no op of this stream runs on the cuda backend"}
    ops: dict[str, dict] = {}
    for role in roles:
        query = _KERNEL_INFO.get(role)
        try:
            if query is None:
                raise NotImplementedError("mpskern.cuda_backend reports no kernel info for this op yet")
            ops[role] = _plain(query(stream))
        except Exception as exc:  # the extension may be absent or older than this module
            ops[role] = {"available": False, "reason": one_line(exc)}
    return {"available": any(o.get("available", True) for o in ops.values()), "ops": ops}


def _plain(value: Any) -> Any:
    """JSON-safe copy (the extension returns dicts of ints, floats and strings, but be sure)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
