"""Paged decode attention: the public op and its input checks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks
from .dispatch import implementation, register

register("decode_attention", "cuda", "mpskern.cuda_backend:decode_attention")
register("decode_attention", "triton", "mpskern.triton.decode_attention:decode_attention")
register("decode_attention", "torch", "mpskern.reference:decode_attention")


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    max_pages: int
    num_pages: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def max_context(self) -> int:
        return self.max_pages * self.page_size


def check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens, out, backend: str) -> DecodeShape:
    q = checks.tensor("q", q)
    k_cache = checks.tensor("k_cache", k_cache)
    v_cache = checks.tensor("v_cache", v_cache)
    block_table = checks.tensor("block_table", block_table)
    seq_lens = checks.tensor("seq_lens", seq_lens)
    checks.dtype("q", q, checks.HALF_DTYPES)
    checks.dtype("k_cache", k_cache, (q.dtype,))
    checks.dtype("v_cache", v_cache, (q.dtype,))
    checks.dtype("block_table", block_table, (torch.int32,))
    checks.dtype("seq_lens", seq_lens, (torch.int32,))
    checks.ndim("q", q, 3, "[batch, heads, head_dim]")
    checks.ndim("k_cache", k_cache, 4, "[num_pages, page_size, kv_heads, head_dim]")
    checks.ndim("block_table", block_table, 2, "[batch, max_pages]")
    b, h, d = q.shape
    num_pages, page_size, kvh, dk = k_cache.shape
    checks.head_dim(d)
    if dk != d:
        raise ValueError(f"k_cache head_dim ({dk}) must equal q head_dim ({d})")
    checks.shape("v_cache", v_cache, tuple(k_cache.shape), "k_cache's shape")
    checks.gqa(h, kvh)
    checks.page_size(page_size)
    if block_table.shape[0] != b:
        raise ValueError(f"block_table must have batch rows = {b}; got shape {tuple(block_table.shape)}")
    checks.shape("seq_lens", seq_lens, (b,), "[batch]")
    if b == 0 or num_pages == 0 or block_table.shape[1] == 0:
        raise ValueError("batch, num_pages and max_pages must be non-zero")
    checks.last_dim_contiguous("q", q)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table), ("seq_lens", seq_lens)):
        checks.contiguous(name, t)
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": block_table, "seq_lens": seq_lens}
    if out is not None:
        out = checks.tensor("out", out)
        checks.dtype("out", out, (q.dtype,))
        checks.shape("out", out, (b, h, d), "[batch, heads, head_dim]")
        checks.last_dim_contiguous("out", out)
        named["out"] = out
    checks.same_device(named)
    if backend == "cuda" or (backend == "triton" and not checks.triton_interpreting()):
        checks.cuda_device("q", q, backend)
    return DecodeShape(b, h, kvh, d, page_size, block_table.shape[1], num_pages)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    backend: str = "cuda",
    num_splits: int | None = None,
) -> torch.Tensor:
    """Paged decode attention, one query token per sequence.

    q ``[B, H, D]``; k_cache/v_cache ``[num_pages, page_size, KVH, D]``; block_table ``[B, max_pages]`` int32
    (page ids of each sequence, in order); seq_lens ``[B]`` int32. Query head h reads KV head h // (H / KVH).
    Returns ``[B, H, D]`` (written into ``out`` when given). Lengths past ``max_pages * page_size`` are
    clamped to it (the kernels never read outside the block table); a length of 0 gives zeros.
    ``num_splits`` forces the KV split count (None: chosen from the launch shape).
    """
    impl = implementation("decode_attention", backend)
    shape = check_decode_inputs(q, k_cache, v_cache, block_table, seq_lens, out, backend)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")
    scale = shape.head_dim ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return impl(q, k_cache, v_cache, block_table, seq_lens, scale, out, num_splits)
