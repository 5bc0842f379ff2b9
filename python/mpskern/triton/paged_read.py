"""A paged-read roofline (`python scripts/decode_probe.py pages`): the bytes a decode step reads, in its access
pattern, and nothing else. Program (sequence, KV head, chunk) reads its KV head's slice of ``PAGES`` pages of
K and V through the block table, in table order, as a decode CTA does, and writes one fp32 sum so the loads
cannot be dropped. Its time is how fast this card streams a paged cache with this page order; the decode
kernels add their math and pipelines to it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_read_kernel(k_ptr, v_ptr, table_ptr, out_ptr, max_pages, KVH: tl.constexpr, PAGE: tl.constexpr,
                       D: tl.constexpr, PAGES: tl.constexpr):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bh // KVH).to(tl.int64)
    slice_offs = tl.arange(0, PAGE)[:, None] * (KVH * D) + (bh % KVH) * D + tl.arange(0, D)[None, :]
    acc = tl.zeros([PAGE, D], dtype=tl.float32)
    for i in range(PAGES):
        page = tl.load(table_ptr + b * max_pages + chunk * PAGES + i).to(tl.int64)
        acc += tl.load(k_ptr + page * (PAGE * KVH * D) + slice_offs).to(tl.float32)
        acc += tl.load(v_ptr + page * (PAGE * KVH * D) + slice_offs).to(tl.float32)
    tl.store(out_ptr + bh * tl.num_programs(1) + chunk, tl.sum(tl.sum(acc, axis=1), axis=0))


def paged_read(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor,
               pages_per_program: int = 8) -> torch.Tensor:
    """out[b, h, c] = sum of K and V of KV head h over pages block_table[b, c * P : (c + 1) * P] (P =
    ``pages_per_program``); every table entry is read. Caches ``[num_pages, page_size, KVH, D]``, contiguous;
    out ``[B, KVH, max_pages / P]`` fp32."""
    _, page_size, kv_heads, head_dim = k_cache.shape
    batch, max_pages = block_table.shape
    chunks = max_pages // pages_per_program
    if v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [num_pages, page_size, KVH, D] of one shape")
    if max_pages % pages_per_program or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 with a multiple of {pages_per_program} pages per row")
    if out.shape != (batch, kv_heads, chunks) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 of shape {(batch, kv_heads, chunks)}")
    _paged_read_kernel[(batch * kv_heads, chunks)](k_cache, v_cache, block_table, out, max_pages, KVH=kv_heads,
                                                   PAGE=page_size, D=head_dim, PAGES=pages_per_program, num_warps=4)
    return out
