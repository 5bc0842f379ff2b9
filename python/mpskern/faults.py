"""A deliberate illegal memory access, for the fault-isolation experiment (``--inject-fault``).

The production study warns that one faulting MPS client can take its co-located clients down; this is the
fault. The kernel stores to ``buffer + offset`` with the offset read from device memory, so the same compiled
kernel runs in bounds at preparation (compiled before the window) and far out of bounds when fired.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FAR_ELEMENTS = 1 << 40  # 4 TiB past a live allocation: mapped on no GPU


@triton.jit
def _store_at_offset(buffer, offset_ptr):
    offset = tl.load(offset_ptr)
    tl.store(buffer + offset, 1.0)


class FaultKernel:
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        with torch.cuda.stream(stream):
            self.buffer = torch.zeros(1, device="cuda", dtype=torch.float32)
            self.offset = torch.zeros(1, device="cuda", dtype=torch.int64)
            _store_at_offset[(1,)](self.buffer, self.offset)  # compile now, store in bounds

    def fire(self) -> None:
        """Enqueue the illegal access on the lane's stream; the error surfaces at the next sync."""
        with torch.cuda.stream(self.stream):
            self.offset.fill_(FAR_ELEMENTS)
            _store_at_offset[(1,)](self.buffer, self.offset)
