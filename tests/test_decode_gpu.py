"""GPU: the CUDA and Triton paged decode kernels against an fp32 reference (dense gather + masked softmax)."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import rel_err
from mpskern import ops
from mpskern.paged_kv import make_paged_kv
from mpskern.reference import decode_attention_dense

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
CONTEXTS = [1, 15, 16, 17, 97, 1025, 8191, 16384]
HEADS = [(14, 2), (12, 2), (16, 2), (28, 4), (32, 8), (8, 4)]
HEAD_DIMS = [64, 128, 256]
PAGE_SIZES = [1, 16, 128]
DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def run_case(backend, batch_lens, heads, kv_heads, head_dim, page_size, dtype, *, num_splits=None, seed=0,
             q_strided=False, out_layout=None):
    torch.manual_seed(seed)
    kv = make_paged_kv(batch_lens, kv_heads, head_dim, page_size=page_size, dtype=dtype)
    b = len(batch_lens)
    if q_strided:  # q as a slice of a wider [B, H + extra, D] buffer, as from a fused QKV projection
        q = torch.randn(b, heads + 3, head_dim, device="cuda", dtype=dtype)[:, 2 : 2 + heads]
    else:
        q = torch.randn(b, heads, head_dim, device="cuda", dtype=dtype)
    # out, poisoned: [B, H, D], or a view of a wider buffer whose other elements must stay untouched
    if out_layout == "padded_rows":  # rows D + 4 apart: not 16-byte aligned
        buf = torch.full((b, heads, head_dim + 4), float("nan"), device="cuda", dtype=dtype)
        out = buf[..., :head_dim]
    elif out_layout == "head_slice":  # heads 2 .. 2 + H of a [B, H + 3, D] buffer: aligned, with gaps
        buf = torch.full((b, heads + 3, head_dim), float("nan"), device="cuda", dtype=dtype)
        out = buf[:, 2 : 2 + heads]
    else:
        buf = out = torch.full((b, heads, head_dim), float("nan"), device="cuda", dtype=dtype)
    ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, backend=backend,
                         num_splits=num_splits)
    ref = decode_attention_dense(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.3e}"
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside.as_strided(out.size(), out.stride(), out.storage_offset()).fill_(False)
    assert buf[outside].isnan().all(), "wrote outside out"
    return out, ref


# Every context length with every head layout; head_dim / page size / dtype rotate so each value meets
# every context and head layout.
GRID = [
    (ctx, hk, HEAD_DIMS[i % 3], PAGE_SIZES[(i // 3) % 3], DTYPES[i % 2])
    for i, (ctx, hk) in enumerate(itertools.product(CONTEXTS, HEADS))
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "ctx,hk,head_dim,page_size,dtype", GRID,
    ids=[f"ctx{c}-h{h}kv{k}-d{d}-p{p}-{str(t)[6:]}" for c, (h, k), d, p, t in GRID],
)
def test_grid_single_context(backend, ctx, hk, head_dim, page_size, dtype):
    run_case(backend, [ctx, max(1, ctx // 3)], hk[0], hk[1], head_dim, page_size, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_mixed_lengths_in_one_batch(backend, head_dim, page_size, dtype):
    lens = CONTEXTS + [3, 250, 4097]
    run_case(backend, lens, 14, 2, head_dim, page_size, dtype)
    run_case(backend, lens[::-1], 28, 4, head_dim, page_size, dtype, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3, 64, 257])
@pytest.mark.parametrize("hk", [(12, 2), (32, 8), (16, 2)], ids=["h12kv2", "h32kv8", "h16kv2"])
def test_batches(backend, batch, hk):
    g = torch.Generator().manual_seed(batch)
    lens = [CONTEXTS[int(i)] for i in torch.randint(0, 6, (batch,), generator=g)]  # up to 1025 tokens
    run_case(backend, lens, hk[0], hk[1], 128, 16, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_forced_splits(backend, num_splits):
    run_case(backend, [5000, 1, 16384, 333], 16, 2, 128, 16, torch.bfloat16, num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hk", [(34, 2), (48, 1), (1, 1)], ids=["group17", "group48", "mha1"])
def test_group_sizes_beyond_one_cta(backend, hk):
    run_case(backend, [97, 1025, 1], hk[0], hk[1], 64, 16, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_q(backend):
    run_case(backend, [1025, 17], 14, 2, 64, 16, torch.bfloat16, q_strided=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [5, 70, 140], ids=["triple", "wide", "narrow"])
@pytest.mark.parametrize("out_layout", ["padded_rows", "head_slice"])
def test_strided_out(backend, batch, out_layout):
    """out as a view of a wider buffer: the CUDA round kernels write aligned rows by bulk copies and others by
    per-thread stores (batch sizes for each round shape at 16 / 2 heads on 132 SMs, whole sequences per CTA);
    nothing outside the view is written. Lengths include 0 (zeros) and partial tiles."""
    lens = [[200, 97, 33, 0, 16, 161][i % 6] for i in range(batch)]
    run_case(backend, lens, 16, 2, 128, 16, torch.bfloat16, num_splits=1, out_layout=out_layout)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_zero_length_and_clamped_length(backend):
    torch.manual_seed(3)
    kv = make_paged_kv([40, 40, 40], 2, 128, page_size=16, dtype=torch.bfloat16)  # 3 pages per row
    lens = torch.tensor([0, 48, 10_000], dtype=torch.int32, device="cuda")  # 0, exact capacity, past it
    q = torch.randn(3, 16, 128, device="cuda", dtype=torch.bfloat16)
    out = ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, lens, backend=backend)
    clamped = lens.clamp(max=kv.block_table.shape[1] * 16)
    ref = decode_attention_dense(q, kv.k_cache, kv.v_cache, kv.block_table, clamped)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert rel_err(out[1:], ref[1:]) < TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rows_past_the_end_are_never_used(backend, page_size, head_dim):
    """The rest of a sequence's last page holds nan and inf (stale or never-written rows): they must not leak
    into the output. The TMA kernel copies whole 16-row boxes, so it does read them."""
    torch.manual_seed(6)
    lens = [17, 1, 40, 130, 5]
    kv = make_paged_kv(lens, 2, head_dim, page_size=page_size, dtype=torch.bfloat16)
    q = torch.randn(len(lens), 14, head_dim, device="cuda", dtype=torch.bfloat16)
    ref = decode_attention_dense(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    for i, n in enumerate(lens):
        for tok in range(n, -(-n // page_size) * page_size):
            page, row = int(kv.block_table[i, tok // page_size]), tok % page_size
            kv.k_cache[page, row] = float("nan") if tok % 2 else float("inf")
            kv.v_cache[page, row] = float("inf") if tok % 2 else float("nan")
    out = ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, backend=backend)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("page_size", [16, 128])
@pytest.mark.parametrize("shape", ["triple", "wide", "narrow"])
def test_cuda_round_shapes_on_long_ranges(shape, page_size):
    """Each round shape (narrow, wide, triple) on whole sequences of up to 16383 tokens (up to 1024 tiles in one
    pipeline: the page-id window and the stage ring wrap many times), ending on a tile edge or not, with nan and
    inf in the rows past each end; short sequences leave some of a triple CTA's pipelines without tokens."""
    from mpskern import cuda_backend

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = {"triple": sms // 2 - 1, "wide": sms // 2 + 1, "narrow": sms + 1}[shape]
    cycle = [8191, 8205, 16383, 8192, 5000, 700, 33, 197]
    lens = [cycle[i % len(cycle)] for i in range(batch)]
    torch.manual_seed(7)
    kv = make_paged_kv(lens, 2, 128, page_size=page_size, dtype=torch.bfloat16)
    q = torch.randn(batch, 16, 128, device="cuda", dtype=torch.bfloat16)
    ref = decode_attention_dense(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    for i, n in enumerate(lens):
        if n % page_size:
            page = int(kv.block_table[i, n // page_size])
            kv.k_cache[page, n % page_size :] = float("nan")
            kv.v_cache[page, n % page_size :] = float("inf")
    out = torch.full_like(q, float("nan"))
    ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, backend="cuda")
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    if torch.cuda.get_device_capability() >= (9, 0):
        info = cuda_backend.kernel_info(batch=batch, heads=16, kv_heads=2, head_dim=128, page_size=page_size,
                                        max_context=kv.block_table.shape[1] * page_size)
        assert info["decode_attention"]["name"] == f"decode_attention_round_{shape}"
        assert info["plan"]["num_splits"] == 1  # whole sequences per CTA


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_cuda_graph_capture_and_replay(backend):
    torch.manual_seed(4)
    kv = make_paged_kv([3000, 17, 8191], 4, 128, page_size=16, dtype=torch.bfloat16)
    q = torch.randn(3, 28, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    run = lambda: ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out,  # noqa: E731
                                       backend=backend)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up (Triton compile, CUDA attribute set-up) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in range(3):  # new inputs in the captured buffers each replay
        torch.manual_seed(10 + seed)
        q.copy_(torch.randn_like(q))
        kv.seq_lens.copy_(torch.randint(1, 8192, (3,), dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_dense(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
        assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_cuda_kernel_info_reports_the_launch():
    from mpskern import cuda_backend

    info = cuda_backend.kernel_info(batch=8, heads=16, kv_heads=2, head_dim=128, max_context=32768)
    attn = info["decode_attention"]
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    # Pages of 16 tokens take a TMA kernel on sm_90, cp.async elsewhere. At D = 128 on sm_90 the 16 (seq, kv
    # head) pairs split into one wave of wide round CTAs (4 math warps and a copy warp, 96 KB ring, 2 per SM):
    # split launches never take the one-per-SM triple shape.
    assert attn["name"] == ("decode_attention_round_wide" if hopper else "decode_attention")
    assert attn["block_size"] == (160 if hopper else 128) and attn["registers"] > 0
    assert attn["dynamic_smem"] > 48 * 1024 and attn["blocks_per_sm"] >= 1 and 0 < attn["theoretical_occupancy"] <= 1
    assert info["plan"]["num_splits"] > 1 and "decode_combine" in info  # 16 (seq, kv head) pairs: must split
    assert attn["grid_size"] == 8 * 2 * info["plan"]["num_splits"]
    small_pages = cuda_backend.kernel_info(batch=8, heads=16, kv_heads=2, head_dim=128, max_context=32768,
                                           page_size=8)["decode_attention"]
    assert small_pages["name"] == "decode_attention" and small_pages["block_size"] == 128
    if hopper:
        assert attn["blocks_per_sm"] == 2 and attn["dynamic_smem"] >= 96 * 1024
        assert attn["num_sms"] < attn["grid_size"] <= 2 * attn["num_sms"]

        def launch(batch: int, kv_heads: int, head_dim: int = 128, max_context: int = 8192) -> dict:
            info = cuda_backend.kernel_info(batch=batch, heads=8 * kv_heads, kv_heads=kv_heads, head_dim=head_dim,
                                            max_context=max_context)
            assert info["plan"]["num_splits"] == 1 and "decode_combine" not in info  # these fill the GPU
            return info["decode_attention"]

        sms = attn["num_sms"]
        # One CTA per SM or fewer, unsplit: triple. Up to two: wide (96 KB ring). More: narrow (no copy warp).
        triple = launch(sms // 2 - 1, 2)
        assert triple["name"] == "decode_attention_round_triple" and triple["grid_size"] == 2 * (sms // 2 - 1)
        assert triple["block_size"] == 480 and triple["blocks_per_sm"] == 1 and triple["dynamic_smem"] >= 192 * 1024
        wide = launch(sms // 2 + 1, 2)
        assert wide["name"] == "decode_attention_round_wide" and wide["block_size"] == 160
        assert wide["blocks_per_sm"] == 2
        narrow = launch(sms + 1, 2)
        assert narrow["name"] == "decode_attention_round_narrow" and narrow["block_size"] == 128
        assert narrow["blocks_per_sm"] == 4 and narrow["grid_size"] == 2 * sms + 2
        # D = 256: the wide ring is already 192 KB (one CTA per SM), so there is no triple shape.
        d256 = launch(sms // 4, 4, head_dim=256)
        assert d256["name"] == "decode_attention_round_wide" and d256["blocks_per_sm"] == 1
        d64 = cuda_backend.kernel_info(batch=8, heads=16, kv_heads=2, head_dim=64, max_context=32768)
        assert d64["decode_attention"]["name"] == "decode_attention_tma"
        assert d64["decode_attention"]["block_size"] == 256 and d64["decode_attention"]["blocks_per_sm"] == 2


def test_cuda_errors_do_not_crash():
    torch.manual_seed(5)
    kv = make_paged_kv([16], 2, 128, dtype=torch.bfloat16)
    q = torch.randn(1, 16, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="num_splits"):
        ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, backend="cuda", num_splits=0)
    from mpskern import cuda_backend

    with pytest.raises(ValueError, match="head_dim"):
        cuda_backend.extension().decode_attention_info(dtype=1, head_dim=96, heads_per_chunk=8, page_size=16)
