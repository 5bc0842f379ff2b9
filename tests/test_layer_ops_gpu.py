"""GPU tests of the small layer ops (fused Triton kernels and unfused torch paths) and the MLP ops' torch
backend: bf16 and fp16 against fp64 references, poisoned outputs, odd sizes, and CUDA-graph capture."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from mpskern import ops
from mpskern.reference import gate_up_act_fp64, rmsnorm_fp64, rope_fp64

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SMALL_BACKENDS = ["triton", "torch"]



def capture(fn):
    """Warm up on a side stream (Triton compile, cuBLAS handles), then capture ``fn`` in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# -- RMSNorm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", SMALL_BACKENDS)
@pytest.mark.parametrize("tokens,hidden", [(1, 896), (64, 1536), (97, 5120), (1025, 2560), (3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(dtype, backend, tokens, hidden, with_residual):
    torch.manual_seed(tokens + hidden)
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype) * 2
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    residual = torch.randn(tokens, hidden, device="cuda", dtype=dtype) if with_residual else None
    res0 = residual.clone() if with_residual else None
    out = torch.full_like(x, float("nan"))
    ops.rmsnorm(x, w, 1e-6, residual=residual, out=out, backend=backend)
    torch.testing.assert_close(out.double(), rmsnorm_fp64(x, w, 1e-6, res0), **TOL[dtype])
    if with_residual:
        torch.testing.assert_close(residual, (x.float() + res0.float()).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", SMALL_BACKENDS)
def test_rmsnorm_graph(dtype, backend):
    torch.manual_seed(5)
    x = torch.randn(64, 896, device="cuda", dtype=dtype)
    w = torch.randn(896, device="cuda", dtype=dtype)
    res0 = torch.randn_like(x)
    residual, out = res0.clone(), torch.empty_like(x)
    graph = capture(lambda: ops.rmsnorm(x, w, 1e-6, residual=residual, out=out, backend=backend))
    for seed in range(2):  # new inputs in the captured buffers each replay
        torch.manual_seed(10 + seed)
        x.copy_(torch.randn_like(x))
        residual.copy_(res0)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.double(), rmsnorm_fp64(x, w, 1e-6, res0), **TOL[dtype])


# -- rotary embedding + KV-cache append ----------------------------------------------------------------

ROPE_SHAPES = [(14, 2, 64), (12, 2, 128), (28, 4, 128), (8, 4, 256), (40, 8, 128), (32, 8, 64)]


def rope_case(t, h, kvh, d, page_size, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(t, (h + 2 * kvh) * d, device="cuda", dtype=dtype, generator=g)
    num_pages = (t + page_size - 1) // page_size + 5
    positions = torch.randint(0, 4096, (t,), device="cuda", generator=g)
    slots = torch.randperm(num_pages * page_size, device="cuda", generator=g)[:t].to(torch.int32)
    k_cache = torch.full((num_pages, page_size, kvh, d), float("nan"), device="cuda", dtype=dtype)
    return qkv, positions, slots, k_cache, torch.full_like(k_cache, float("nan"))


def views(qkv, h, kvh, d):
    t = qkv.shape[0]
    return (qkv[:, : h * d].view(t, h, d), qkv[:, h * d:(h + kvh) * d].view(t, kvh, d),
            qkv[:, (h + kvh) * d:].view(t, kvh, d))


def check_rope(qkv0, qkv, positions, cs, slots, k_cache, v_cache, h, kvh, d, dtype):
    q0, k0, v0 = views(qkv0, h, kvh, d)
    q, k, v = views(qkv, h, kvh, d)
    k_ref = rope_fp64(k0, positions, cs)
    torch.testing.assert_close(q.double(), rope_fp64(q0, positions, cs), **TOL[dtype])
    torch.testing.assert_close(k.double(), k_ref, **TOL[dtype])
    assert torch.equal(v, v0)
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    torch.testing.assert_close(flat_k[slots.long()].double(), k_ref, **TOL[dtype])
    assert torch.equal(flat_v[slots.long()], v0)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device="cuda")
    untouched[slots.long()] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", SMALL_BACKENDS)
@pytest.mark.parametrize("hkd", ROPE_SHAPES, ids=lambda s: f"h{s[0]}-kv{s[1]}-d{s[2]}")
@pytest.mark.parametrize("t,page_size", [(1, 16), (97, 16), (1025, 1), (300, 256)])
def test_rope_kv_append(dtype, backend, hkd, t, page_size):
    h, kvh, d = hkd
    qkv, positions, slots, k_cache, v_cache = rope_case(t, h, kvh, d, page_size, dtype, t + d)
    cs = ops.rope_cos_sin_cache(4096, d, theta=1e6, device="cuda")
    qkv0 = qkv.clone()
    ops.rope_kv_append(*views(qkv, h, kvh, d), positions, cs, k_cache, v_cache, slots, backend=backend)
    check_rope(qkv0, qkv, positions, cs, slots, k_cache, v_cache, h, kvh, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", SMALL_BACKENDS)
def test_rope_kv_append_graph(dtype, backend):
    h, kvh, d, t = 14, 2, 64, 64
    qkv, positions, slots, k_cache, v_cache = rope_case(t, h, kvh, d, 16, dtype, 1)
    cs = ops.rope_cos_sin_cache(4096, d, theta=1e6, device="cuda")
    graph = capture(lambda: ops.rope_kv_append(*views(qkv, h, kvh, d), positions, cs, k_cache, v_cache, slots,
                                               backend=backend))
    for seed in range(2):
        torch.manual_seed(20 + seed)
        qkv.copy_(torch.randn_like(qkv))
        qkv0 = qkv.clone()
        positions.copy_(torch.randint(0, 4096, (t,), device="cuda"))
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_rope(qkv0, qkv, positions, cs, slots, k_cache, v_cache, h, kvh, d, dtype)


def test_fusion_levels_agree():
    """Fused and unfused small ops compute the same function (to rounding)."""
    torch.manual_seed(7)
    x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    r1, r2 = r.clone(), r.clone()
    a = ops.rmsnorm(x, w, residual=r1, backend="triton")
    b = ops.rmsnorm(x, w, residual=r2, backend="torch")
    assert torch.equal(r1, r2)
    assert rel_err(a, b) < 5e-3
    h, kvh, d = 16, 2, 128
    qkv, positions, slots, kc, vc = rope_case(256, h, kvh, d, 16, torch.bfloat16, 3)
    cs = ops.rope_cos_sin_cache(4096, d, theta=1e6, device="cuda")
    outs = []
    for backend in SMALL_BACKENDS:
        buf, kc_b, vc_b = qkv.clone(), kc.clone(), vc.clone()
        ops.rope_kv_append(*views(buf, h, kvh, d), positions, cs, kc_b, vc_b, slots, backend=backend)
        outs.append((buf, kc_b.nan_to_num(0.0), vc_b.nan_to_num(0.0)))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 5e-3


# -- MLP ops (torch backend) ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("tokens,hidden,inter", [(1, 896, 4864), (97, 1536, 8960), (256, 2560, 10240)])
def test_mlp_ops(dtype, act, tokens, hidden, inter):
    torch.manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    w_gu = (torch.randn(2 * inter, hidden, device="cuda") * hidden**-0.5).to(dtype)
    w_d = (torch.randn(hidden, inter, device="cuda") * inter**-0.5).to(dtype)
    mid = torch.full((tokens, inter), float("nan"), device="cuda", dtype=dtype)
    ops.gate_up_act(x, w_gu, act, out=mid)
    mid_ref = gate_up_act_fp64(x, w_gu, act)
    assert rel_err(mid, mid_ref) < 1e-2
    assert rel_err(ops.linear(x, w_gu), x.double() @ w_gu.double().t()) < 1e-2
    y = torch.full_like(x, float("nan"))
    ops.mlp(x, w_gu, w_d, act, out=y)
    assert rel_err(y, mid_ref @ w_d.double().t()) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_ops_graph(dtype):
    torch.manual_seed(9)
    x = torch.randn(64, 896, device="cuda", dtype=dtype)
    w_gu = (torch.randn(2 * 4864, 896, device="cuda") * 896**-0.5).to(dtype)
    w_d = (torch.randn(896, 4864, device="cuda") * 4864**-0.5).to(dtype)
    mid = torch.empty(64, 4864, device="cuda", dtype=dtype)
    lin = torch.empty(64, 2 * 4864, device="cuda", dtype=dtype)
    y = torch.empty_like(x)

    def run():
        ops.gate_up_act(x, w_gu, "silu", out=mid)
        ops.linear(x, w_gu, out=lin)
        ops.mlp(x, w_gu, w_d, "silu", out=y)

    graph = capture(run)
    x.copy_(torch.randn_like(x))
    for t in (mid, lin, y):
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    mid_ref = gate_up_act_fp64(x, w_gu, "silu")
    assert rel_err(mid, mid_ref) < 1e-2
    assert rel_err(lin, x.double() @ w_gu.double().t()) < 1e-2
    assert rel_err(y, mid_ref @ w_d.double().t()) < 1e-2


def test_cpu_tensors_rejected_by_triton():
    x = torch.randn(4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.rmsnorm(x, torch.randn(64, dtype=torch.float16), backend="triton")
