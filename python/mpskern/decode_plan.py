"""How a paged decode launch is cut into CTAs: shared by the CUDA and Triton backends.

One CTA handles (sequence, KV head, head chunk, KV split). A decode step at small batch or long context has
too few (sequence, KV head) pairs to fill the GPU, so the context is split and the partial results merged by
a combine step. Only host-known sizes are used (the block table's capacity, never seq_lens, which live on the
device), so the plan is fixed for a CUDA graph.

Splitting costs: the partials' write, the combine kernel and its launch take 8 to 13 us per call on H100.
How many CTAs a kernel needs to stream KV at its full rate is measured per kernel (BENCHMARKS.md) and kept
in its SplitPolicy: the CUDA kernels keep their full rate with one CTA per SM (per-warp kernel on H100, 3B
shapes, 128 unsplit CTAs: 53 us for 134 MB, on the same time-vs-bytes line as 1024 CTAs; the round kernel's
triple shape on H200, 3B 64 x 8192: 126 to 129 us unsplit, 0.996 to 1.013 x SDPA); the Triton kernel needs
about two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_HEADS_PER_CTA = 16  # the query-head tile of one CTA (the M dimension of the tensor-core tile)
MIN_TOKENS_PER_SPLIT = 256  # below this the combine traffic and per-CTA start-up stop paying off


@dataclass(frozen=True)
class SplitPolicy:
    unsplit_ctas_per_sm: float  # an unsplit grid with at least this many CTAs per SM is left unsplit
    waves: int  # otherwise split until the grid fills this many waves of CTA slots
    at_most: bool = False  # round the split count down: never start a thin extra wave


# Measured on H100 at the benchmark shapes (3B unless said). CUDA at 64 x 8192 (128 CTAs): unsplit 190 us
# vs split 200; at 8 x 32768 two waves beat one (107 vs 113 us). Triton at 64 x 8192: unsplit 237 us, one
# wave of splits 212, two 193; but unsplit wins at 256 CTAs (7B 64 x 8192: 371 vs 381 us).
CUDA_SPLITS = SplitPolicy(unsplit_ctas_per_sm=0.8, waves=2)
TRITON_SPLITS = SplitPolicy(unsplit_ctas_per_sm=1.5, waves=2)
# The CUDA round kernel (D >= 128 on sm_90) is planned with the occupancy of the shape a split launch takes
# (wide, two CTAs per SM; the one-per-SM triple shape is for unsplit grids): the splits fill at most one wave
# of it. Measured on H200 at 8 x 32768: one wave of wide CTAs (3B 16 splits 69.1 us, 7B 8 splits 127.2) beat two
# of narrow ones (71.2, 129.6), and 17 splits (544 CTAs for 528 narrow slots) took 7B 156 us: the 16 CTAs of
# the thin second wave stream alone. One wave of triple CTAs (8 and 4 splits) lost to it in two sessions:
# 3B 70.2 against 68.8, 7B 129.3 against 128.8.
CUDA_ROUND_SPLITS = SplitPolicy(unsplit_ctas_per_sm=0.8, waves=1, at_most=True)


@dataclass(frozen=True)
class DecodePlan:
    num_splits: int
    tokens_per_split: int
    head_chunks: int
    heads_per_chunk: int

    @property
    def needs_combine(self) -> bool:
        return self.num_splits > 1


def head_chunking(group: int) -> tuple[int, int]:
    """(head_chunks, heads_per_chunk): a GQA group split into near-equal CTA head tiles of <= 16."""
    head_chunks = math.ceil(group / MAX_HEADS_PER_CTA)
    return head_chunks, math.ceil(group / head_chunks)


def plan_decode(
    *,
    batch: int,
    kv_heads: int,
    group: int,
    max_context: int,
    num_sms: int,
    ctas_per_sm: int,
    tile_tokens: int,
    policy: SplitPolicy,
    num_splits: int | None = None,
) -> DecodePlan:
    """Choose the KV split for a launch. ``num_splits`` forces a split count (tests, tuning)."""
    head_chunks, heads_per_chunk = head_chunking(group)
    max_context = max(max_context, 1)
    if num_splits is None:
        base = batch * kv_heads * head_chunks
        if base >= policy.unsplit_ctas_per_sm * num_sms:
            num_splits = 1
        else:
            slots = policy.waves * num_sms * max(ctas_per_sm, 1)
            wanted = slots // base if policy.at_most else math.ceil(slots / base)
            num_splits = max(1, min(wanted, max_context // MIN_TOKENS_PER_SPLIT))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")
    tokens = math.ceil(math.ceil(max_context / num_splits) / tile_tokens) * tile_tokens
    return DecodePlan(math.ceil(max_context / tokens), tokens, head_chunks, heads_per_chunk)


def split_workspace(plan: DecodePlan, batch: int, heads: int, head_dim: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The combine step's fp32 workspace, allocated through torch (so graph capture sees it): per-split
    normalised partial outputs ``[B, H, S, D]`` and their natural-log LSEs ``[B, H, S]``. None if unsplit."""
    if not plan.needs_combine:
        return None
    o_partial = torch.empty((batch, heads, plan.num_splits, head_dim), dtype=torch.float32, device=device)
    lse = torch.empty((batch, heads, plan.num_splits), dtype=torch.float32, device=device)
    return o_partial, lse
