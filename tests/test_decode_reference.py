"""CPU: the torch backend and the dense reference against the float64 definition; the split planner."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from mpskern import ops
from mpskern.decode_plan import CUDA_ROUND_SPLITS, CUDA_SPLITS, MAX_HEADS_PER_CTA, TRITON_SPLITS, plan_decode
from mpskern.paged_kv import decode_inputs, make_paged_kv
from mpskern.reference import decode_attention_dense, decode_attention_naive


@pytest.mark.parametrize("hk,head_dim,page_size", [((14, 2), 64, 16), ((12, 2), 128, 1), ((8, 4), 256, 128),
                                                   ((6, 6), 64, 4)])
def test_torch_backend_and_dense_reference_match_float64(hk, head_dim, page_size):
    torch.manual_seed(0)
    lens = [1, 15, 16, 17, 97, 0]
    kv = make_paged_kv(lens, hk[1], head_dim, page_size=page_size, dtype=torch.float16, device="cpu")
    q = torch.randn(len(lens), hk[0], head_dim).half()
    naive = decode_attention_naive(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    out = torch.full_like(q, float("nan"))
    ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, backend="torch")
    assert rel_err(out, naive) < 2e-3
    dense = decode_attention_dense(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, dtype=torch.float64)
    assert rel_err(dense, naive) < 1e-12
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # length 0 -> zeros


def test_naive_reference_is_attention():
    """One sequence, one head, by hand: softmax(q.k * scale) @ v."""
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    q = torch.tensor([[[2.0, -1.0]]])
    k_cache, v_cache = k.view(3, 1, 1, 2), v.view(3, 1, 1, 2)  # page_size 1
    table = torch.tensor([[2, 0, 1]], dtype=torch.int32)  # tokens live on pages 2, 0, 1
    lens = torch.tensor([3], dtype=torch.int32)
    out = decode_attention_naive(q, k_cache, v_cache, table, lens, scale=1.0)
    scores = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)  # k[2], k[0], k[1] against q
    expected = torch.softmax(scores, 0) @ v[[2, 0, 1]].double()
    assert torch.allclose(out[0, 0], expected)


@pytest.mark.parametrize("batch,kvh,group,ctx,splits", [
    (1024, 2, 8, 512, 1),     # plenty of CTAs: no split
    (64, 2, 8, 8192, 1),      # 128 CTAs on 132 SMs: splitting would cost more than the 4 idle SMs
    (8, 2, 8, 32768, None),   # 16 CTAs: must split
    (1, 1, 48, 16384, None),  # group > 16: head chunks
])
def test_plan_decode(batch, kvh, group, ctx, splits):
    plan = plan_decode(batch=batch, kv_heads=kvh, group=group, max_context=ctx, num_sms=132, ctas_per_sm=2,
                       tile_tokens=64, policy=CUDA_SPLITS)
    if splits is not None:
        assert plan.num_splits == splits
    assert plan.tokens_per_split % 64 == 0
    assert plan.num_splits * plan.tokens_per_split >= ctx > (plan.num_splits - 1) * plan.tokens_per_split
    assert plan.head_chunks * plan.heads_per_chunk >= group and plan.heads_per_chunk <= MAX_HEADS_PER_CTA
    ctas = batch * kvh * plan.head_chunks * plan.num_splits
    base = batch * kvh * plan.head_chunks
    if base >= CUDA_SPLITS.unsplit_ctas_per_sm * 132:
        assert plan.num_splits == 1
    else:  # about `waves` waves of the 2 CTA slots per SM (tile rounding may shave a few), or 256-token splits
        slots = CUDA_SPLITS.waves * 132 * 2
        assert 0.9 * min(slots, base * (ctx // 256)) <= ctas <= slots + 2 * base


def test_triton_needs_more_ctas_before_it_stays_unsplit():
    kw = dict(batch=64, kv_heads=2, group=8, max_context=8192, num_sms=132, ctas_per_sm=4, tile_tokens=64)
    assert plan_decode(**kw, policy=CUDA_SPLITS).num_splits == 1
    assert plan_decode(**kw, policy=TRITON_SPLITS).num_splits == 9  # 128 CTAs -> two waves of 528 slots


@pytest.mark.parametrize("batch,kvh,ctas_per_sm,splits",
                         [(8, 2, 2, 16), (8, 4, 2, 8), (64, 2, 2, 1), (3, 2, 2, 43), (8, 2, 1, 8), (8, 4, 1, 4)])
def test_round_kernel_splits_never_start_an_extra_wave(batch, kvh, ctas_per_sm, splits):
    """One wave of the round kernel's slots at most: with 2 wide slots per SM, 8 x 32768 with 4 KV heads takes
    8 splits (256 CTAs), where rounding up would give 17 (544 CTAs, a thin second wave even for the narrow
    kernel's 528 slots); with 1 slot per SM, 4 (128 CTAs). With 3 sequences, 44 splits of 745 tokens
    round to 43 of 768."""
    plan = plan_decode(batch=batch, kv_heads=kvh, group=7, max_context=32768, num_sms=132, ctas_per_sm=ctas_per_sm,
                       tile_tokens=64, policy=CUDA_ROUND_SPLITS)
    assert plan.num_splits == splits and batch * kvh * plan.num_splits <= 132 * ctas_per_sm


def test_plan_decode_forced_splits():
    plan = plan_decode(batch=4, kv_heads=2, group=7, max_context=1000, num_sms=132, ctas_per_sm=2, tile_tokens=64,
                       policy=CUDA_SPLITS, num_splits=3)
    assert plan.num_splits == 3 and plan.tokens_per_split == 384


def test_cuda_backend_plans_from_the_kernels_occupancy_once_per_shape(monkeypatch):
    """The CUDA backend's launch plan uses the kernel's own occupancy and tile, and is computed once per shape
    (the extension is stubbed: this runs without a GPU)."""
    from mpskern import cuda_backend

    calls = []

    class StubExtension:
        def decode_attention_info(self, *, dtype, head_dim, heads_per_chunk, page_size, grid_size, num_splits):
            calls.append((dtype, head_dim, heads_per_chunk, page_size, grid_size, num_splits))
            return {"name": "decode_attention_tma", "num_sms": 132, "blocks_per_sm": 2}

        def decode_attention_tile_tokens(self):
            return 64

    monkeypatch.setattr(cuda_backend, "_C", StubExtension())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda_backend._cached_plan.cache_clear()
    for _ in range(3):
        plan = cuda_backend.decode_plan(8, 34, 2, 128, 32768, torch.bfloat16, 16)
    # group 17 -> two chunks of <= 9 heads; queried once, for the kernel a split launch of those CTAs takes
    assert calls == [(1, 128, 9, 16, 8 * 2 * 2, 2)]
    assert plan == plan_decode(batch=8, kv_heads=2, group=17, max_context=32768, num_sms=132, ctas_per_sm=2,
                               tile_tokens=64, policy=CUDA_SPLITS)
    cuda_backend._cached_plan.cache_clear()


@pytest.mark.parametrize("shuffle", [True, False])
def test_decode_inputs_page_order(shuffle):
    """The benchmark's inputs hand pages out shuffled; the paging-cost probe's in order, each sequence contiguous."""
    _, kv, _ = decode_inputs(4, 40, 4, 2, 64, device="cpu", shuffle=shuffle)
    ids = kv.block_table.flatten()
    assert sorted(ids.tolist()) == list(range(12))  # every page handed out once
    assert (ids.tolist() == list(range(12))) == (not shuffle)
