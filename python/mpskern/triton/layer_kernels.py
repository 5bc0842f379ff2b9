"""The fused small kernels of a decoder layer (the ``"triton"`` backend of :mod:`mpskern.ops.layer`).

These are the short, memory-bound launches between the GEMMs of a layer. An engine without custom kernels
runs each of them as several torch ops (add, upcast, reduce, rsqrt, scale, downcast, multiply; gather cos/sin,
rotate q, rotate k, two scatters); fusing them reads and writes each activation once:

- ``rmsnorm``: one program per token row; with a residual it is vLLM's ``fused_add_rms_norm``
  (``residual += x``, then normalise the sum).
- ``rope_kv_append``: one program per token rotates all its q and k heads in place and writes k and v
  straight into their paged-cache slot, so the rotated k is never re-read by a separate append kernel.

fp32 math; loads and stores in the tensors' dtype. No host sync, outputs preallocated by the caller, so both
are capturable in a CUDA graph.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    stride_x, stride_res, stride_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= n_cols: the whole row sits in registers
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the storage dtype before normalising it, as the unfused path (an in-place torch
        # add) does: the two fusion levels then compute the same function.
        s = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_res + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _row_warps(block: int) -> int:
    # Enough threads that each holds ~8 elements of the row at most; a row is at most a few thousand wide.
    return max(1, min(16, block // 256))


def rmsnorm(x, weight, eps, residual, out):
    t, n = x.shape
    block = triton.next_power_of_2(n)
    res = residual if residual is not None else x  # dummy pointer when there is no residual
    _rmsnorm_kernel[(t,)](
        x, res, weight, out,
        x.stride(0), res.stride(0), out.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_row_warps(block),
    )
    return out


@triton.jit
def _rotate_heads(ptr, stride_h, n_heads, offs_h, offs_d, half, cos, sin,
                  cache_ptr, cache_row, WRITE_CACHE: tl.constexpr):
    """Rotate the ``[n_heads, 2 * half]`` rows at ``ptr`` in place (rotate-half); optionally also write the
    result into the cache row at ``cache_ptr + cache_row`` (heads packed, ``2 * half`` apart)."""
    mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < half)
    lo = ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + half, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(ptr.dtype.element_ty)
    y2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(ptr.dtype.element_ty)
    tl.store(lo, y1, mask=mask)
    tl.store(lo + half, y2, mask=mask)
    if WRITE_CACHE:
        c = cache_ptr + cache_row + offs_h[:, None] * (2 * half) + offs_d[None, :]
        tl.store(c, y1, mask=mask)
        tl.store(c + half, y2, mask=mask)


@triton.jit
def _rope_kv_append_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    n_heads: tl.constexpr,  # model constants: compiled in, so masks fold away where they are powers of two
    n_kv_heads: tl.constexpr,
    half: tl.constexpr,  # head_dim / 2
    BLOCK_H: tl.constexpr,  # next power of two >= n_heads
    BLOCK_KVH: tl.constexpr,  # next power of two >= n_kv_heads
    BLOCK_HALF: tl.constexpr,  # next power of two >= head_dim / 2
):
    tok = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    # cos/sin of this token's position, loaded once and shared by all its q and k heads.
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cs = cos_sin_ptr + pos * stride_cs + offs_d
    cos = tl.load(cs, mask=offs_d < half, other=0.0).to(tl.float32)
    sin = tl.load(cs + half, mask=offs_d < half, other=0.0).to(tl.float32)

    # int64: a cache of a large batch at long context holds more than 2**31 elements.
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    cache_row = slot * n_kv_heads * 2 * half

    _rotate_heads(q_ptr + tok * stride_qt, stride_qh, n_heads, tl.arange(0, BLOCK_H), offs_d, half, cos, sin,
                  q_ptr, 0, WRITE_CACHE=False)
    offs_kvh = tl.arange(0, BLOCK_KVH)
    _rotate_heads(k_ptr + tok * stride_kt, stride_kh, n_kv_heads, offs_kvh, offs_d, half, cos, sin,
                  k_cache_ptr, cache_row, WRITE_CACHE=True)

    # v is appended as is (two halves, to reuse the [heads, D/2] tile shape of the rotation).
    mask = (offs_kvh[:, None] < n_kv_heads) & (offs_d[None, :] < half)
    src = v_ptr + tok * stride_vt + offs_kvh[:, None] * stride_vh + offs_d[None, :]
    dst = v_cache_ptr + cache_row + offs_kvh[:, None] * (2 * half) + offs_d[None, :]
    tl.store(dst, tl.load(src, mask=mask), mask=mask)
    tl.store(dst + half, tl.load(src + half, mask=mask), mask=mask)


def rope_kv_append(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
    t, h, d = q.shape
    kvh = k.shape[1]
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_h = triton.next_power_of_2(h)
    _rope_kv_append_kernel[(t,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        n_heads=h, n_kv_heads=kvh, half=half,
        BLOCK_H=block_h,
        BLOCK_KVH=triton.next_power_of_2(kvh),
        BLOCK_HALF=block_half,
        num_warps=max(2, min(8, block_h * block_half // 512)),  # at most 16 rotated pairs per thread
    )

