"""CPU tests of the small layer ops: the fused Triton kernels under TRITON_INTERPRET=1 (fp16: the interpreter
computes bf16 wrongly), the unfused torch backends, the MLP ops' torch backend, and input validation.
References are computed in fp64 from the definitions."""
from __future__ import annotations


import pytest
import torch

from mpskern import ops
from mpskern.reference import gate_up_act_fp64, rmsnorm_fp64, rope_fp64



pytestmark = pytest.mark.interpreter


SMALL_BACKENDS = ["triton", "torch"]


TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


# -- RMSNorm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SMALL_BACKENDS)
@pytest.mark.parametrize("tokens,hidden", [(1, 896), (97, 1000), (5, 97), (3, 2560)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(backend, tokens, hidden, with_residual):
    torch.manual_seed(tokens * hidden)
    dt = torch.float16
    x = torch.randn(tokens, hidden, dtype=dt) * 3
    w = torch.randn(hidden, dtype=dt)
    residual = torch.randn(tokens, hidden, dtype=dt) if with_residual else None
    res_in = residual.clone() if with_residual else None
    out = torch.full((tokens, hidden), float("nan"), dtype=dt)
    got = ops.rmsnorm(x, w, 1e-6, residual=residual, out=out, backend=backend)
    assert got is out
    ref = rmsnorm_fp64(x, w, 1e-6, res_in)
    torch.testing.assert_close(got.double(), ref, **TOL[dt])
    if with_residual:  # residual += x, rounded to fp16
        torch.testing.assert_close(residual, (x.float() + res_in.float()).half(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", SMALL_BACKENDS)
def test_rmsnorm_strided_and_in_place(backend):
    """x may be a row-strided view, and out may alias x (engines normalise in place)."""
    torch.manual_seed(1)
    base = torch.randn(7, 300, dtype=torch.float16)
    x = base[:, 10:266]  # row stride 300, last dim contiguous
    w = torch.randn(256, dtype=torch.float16)
    ref = rmsnorm_fp64(x, w, 1e-5)
    got = ops.rmsnorm(x, w, 1e-5, backend=backend)
    torch.testing.assert_close(got.double(), ref, **TOL[torch.float16])
    y = torch.randn(4, 128, dtype=torch.float16)
    ref = rmsnorm_fp64(y, w[:128], 1e-6)
    ops.rmsnorm(y, w[:128].contiguous(), out=y, backend=backend)
    torch.testing.assert_close(y.double(), ref, **TOL[torch.float16])


def test_rmsnorm_fusion_levels_agree():
    torch.manual_seed(2)
    x = torch.randn(33, 896, dtype=torch.float16)
    w = torch.randn(896, dtype=torch.float16)
    r = torch.randn(33, 896, dtype=torch.float16)
    r1, r2 = r.clone(), r.clone()
    a = ops.rmsnorm(x, w, residual=r1, backend="triton")
    b = ops.rmsnorm(x, w, residual=r2, backend="torch")
    assert torch.equal(r1, r2)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_rmsnorm_validation():
    x = torch.randn(4, 64, dtype=torch.float16)
    w = torch.randn(64, dtype=torch.float16)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.rmsnorm(x.numpy(), w, backend="torch")
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.rmsnorm(x.float(), w.float(), backend="torch")
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.rmsnorm(x, w.bfloat16(), backend="torch")
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rmsnorm(x, w[:32], backend="torch")
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.rmsnorm(x.view(2, 2, 64), w, backend="torch")
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.rmsnorm(x, w, residual=torch.randn(3, 64, dtype=torch.float16), backend="torch")
    with pytest.raises(ValueError, match="out must have shape"):
        ops.rmsnorm(x, w, out=torch.empty(4, 63, dtype=torch.float16), backend="torch")
    with pytest.raises(ValueError, match="eps"):
        ops.rmsnorm(x, w, 0.0, backend="torch")
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        ops.rmsnorm(torch.randn(64, 4, dtype=torch.float16).t(), w, backend="torch")
    with pytest.raises(NotImplementedError, match="no 'cuda' backend"):
        ops.rmsnorm(x, w, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.rmsnorm(x, w, backend="bogus")


# -- rotary embedding + KV-cache append ----------------------------------------------------------------


def _rope_case(t, h, kvh, d, page_size, num_pages, seed, pos_dtype=torch.int64, cs_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g).half()  # a fused qkv buffer: q, k, v are views
    max_pos = 2048
    positions = torch.randint(0, max_pos, (t,), generator=g).to(pos_dtype)
    slots = torch.randperm(num_pages * page_size, generator=g)[:t].to(torch.int32)
    cos_sin = ops.rope_cos_sin_cache(max_pos, d, dtype=cs_dtype)
    return qkv, positions, slots, cos_sin


def _views(qkv, h, kvh, d):
    t = qkv.shape[0]
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d:(h + kvh) * d].view(t, kvh, d)
    v = qkv[:, (h + kvh) * d:].view(t, kvh, d)
    return q, k, v


@pytest.mark.parametrize("backend", SMALL_BACKENDS)
@pytest.mark.parametrize(
    "t,h,kvh,d,page_size",
    [(1, 14, 2, 64, 16), (97, 12, 2, 128, 16), (5, 8, 4, 256, 1), (33, 16, 16, 64, 32), (3, 7, 1, 80, 8)],
)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rope_kv_append(backend, t, h, kvh, d, page_size, pos_dtype):
    num_pages = (t + page_size - 1) // page_size + 3
    qkv, positions, slots, cos_sin = _rope_case(t, h, kvh, d, page_size, num_pages, t + d, pos_dtype)
    q, k, v = _views(qkv, h, kvh, d)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    # Poisoned caches: every slot the op must write is checked, and every other slot must stay NaN.
    k_cache = torch.full((num_pages, page_size, kvh, d), float("nan"), dtype=torch.float16)
    v_cache = torch.full_like(k_cache, float("nan"))
    ops.rope_kv_append(q, k, v, positions, cos_sin, k_cache, v_cache, slots, backend=backend)
    tol = TOL[torch.float16]
    q_ref, k_ref = rope_fp64(q0, positions, cos_sin), rope_fp64(k0, positions, cos_sin)
    torch.testing.assert_close(q.double(), q_ref, **tol)
    torch.testing.assert_close(k.double(), k_ref, **tol)
    assert torch.equal(v, v0)
    flat_k = k_cache.view(-1, kvh, d)
    flat_v = v_cache.view(-1, kvh, d)
    torch.testing.assert_close(flat_k[slots.long()].double(), k_ref, **tol)
    assert torch.equal(flat_v[slots.long()], v0)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots.long()] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


@pytest.mark.parametrize("backend", SMALL_BACKENDS)
def test_rope_fp16_cos_sin_cache(backend):
    t, h, kvh, d = 9, 14, 2, 64
    qkv, positions, slots, cos_sin = _rope_case(t, h, kvh, d, 16, 2, 3, cs_dtype=torch.float16)
    q, k, v = _views(qkv, h, kvh, d)
    q0 = q.clone()
    kc = torch.zeros(2, 16, kvh, d, dtype=torch.float16)
    ops.rope_kv_append(q, k, v, positions, cos_sin, kc, torch.zeros_like(kc), slots, backend=backend)
    torch.testing.assert_close(q.double(), rope_fp64(q0, positions, cos_sin), **TOL[torch.float16])


def test_rope_fusion_levels_agree():
    t, h, kvh, d = 17, 14, 2, 64
    qkv, positions, slots, cos_sin = _rope_case(t, h, kvh, d, 16, 4, 7)
    results = []
    for backend in ("triton", "torch"):
        buf = qkv.clone()
        kc = torch.zeros(4, 16, kvh, d, dtype=torch.float16)
        vc = torch.zeros_like(kc)
        ops.rope_kv_append(*_views(buf, h, kvh, d), positions, cos_sin, kc, vc, slots, backend=backend)
        results.append((buf, kc, vc))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_rope_validation():
    t, h, kvh, d = 4, 4, 2, 64
    qkv, positions, slots, cos_sin = _rope_case(t, h, kvh, d, 16, 2, 0)
    q, k, v = _views(qkv, h, kvh, d)
    kc = torch.zeros(2, 16, kvh, d, dtype=torch.float16)
    vc = torch.zeros_like(kc)

    def call(**kw):
        args = dict(q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin, k_cache=kc, v_cache=vc,
                    slot_mapping=slots)
        args.update(kw)
        ops.rope_kv_append(**args, backend="torch")

    with pytest.raises(TypeError, match="slot_mapping must have dtype int32"):
        call(slot_mapping=slots.long())
    with pytest.raises(TypeError, match="positions must have dtype"):
        call(positions=positions.float())
    with pytest.raises(TypeError, match="k must have dtype"):
        call(k=k.float())
    with pytest.raises(TypeError, match="q must have dtype"):
        call(q=q.float())
    with pytest.raises(ValueError, match="GQA ratio"):
        call(q=torch.randn(t, 3, d, dtype=torch.float16))
    with pytest.raises(ValueError, match="head_dim must be even"):
        call(q=q[..., :63], k=k[..., :63], v=v[..., :63])
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        call(cos_sin_cache=cos_sin[:, :32].contiguous())
    with pytest.raises(ValueError, match="k_cache must be"):
        call(k_cache=torch.zeros(2, 16, 1, d, dtype=torch.float16))
    with pytest.raises(ValueError, match="v_cache must have shape"):
        call(v_cache=torch.zeros(3, 16, kvh, d, dtype=torch.float16))
    with pytest.raises(ValueError, match="page_size"):
        call(k_cache=torch.zeros(2, 12, kvh, d, dtype=torch.float16),
             v_cache=torch.zeros(2, 12, kvh, d, dtype=torch.float16))
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        call(slot_mapping=slots[:2])
    with pytest.raises(ValueError, match="v must have shape"):
        call(v=v[:2])
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(k_cache=torch.zeros(2, 16, kvh, 2 * d, dtype=torch.float16)[..., :d])
    with pytest.raises(ValueError, match="q must be contiguous in its last dimension"):
        call(q=torch.randn(t, d, h, dtype=torch.float16).transpose(1, 2))
    with pytest.raises(NotImplementedError):
        ops.rope_kv_append(q, k, v, positions, cos_sin, kc, vc, slots, backend="cuda")


# -- MLP ops (torch backend) ---------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("tokens,hidden,inter", [(1, 64, 96), (37, 96, 160), (5, 33, 17)])
def test_mlp_ops_torch(dt, act, tokens, hidden, inter):
    torch.manual_seed(tokens + inter)
    x = torch.randn(tokens, hidden).to(dt)
    w_gu = (torch.randn(2 * inter, hidden) * hidden**-0.5).to(dt)
    w_d = (torch.randn(hidden, inter) * inter**-0.5).to(dt)
    tol = TOL[dt]
    mid_ref = gate_up_act_fp64(x, w_gu, act)
    out = torch.full((tokens, inter), float("nan"), dtype=dt)
    mid = ops.gate_up_act(x, w_gu, act, out=out)
    assert mid is out
    torch.testing.assert_close(mid.double(), mid_ref, **tol)
    lin = ops.linear(x, w_gu)
    torch.testing.assert_close(lin.double(), x.double() @ w_gu.double().t(), **tol)
    y_ref = mid_ref @ w_d.double().t()
    y_out = torch.full((tokens, hidden), float("nan"), dtype=dt)
    y = ops.mlp(x, w_gu, w_d, act, out=y_out)
    assert y is y_out
    torch.testing.assert_close(y.double(), y_ref, **tol)


def test_mlp_validation():
    x = torch.randn(4, 64, dtype=torch.float16)
    w_gu = torch.randn(96, 64, dtype=torch.float16)
    w_d = torch.randn(64, 48, dtype=torch.float16)
    with pytest.raises(ValueError, match="act must be one of"):
        ops.gate_up_act(x, w_gu, "relu")
    with pytest.raises(ValueError, match="even number of rows"):
        ops.gate_up_act(x, w_gu[:95], "silu")
    with pytest.raises(ValueError, match="w_gate_up must be"):
        ops.gate_up_act(x, w_gu[:, :32].contiguous(), "silu")
    with pytest.raises(TypeError, match="w_gate_up must have dtype"):
        ops.gate_up_act(x, w_gu.bfloat16(), "silu")
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.linear(x.float(), w_gu.float())
    with pytest.raises(ValueError, match="w must be contiguous"):
        ops.linear(x, torch.randn(64, 96, dtype=torch.float16).t())
    with pytest.raises(ValueError, match="out must have shape"):
        ops.linear(x, w_gu, out=torch.empty(4, 95, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.linear(x, w_gu, out=torch.empty(4, 192, dtype=torch.float16)[:, :96])
    with pytest.raises(ValueError, match="w_down must have shape"):
        ops.mlp(x, w_gu, w_d[:, :47].contiguous(), "silu")
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.mlp(x.view(2, 2, 64), w_gu, w_d, "silu")
    for backend in ("triton", "cuda"):  # the custom GEMMs come in a later issue
        with pytest.raises(NotImplementedError):
            ops.gate_up_act(x, w_gu, "silu", backend=backend)
        with pytest.raises(NotImplementedError):
            ops.mlp(x, w_gu, w_d, "silu", backend=backend)
