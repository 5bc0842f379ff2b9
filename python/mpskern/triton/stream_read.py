"""The read ceiling's kernel (mpskern.timing.read_bandwidth_gbs): each program streams a contiguous slab of
BLOCK * ITERS elements and writes its fp32 sum, so the loads cannot be dropped and the only write is one float
per 64K elements."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
ITERS = 16


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        acc += tl.load(x_ptr + base + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_read_programs(numel: int) -> int:
    return numel // (BLOCK * ITERS)


def stream_read(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = sum of x's i-th slab of BLOCK * ITERS elements (x: 1-D, a whole number of slabs)."""
    n = stream_read_programs(x.numel())
    if x.dim() != 1 or x.numel() != n * BLOCK * ITERS or out.numel() < n:
        raise ValueError(f"x must be 1-D with a multiple of {BLOCK * ITERS} elements and out hold >= {n} floats")
    _stream_read_kernel[(n,)](x, out, BLOCK=BLOCK, ITERS=ITERS, num_warps=8)
    return out
