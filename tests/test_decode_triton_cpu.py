"""The Triton paged decode attention kernels under Triton's CPU interpreter, against the float64 reference.

fp16 only: the interpreter computes bf16 wrongly. Shapes are tiny because the interpreter is slow.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mpskern import ops
from mpskern.reference import decode_attention_naive
from mpskern.triton import decode_attention as triton_decode

pytestmark = pytest.mark.interpreter

TOLERANCE = 2e-3  # relative Frobenius error, fp16


@dataclass(frozen=True)
class Case:
    id: str
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    max_pages: int
    seq_lens: tuple[int, ...]
    num_splits: int | None  # forced split count; None lets the plan choose
    expect_splits: int  # what the launch plan must come out with, so each case tests what it says
    strided: bool = False  # q and out as views into larger buffers (batch/head strides not dense)
    scale: float | None = None


CASES = [
    Case("gqa7-d64-p16-b3", 14, 2, 64, 16, 8, (1, 97, 16), None, 1),
    Case("gqa6-d128-p16-split3", 12, 2, 128, 16, 9, (15, 97, 17), 3, 3),
    Case("gqa2-d64-p1-split3", 8, 4, 64, 1, 160, (97, 1, 15), 3, 3),
    Case("gqa2-d128-p128-split1", 8, 4, 128, 128, 2, (97, 17, 1), 1, 1, strided=True),
    Case("gqa17-chunks-d64-p16-split3", 34, 2, 64, 16, 10, (97, 15, 0), 3, 3),
    Case("gqa17-chunks-d64-p16-split1", 34, 2, 64, 16, 10, (17, 0, 97), 1, 1, scale=0.3),
    Case("len0-clamped-gqa7-d64-split3", 14, 2, 64, 16, 9, (0, 1000, 33), 3, 3),
    Case("len0-clamped-gqa7-d64-split1", 14, 2, 64, 16, 7, (0, 1000, 33), 1, 1, strided=True),
    Case("b1-empty-split-gqa7-d128-split3", 14, 2, 128, 16, 9, (97,), 3, 3),
    Case("b1-auto-split-gqa6-d64-p128", 12, 2, 64, 128, 4, (300,), None, 2),
    Case("b1-d256-p16-tiny", 4, 2, 256, 16, 2, (17,), None, 1),
    Case("mha-d64-p16-split3", 4, 4, 64, 16, 9, (97, 1), 3, 3),
    Case("gqa16-d128-p256-split3", 16, 1, 128, 256, 2, (300, 15), 3, 3),
]


def _make_inputs(case: Case, gen: torch.Generator):
    b = len(case.seq_lens)
    h, kvh, d = case.heads, case.kv_heads, case.head_dim
    num_pages = b * case.max_pages + 3  # a few pages no sequence uses
    dt = torch.float16
    k_cache = torch.randn(num_pages, case.page_size, kvh, d, generator=gen).to(dt)
    v_cache = torch.randn(num_pages, case.page_size, kvh, d, generator=gen).to(dt)
    block_table = torch.randperm(num_pages, generator=gen)[: b * case.max_pages].view(b, case.max_pages)
    block_table = block_table.to(torch.int32).contiguous()
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32)
    if case.strided:  # q as the first heads of a packed qkv tensor; out inside a wider buffer
        q = torch.randn(b, h + 2 * kvh, d, generator=gen).to(dt)[:, :h]
        out = torch.full((b, h + 1, d), float("nan"), dtype=dt)[:, 1:]
    else:
        q = torch.randn(b, h, d, generator=gen).to(dt)
        out = torch.full((b, h, d), float("nan"), dtype=dt)
    return q, k_cache, v_cache, block_table, seq_lens, out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case: Case):
    gen = torch.Generator().manual_seed(sum(map(ord, case.id)))
    q, k_cache, v_cache, block_table, seq_lens, out = _make_inputs(case, gen)
    capacity = case.max_pages * case.page_size

    plan = triton_decode.launch_plan(len(case.seq_lens), case.heads, case.kv_heads, case.head_dim, capacity,
                                    q.device, case.num_splits)
    assert plan.num_splits == case.expect_splits

    res = ops.decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale=case.scale, out=out,
                               backend="triton", num_splits=case.num_splits)
    assert res is out

    ref = decode_attention_naive(q, k_cache, v_cache, block_table, seq_lens.clamp(max=capacity), case.scale)
    assert not torch.isnan(out).any(), "some outputs were not written"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE, f"relative Frobenius error {err:.2e}"
    for i, n in enumerate(case.seq_lens):
        if n == 0:
            assert torch.all(out[i] == 0), f"sequence {i} has length 0 and must give zeros"
