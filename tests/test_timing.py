"""The measurement helpers: the streaming-read kernel of the read ceiling and the paged-read roofline
(interpreter on CPU, compiled on the GPU), and the interleaved timing the benchmarks take their ratios from."""
from __future__ import annotations

import pytest
import torch

from mpskern import timing
from mpskern.paged_kv import make_paged_kv
from mpskern.triton.paged_read import paged_read
from mpskern.triton.stream_read import BLOCK, ITERS, stream_read

SLAB = BLOCK * ITERS


def check_stream_read(device: str, dtype: torch.dtype) -> None:
    x = torch.randn(3 * SLAB, device=device, dtype=dtype)
    out = torch.full((3,), float("nan"), device=device)  # poisoned: every program must write its sum
    stream_read(x, out)
    want = x.double().view(3, SLAB).sum(dim=1)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-2)


def test_stream_read_rejects_partial_slabs():
    with pytest.raises(ValueError, match="multiple of"):
        stream_read(torch.zeros(SLAB + 1), torch.zeros(2))


def check_paged_read(device: str, dtype: torch.dtype) -> None:
    # odd batch, 3 KV heads, 4 pages per program over 8-page rows, pages shuffled: every slice of every page
    kv = make_paged_kv([8 * 16] * 3, 3, 32, page_size=16, dtype=dtype, device=device)
    out = torch.full((3, 3, 2), float("nan"), device=device)
    paged_read(kv.k_cache, kv.v_cache, kv.block_table, out, pages_per_program=4)
    pages = kv.block_table.long().view(3, 2, 4)  # [B, chunk, page]
    per_page = (kv.k_cache.double() + kv.v_cache.double()).sum(dim=(1, 3))  # [num_pages, KVH]
    want = per_page[pages].sum(dim=2).permute(0, 2, 1)  # [B, KVH, chunk]
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-2)


def test_paged_read_rejects_bad_shapes():
    kv = make_paged_kv([48, 48], 2, 32, device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 2 pages"):
        paged_read(kv.k_cache, kv.v_cache, kv.block_table, torch.zeros(2, 2, 1), pages_per_program=2)
    with pytest.raises(ValueError, match="out must be float32"):
        paged_read(kv.k_cache, kv.v_cache, kv.block_table, torch.zeros(2, 2, 2), pages_per_program=1)


READ_KERNEL_CHECKS = [check_stream_read, check_paged_read]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("check", READ_KERNEL_CHECKS)
def test_read_kernels_on_interpreter(check, dtype):
    check("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("check", READ_KERNEL_CHECKS)
def test_read_kernels_on_gpu(check, dtype):
    check("cuda", dtype)


@pytest.mark.gpu
def test_read_ceiling_is_a_bandwidth_near_the_copy_ceiling():
    read, copy = timing.read_bandwidth_gbs(256 << 20), timing.copy_bandwidth_gbs(256 << 20)
    # a streaming read moves at least most of a copy's bytes per second, and no more than twice (a copy
    # counts its writes too)
    assert 0.8 * copy < read < 2 * copy


@pytest.mark.gpu
def test_interleaved_timing_rotates_and_separates_runs():
    x = torch.randn(1 << 24, device="cuda")
    y = torch.empty_like(x)
    small = timing.graphed(lambda: y[: 1 << 16].copy_(x[: 1 << 16]), calls=10)
    big = timing.graphed(lambda: y.copy_(x), calls=10)
    t_small, t_big = timing.interleaved_ms([small, big], calls=10, rounds=6)
    assert len(t_small) == len(t_big) == 6
    assert all(a > 0 for a in t_small + t_big)
    # 256x the bytes: the big copy must time clearly slower in every round
    assert min(t_big) > 4 * max(t_small)


def test_round_ratios_pair_rounds_in_order():
    assert timing.round_ratios([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == [2.0, 1.0, 4.0]
    with pytest.raises(ValueError, match="rounds"):
        timing.round_ratios([1.0, 2.0], [1.0])
