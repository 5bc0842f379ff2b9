"""The ``cuda`` backend: packs torch tensors into the raw-pointer API of ``mpskern._C``.

The extension does not link PyTorch; this module owns the tensor -> (pointer, stride) translation, the
workspace allocation (so C++ allocates nothing and CUDA-graph capture sees torch allocations) and the launch
plan shared with the Triton backend.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from .decode_plan import (CUDA_ROUND_SPLITS, CUDA_SPLITS, DecodePlan, SplitPolicy, head_chunking, plan_decode,
                          split_workspace)

try:
    from . import _C
except ImportError as exc:  # built without nvcc, or an import-time failure worth showing
    _C = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


def available() -> bool:
    return _C is not None


def extension() -> Any:
    if _C is None:
        raise RuntimeError(
            "the CUDA backend (mpskern._C) is not built: reinstall with nvcc on PATH "
            f"(import error: {_IMPORT_ERROR})"
        )
    return _C


def decode_plan(batch: int, heads: int, kv_heads: int, head_dim: int, max_context: int, dtype: torch.dtype,
                page_size: int, num_splits: int | None = None) -> DecodePlan:
    """The launch the CUDA kernel uses for these sizes (also what kernel_info reports). The split count fills
    the waves of the kernel a split launch of these (sequence, KV head) pairs takes (decode_attention.cu picks
    it by page size, head_dim, grid and whether it splits)."""
    return _cached_plan(torch.cuda.current_device(), batch, heads, kv_heads, head_dim, max_context, dtype, page_size,
                        num_splits)


@functools.lru_cache(maxsize=4096)
def _cached_plan(device_index: int, batch: int, heads: int, kv_heads: int, head_dim: int, max_context: int,
                 dtype: torch.dtype, page_size: int, num_splits: int | None) -> DecodePlan:
    # Keyed by device: the occupancy query runs on the current device. Cached so an eager decode loop pays
    # for the plan (and its two calls into the extension) once per shape, not once per launch.
    del device_index
    ext = extension()
    group = heads // kv_heads
    head_chunks, heads_per_chunk = head_chunking(group)
    # Only a split count uses the occupancy, so ask for the kernel a split launch takes (for the round kernel,
    # wide rather than triple: the triple shape is for unsplit grids).
    res = ext.decode_attention_info(dtype=_DTYPE_CODES[dtype], head_dim=head_dim, heads_per_chunk=heads_per_chunk,
                                    page_size=page_size, grid_size=batch * kv_heads * head_chunks, num_splits=2)
    return plan_decode(batch=batch, kv_heads=kv_heads, group=group, max_context=max_context,
                       num_sms=res["num_sms"], ctas_per_sm=res["blocks_per_sm"],
                       tile_tokens=ext.decode_attention_tile_tokens(), policy=split_policy(res["name"]),
                       num_splits=num_splits)


def split_policy(kernel_name: str) -> SplitPolicy:
    """How the CUDA backend splits for the kernel that would run unsplit (decode_plan.py has the measurements)."""
    return CUDA_ROUND_SPLITS if kernel_name.startswith("decode_attention_round") else CUDA_SPLITS


def decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, out, num_splits=None):
    ext = extension()
    b, h, d = q.shape
    _, page_size, kvh, _ = k_cache.shape
    plan = decode_plan(b, h, kvh, d, block_table.shape[1] * page_size, q.dtype, page_size, num_splits)
    workspace = split_workspace(plan, b, h, d, q.device)
    ws = (workspace[0].data_ptr(), workspace[1].data_ptr()) if workspace else (0, 0)
    ext.decode_attention(
        q=q.data_ptr(), q_stride_b=q.stride(0), q_stride_h=q.stride(1),
        k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), num_pages=k_cache.shape[0],
        block_table=block_table.data_ptr(), max_pages=block_table.shape[1], seq_lens=seq_lens.data_ptr(),
        out=out.data_ptr(), out_stride_b=out.stride(0), out_stride_h=out.stride(1),
        o_partial=ws[0], lse=ws[1],
        batch=b, heads=h, kv_heads=kvh, head_dim=d, page_size=page_size,
        num_splits=plan.num_splits, tokens_per_split=plan.tokens_per_split,
        head_chunks=plan.head_chunks, heads_per_chunk=plan.heads_per_chunk, scale=scale,
        dtype=_DTYPE_CODES[q.dtype], stream=torch.cuda.current_stream(q.device).cuda_stream,
    )
    return out


def kernel_info(*, batch: int, heads: int, kv_heads: int, head_dim: int, max_context: int,
                dtype: torch.dtype = torch.bfloat16, page_size: int = 16, num_splits: int | None = None) -> dict:
    """Registers, shared memory, block/grid size and theoretical occupancy of the decode launch these sizes
    get (attention kernel, plus the combine kernel when the context is split); ``name`` says which attention
    kernel. Needs a CUDA device."""
    plan = decode_plan(batch, heads, kv_heads, head_dim, max_context, dtype, page_size, num_splits)
    grid = batch * kv_heads * plan.head_chunks * plan.num_splits
    info = {"decode_attention": extension().decode_attention_info(
        dtype=_DTYPE_CODES[dtype], head_dim=head_dim, heads_per_chunk=plan.heads_per_chunk, page_size=page_size,
        grid_size=grid, num_splits=plan.num_splits)}
    if plan.needs_combine:
        info["decode_combine"] = extension().decode_combine_info(dtype=_DTYPE_CODES[dtype], grid_size=batch * heads)
    info["plan"] = {"num_splits": plan.num_splits, "tokens_per_split": plan.tokens_per_split,
                    "head_chunks": plan.head_chunks, "heads_per_chunk": plan.heads_per_chunk}
    return info
