"""Paged decode attention in Triton (the ``"triton"`` backend of :func:`mpskern.ops.decode_attention`).

One program handles one (sequence, KV head, head chunk, KV split), as cut by
:func:`mpskern.decode_plan.plan_decode` (the same plan as the CUDA backend). All query heads that share a
KV head (up to ``MAX_HEADS_PER_CTA``) sit in the rows of one ``[16, D]`` query tile, so every KV tile
gathered from the paged cache is read from memory once and feeds a tensor-core ``tl.dot`` for the whole
group. Decode attention is bound by that KV read; everything else here is about not wasting it.

With more than one split, each program writes a normalised partial output and its log-sum-exp into an
fp32 workspace and a second kernel merges the splits. Nothing here touches the host after launch (no
``.item()``, no data-dependent Python branches; the workspace comes from ``torch.empty``), so the op can
be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..decode_plan import MAX_HEADS_PER_CTA, TRITON_SPLITS, DecodePlan, plan_decode, split_workspace

# ---------------------------------------------------------------------------------------------------------
# Tunables, per head_dim. BLOCK_N is the KV tile (tokens per loop step) and the split granularity: the
# plan's tokens_per_split is a multiple of it. ctas_per_sm only feeds the launch plan (how many CTAs fill
# the GPU); the values are what fits by registers and shared memory for the sm_90 build of the split kernel
# (ptxas: D64 78 regs / 21 KB, D128 124 regs / 39 KB, D256 153 regs / 42 KB at 4 warps): re-derive them
# when the other fields change.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # KV tokens per loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the KV loop (page ids, then K/V, then the math)
    ctas_per_sm: int  # resident CTAs per SM, for the launch plan


CONFIGS: dict[int, DecodeConfig] = {
    64: DecodeConfig(block_n=64, num_warps=4, num_stages=3, ctas_per_sm=6),
    128: DecodeConfig(block_n=64, num_warps=4, num_stages=3, ctas_per_sm=4),
    256: DecodeConfig(block_n=32, num_warps=4, num_stages=3, ctas_per_sm=3),
}
COMBINE_NUM_WARPS = 4
COMBINE_BLOCK_S = 16  # splits merged per step of the combine loop
INTERPRETER_NUM_SMS = 132  # what the plan assumes under the CPU interpreter (an H100)

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # kernels may only read constexpr globals
_LN2 = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, o_part_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_ob, stride_oh,
    stride_kpage, stride_krow,
    stride_bt,
    num_heads, kv_heads, group, heads_per_chunk, max_context, tokens_per_split, num_splits,
    qk_scale,  # scale * log2(e): scores are kept in the log2 domain so the softmax can use exp2
    HEAD_DIM: tl.constexpr,
    LOG2_PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # True: write fp32 partials + lse to the workspace; False: write `out` directly
):
    pid_bk = tl.program_id(0)  # sequence * kv_heads + kv head: the fastest axis, so a wave covers many sequences
    split = tl.program_id(1)
    chunk = tl.program_id(2)
    b = pid_bk // kv_heads
    kvh = pid_bk % kv_heads

    # This program's token range. Never read past the block table, whatever seq_lens says.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), max_context)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    # The query heads of this KV head's chunk, as the rows of a [BLOCK_H, D] tile (unused rows masked).
    offs_m = tl.arange(0, BLOCK_H)
    head_in_group = chunk * heads_per_chunk + offs_m
    mask_m = (offs_m < heads_per_chunk) & (head_in_group < group)
    heads = kvh * group + head_in_group
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)

    kv_head_off = kvh * HEAD_DIM
    bt_row = block_table_ptr + b * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    # Every step has at least one valid token (start < end), so m_i is finite after the first one.
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + offs_n
        mask_n = tok < end
        # Gather: token t lives in row t % page_size of page block_table[b, t // page_size]. The page id
        # feeds both K and V; int64 because a large cache overflows int32 element offsets.
        page = tl.load(bt_row + (tok >> LOG2_PAGE), mask=mask_n, other=0).to(tl.int64)
        kv_off = page * stride_kpage + (tok & ((1 << LOG2_PAGE) - 1)) * stride_krow + kv_head_off
        kv_ptrs = kv_off[:, None] + offs_d[None, :]
        k = tl.load(k_ptr + kv_ptrs, mask=mask_n[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + kv_ptrs, mask=mask_n[:, None], other=0.0)

        # Scores in fp32; the scale is applied here, not to the fp16/bf16 q, to keep q's precision.
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))

        # Online softmax (base 2): rescale what was accumulated so far to the new running max.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty range (seq_len 0, or a split past the end) has l_i == 0: write zeros, and lse = -inf.
    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if SPLIT:
        # Workspace: o_part [B, H, S, D] and lse [B, H, S], both contiguous fp32.
        row = (b * num_heads + heads) * num_splits + split
        tl.store(o_part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask_m[:, None])
        lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * _LN2,
                       float("-inf"))  # natural-log LSE of the scaled scores
        tl.store(lse_ptr + row, lse, mask=mask_m)
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _decode_combine_kernel(
    o_part_ptr, lse_ptr, out_ptr,
    stride_ob, stride_oh,
    num_heads, num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # One program per (sequence, query head): out = sum_s exp(lse_s - lse_max) * o_s / sum_s exp(...)
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    lse_row = lse_ptr + pid * num_splits
    o_rows = o_part_ptr + pid * num_splits * HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)

    # Pass 1: the largest split LSE, so that the weights below cannot overflow.
    lse_max = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        lse = tl.load(lse_row + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    m = tl.max(lse_max, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0): every weight is 0 below

    # Pass 2: weighted sum of the normalised partials. Empty splits have lse = -inf, so weight 0.
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    denom = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        mask_s = s0 + offs_s < num_splits
        lse = tl.load(lse_row + s0 + offs_s, mask=mask_s, other=float("-inf"))
        w = tl.math.exp2((lse - m) * _LOG2E)
        o = tl.load(o_rows + (s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        denom += w
    total = tl.sum(denom, 0)
    res = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the CPU interpreter: plan as if on an H100
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_plan(batch: int, heads: int, kv_heads: int, head_dim: int, max_context: int,
                device: torch.device, num_splits: int | None = None) -> DecodePlan:
    """The plan this backend launches for a shape (exposed for tests and benchmarks)."""
    return plan_decode(
        batch=batch, kv_heads=kv_heads, group=heads // kv_heads, max_context=max_context,
        num_sms=_num_sms(device), ctas_per_sm=CONFIGS[head_dim].ctas_per_sm,
        tile_tokens=CONFIGS[head_dim].block_n, policy=TRITON_SPLITS, num_splits=num_splits,
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton paged decode attention. Inputs are validated (and ``out`` allocated) by
    :func:`mpskern.ops.decode_attention`; see there for the shapes and semantics."""
    b, h, d = q.shape
    _, page_size, kvh, _ = k_cache.shape
    max_pages = block_table.shape[1]
    cfg = CONFIGS[d]
    plan = launch_plan(b, h, kvh, d, max_pages * page_size, q.device, num_splits)

    # Without a split the kernel writes `out` directly and never touches the workspace pointers.
    o_part, lse = split_workspace(plan, b, h, d, q.device) or (out, out)

    grid = (b * kvh, plan.num_splits, plan.head_chunks)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens,
        out, o_part, lse,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        block_table.stride(0),
        h, kvh, h // kvh, plan.heads_per_chunk, max_pages * page_size, plan.tokens_per_split, plan.num_splits,
        scale * LOG2E,
        HEAD_DIM=d,
        LOG2_PAGE=int(math.log2(page_size)),
        BLOCK_H=MAX_HEADS_PER_CTA,
        BLOCK_N=cfg.block_n,
        SPLIT=plan.needs_combine,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if plan.needs_combine:
        _decode_combine_kernel[(b * h,)](
            o_part, lse, out,
            out.stride(0), out.stride(1),
            h, plan.num_splits,
            HEAD_DIM=d,
            BLOCK_S=min(COMBINE_BLOCK_S, triton.next_power_of_2(plan.num_splits)),
            num_warps=COMBINE_NUM_WARPS,
        )
    return out
