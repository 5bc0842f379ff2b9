"""CPU tests of workloads: byte/FLOP counts against hand-computed numbers, layer-count selection, validate()
errors, and tiny streams built and stepped on the CPU (checked against an fp64 decoder layer)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mpskern import checks
from mpskern.models import PRESETS, custom_model
from mpskern.reference import decode_attention_dense, rmsnorm_fp64, rope_fp64
from mpskern.workloads import DEFAULT_L2_BYTES, KERNELS, PHASES, WorkloadConfig, build_stream, plan, validate



@pytest.fixture
def interpreted():
    """Tests that step fused streams on the CPU need the Triton interpreter (on by default without a GPU)."""
    if not checks.triton_interpreting():
        pytest.skip("needs the Triton CPU interpreter (TRITON_INTERPRET=1)")


MiB = 2**20
L2 = 50 * MiB
BIG = 200.0  # GiB: a budget that keeps every model's own layer count in the count tests


def _ops(p):
    return {o.name: (o.bytes, o.flops) for o in p.ops}


# -- bytes and FLOPs, by hand ----------------------------------------------------------------------------
# Qwen2.5-0.5B: hidden 896, intermediate 4864, heads 14/2, head_dim 64 -> q 896, kv 128, qkv 1152; bf16 (2 B).


def test_counts_qwen05b_decode():
    cfg = dict(model="Qwen2.5-0.5B", phase="decode", batch=64, context=512, memory_budget_gb=BIG)
    attn = plan(WorkloadConfig(kernel="attn", **cfg))
    # q in + out: 2 * 64 tok * 896 * 2 B; K and V: 2 * 64 seq * 512 tok * 128 * 2 B
    assert attn.bytes_per_layer == 2 * 64 * 896 * 2 + 2 * 64 * 512 * 128 * 2 == 17_006_592
    assert attn.flops_per_layer == 4 * 64 * 14 * 512 * 64 == 117_440_512  # QK + PV
    assert attn.layers == 24 and attn.layers_reason == "model"
    assert attn.bytes_per_step == 24 * 17_006_592 and attn.flops_per_step == 24 * 117_440_512
    assert attn.tokens_per_step == 64

    mlp = plan(WorkloadConfig(kernel="mlp", **cfg))
    gate_up = 2 * 4864 * 896 * 2 + 64 * 896 * 2 + 64 * 4864 * 2  # weights, x in, [T, I] out
    down = 4864 * 896 * 2 + 64 * 4864 * 2 + 64 * 896 * 2
    assert _ops(mlp) == {"gate_up_act": (gate_up, 4 * 64 * 896 * 4864), "down_proj": (down, 2 * 64 * 4864 * 896)}
    assert mlp.bytes_per_layer == 27_623_424
    assert mlp.flops_per_layer == 1_673_527_296

    layer = plan(WorkloadConfig(kernel="layer", **cfg))
    norm = (4 * 64 * 896 + 896) * 2
    assert _ops(layer) == {
        "input_norm": (norm, 0),
        "qkv_proj": ((1152 * 896 + 64 * 896 + 64 * 1152) * 2, 2 * 64 * 896 * 1152),
        "rope_kv_append": ((2 * 64 * (896 + 128) + 64 * 128 + 2 * 64 * 128) * 2, 0),
        "decode_attention": (17_006_592, 117_440_512),
        "o_proj": ((896 * 896 + 64 * 896 + 64 * 896) * 2, 2 * 64 * 896 * 896),
        "post_attn_norm": (norm, 0),
        "gate_up_act": (gate_up, 4 * 64 * 896 * 4864),
        "down_proj": (down, 2 * 64 * 4864 * 896),
    }
    assert [o.name for o in layer.ops][:4] == ["input_norm", "qkv_proj", "rope_kv_append", "decode_attention"]
    assert layer.bytes_per_layer == 50_023_936
    assert layer.flops_per_layer == 2_025_848_832


def test_counts_qwen05b_prefill():
    cfg = dict(model="Qwen2.5-0.5B", phase="prefill", batch=4, context=100, memory_budget_gb=BIG)
    attn = plan(WorkloadConfig(kernel="attn", **cfg))
    assert attn.tokens_per_step == 400
    assert _ops(attn) == {"prefill_attention": ((400 * 1152 + 400 * 896) * 2, 2 * 4 * 100**2 * 14 * 64)}
    assert attn.bytes_per_layer == 1_638_400 and attn.flops_per_layer == 71_680_000
    mlp = plan(WorkloadConfig(kernel="mlp", **cfg))
    assert mlp.bytes_per_layer == 3 * 4864 * 896 * 2 + 2 * (400 * 896 + 400 * 4864) * 2 == 35_364_864
    assert mlp.flops_per_layer == 6 * 400 * 896 * 4864 == 10_459_545_600


# Qwen2.5-7B: hidden 3584, intermediate 18944, heads 28/4, head_dim 128 -> q 3584, kv 512, qkv 4608.


def test_counts_qwen7b_decode_layer():
    cfg = WorkloadConfig(model="Qwen2.5-7B", phase="decode", kernel="layer", batch=32, context=1000,
                         memory_budget_gb=BIG)
    p = plan(cfg)
    ops = _ops(p)
    assert ops["decode_attention"] == (2 * 32 * 3584 * 2 + 2 * 32 * 1000 * 512 * 2, 4 * 32 * 28 * 1000 * 128)
    assert ops["qkv_proj"] == (33_554_432, 1_056_964_608)
    assert ops["rope_kv_append"] == (622_592, 0)
    assert ops["o_proj"] == (26_148_864, 822_083_584)
    assert ops["input_norm"] == ops["post_attn_norm"] == (924_672, 0)
    assert ops["gate_up_act"][0] + ops["down_proj"][0] == 410_255_360
    assert p.bytes_per_layer == 538_425_344
    assert p.flops_per_layer == 15_373_697_024
    assert p.layers == 28 and p.bytes_per_step == 28 * 538_425_344
    assert p.pages_per_seq == math.ceil(1000 / 16)


def test_counts_qwen7b_prefill():
    cfg = dict(model="Qwen2.5-7B", phase="prefill", batch=2, context=300, memory_budget_gb=BIG)
    layer = plan(WorkloadConfig(kernel="layer", **cfg))
    assert layer.tokens_per_step == 600
    assert _ops(layer)["prefill_attention"] == (9_830_400, 2 * 2 * 300**2 * 28 * 128)
    assert layer.bytes_per_layer == 594_515_968
    assert layer.flops_per_layer == 280_945_459_200
    attn = plan(WorkloadConfig(kernel="attn", **cfg))
    assert attn.flops_per_layer == 1_290_240_000  # 2*2*S^2*D*H/2 per sequence, as in ANCHORS.md
    mlp = plan(WorkloadConfig(kernel="mlp", **cfg))
    assert mlp.flops_per_layer == 6 * 600 * 3584 * 18944


def test_counts_gemma_and_fp16():
    """GeGLU counts like SwiGLU; fp16 moves as many bytes as bf16."""
    cfg = WorkloadConfig(model="Gemma-3-4B", phase="decode", kernel="mlp", batch=64, context=512,
                         memory_budget_gb=BIG)
    p = plan(cfg)
    assert p.bytes_per_layer == 3 * 10240 * 2560 * 2 + 2 * (64 * 2560 + 64 * 10240) * 2
    assert plan(WorkloadConfig(**{**cfg.__dict__, "dtype": "float16"})).bytes_per_layer == p.bytes_per_layer


# -- layer-count selection --------------------------------------------------------------------------------


def test_layers_raised_for_l2():
    # 0.5B decode attn, 16 x 128: own K/V per layer 2*16*128*128*2 = 1 MiB; shared q + out 2*16*896*2 B.
    cfg = WorkloadConfig(model="Qwen2.5-0.5B", phase="decode", kernel="attn", batch=16, context=128)
    p = plan(cfg, L2)
    assert p.min_layers == math.ceil((4 * L2 - 2 * 16 * 896 * 2) / (2 * 16 * 128 * 128 * 2)) == 200
    assert p.layers == 200 and p.layers_reason == "l2"
    assert p.working_set_bytes == 200 * MiB + 2 * 16 * 896 * 2 >= 4 * L2
    assert plan(cfg, 0).layers == 24 and plan(cfg, 0).min_layers == 1  # no L2 rule
    with pytest.raises(ValueError, match="at least 200 layers"):
        plan(WorkloadConfig(**{**cfg.__dict__, "layers": 24}), L2)
    assert plan(WorkloadConfig(**{**cfg.__dict__, "layers": 250}), L2).layers_reason == "explicit"


def test_layers_reduced_for_memory():
    # 0.5B decode attn, 1024 x 8192: one layer's K/V pages are 2*1024*8192*128*2 B = 4 GiB, and the torch
    # path's gather needs as much again: 20 GiB holds 3 layers.
    cfg = WorkloadConfig(model="Qwen2.5-0.5B", phase="decode", kernel="attn", batch=1024, context=8192)
    p = plan(cfg, L2)
    assert p.layers == p.max_layers == 3 and p.layers_reason == "memory"
    assert p.memory_bytes <= 20 * 2**30 < p.memory_bytes + 4 * 2**30
    assert p.working_set_bytes >= 4 * L2
    with pytest.raises(ValueError, match="over the memory budget"):
        plan(WorkloadConfig(**{**cfg.__dict__, "layers": 4}), L2)
    with pytest.raises(ValueError, match="one layer needs"):
        plan(WorkloadConfig(**{**cfg.__dict__, "memory_budget_gb": 4.0}), L2)


def test_l2_minimum_beyond_memory_budget():
    cfg = WorkloadConfig(model="Qwen2.5-0.5B", phase="decode", kernel="attn", batch=16, context=128,
                         memory_budget_gb=0.1)
    with pytest.raises(ValueError, match="memory budget"):
        validate(cfg)


@pytest.mark.parametrize("model", list(PRESETS))
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_plan_invariants(model, phase, kernel):
    for batch, context in ((64, 512), (256, 2048), (1, 128)):
        cfg = WorkloadConfig(model=model, phase=phase, kernel=kernel, batch=batch, context=context)
        try:
            p = plan(cfg)
        except ValueError as exc:
            assert "memory budget" in str(exc)
            continue
        assert p.working_set_bytes >= 4 * DEFAULT_L2_BYTES
        assert p.memory_bytes <= 20 * 2**30
        assert p.min_layers <= p.layers <= p.max_layers
        assert p.bytes_per_step == p.layers * sum(o.bytes for o in p.ops) > 0
        assert p.flops_per_step == p.layers * sum(o.flops for o in p.ops) > 0
        if p.layers_reason == "model":
            assert p.layers == PRESETS[model].layers
        json.dumps(p.as_dict())


# -- validate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("model", "Qwen9-1T", "unknown model"),
    ("phase", "train", "unknown phase"),
    ("kernel", "moe", "unknown kernel"),
    ("backend", "cutlass", "unknown backend"),
    ("fusion", "half", "unknown fusion"),
    ("dtype", "float32", "unknown dtype"),
    ("batch", 0, "batch must be a positive integer"),
    ("context", -5, "context must be a positive integer"),
    ("context", 2.5, "context must be a positive integer"),
    ("page_size", 12, "page_size must be a power of two"),
    ("layers", 0, "layers must be a positive integer"),
    ("memory_budget_gb", 0, "memory_budget_gb must be a positive number"),
    ("context", 10**7, "memory budget"),
])
def test_validate_errors(field, value, match):
    with pytest.raises(ValueError, match=match) as info:
        validate(WorkloadConfig(**{field: value}))
    assert "\n" not in str(info.value)


def test_validate_custom_shape_and_host_only():
    bad = custom_model(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=96, layers=4)
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        validate(WorkloadConfig(shape=bad))
    ok = custom_model(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, layers=4)
    validate(WorkloadConfig(shape=ok, kernel="layer"), l2_bytes=0)
    validate(WorkloadConfig(dtype="bf16"))  # aliases
    assert not torch.cuda.is_initialized()


def test_config_round_trip():
    shape = custom_model(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, layers=4, name="tiny")
    cfg = WorkloadConfig(phase="prefill", kernel="layer", layers=3, fusion="unfused")
    assert WorkloadConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg
    custom = WorkloadConfig(shape=shape, kernel="mlp")
    back = WorkloadConfig.from_dict(json.loads(json.dumps(custom.as_dict())))
    assert back.model_shape() == shape and back.kernel == "mlp"
    assert WorkloadConfig(shape=shape).as_dict()["model"] == "tiny"
    with pytest.raises(ValueError, match="unknown workload config keys"):
        WorkloadConfig.from_dict({"modle": "x"})


# -- tiny streams on the CPU ---------------------------------------------------------------------------

TINY = custom_model(hidden=96, intermediate=160, heads=6, kv_heads=2, head_dim=64, layers=2, name="tiny")


def tiny(phase, kernel, **kw):
    base = dict(shape=TINY, phase=phase, kernel=kernel, batch=3, context=37, dtype="float16", page_size=8,
                backend="torch", fusion="unfused")
    base.update(kw)
    return WorkloadConfig(**base)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_tiny_stream_steps(phase, kernel):
    cfg = tiny(phase, kernel)
    s = build_stream(cfg, device="cpu")
    assert s.layers == 2 and s.plan.layers_reason == "model"
    assert s.tokens_per_step == (3 if phase == "decode" else 3 * 37)
    assert s.bytes_per_step == s.plan.bytes_per_step and s.flops_per_step == s.plan.flops_per_step
    assert set(s.op_backends) == {o.name for o in s.plan.ops}
    assert set(s.op_backends.values()) == {"torch"}
    s.step()
    s.step()
    outs = {"attn": ("attn_out",) if phase == "decode" else (), "mlp": ("out", "mlp_mid"),
            "layer": ("h", "residual", "qkv")}[kernel]
    for name in outs:
        assert torch.isfinite(getattr(s, name)).all(), name
    json.dumps(s.as_dict())


def test_stream_buffers_fresh_and_seeded():
    a = build_stream(tiny("decode", "layer"), device="cpu", warmup=False)
    b = build_stream(tiny("decode", "layer"), device="cpu", warmup=False)
    c = build_stream(tiny("decode", "layer"), device="cpu", seed=1, warmup=False)
    la, lb, lc = a._layers, b._layers, c._layers
    assert torch.equal(la[0].k_cache, lb[0].k_cache) and not torch.equal(la[0].k_cache, lc[0].k_cache)
    assert not torch.equal(la[0].k_cache, la[1].k_cache)  # every layer has its own cache and weights
    assert not torch.equal(la[0].w_qkv, la[1].w_qkv)
    assert (la[0].k_cache != 0).float().mean() > 0.99
    assert sorted(a.block_table.flatten().tolist()) == list(range(a.block_table.numel()))  # a permutation
    assert a.block_table.flatten().tolist() != list(range(a.block_table.numel()))  # shuffled


def test_backend_fallback_recorded(interpreted):
    """Ops a backend lacks (or cannot run here) come from torch, and the record says so."""
    s = build_stream(tiny("decode", "layer", backend="cuda", fusion="fused"), device="cpu", warmup=False)
    big = ("qkv_proj", "decode_attention", "o_proj", "gate_up_act", "down_proj")
    assert all(s.op_backends[r] == "torch" for r in big)
    assert all(s.op_backends[r] == "triton" for r in ("input_norm", "rope_kv_append", "post_attn_norm"))
    p = build_stream(tiny("prefill", "attn", backend="cuda"), device="cpu", warmup=False)
    assert p.op_backends == {"prefill_attention": "torch"}


def test_fused_falls_back_to_torch_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = build_stream(tiny("prefill", "layer", backend="triton", fusion="fused"), device="cpu")
    assert set(s.op_backends.values()) == {"torch"}


def ref_layer(s, layer, h, res, tol):
    """One decoder layer of stream ``s`` in fp64 from its own buffers, rounding to the stream's dtype where
    the stream stores a tensor. Checks the KV append on the way (caches are read after the stream's step).
    Returns the layer's output and the new residual. Also used by test_workloads_gpu.py."""
    m, cfg = s.plan.model, s.config
    dt = getattr(torch, cfg.dtype_name)

    def rnd(x):
        return x.to(dt).double()

    res = rnd(res + h)
    qkv = rnd(rnd(rmsnorm_fp64(res, layer.w_input_norm, 1e-6)) @ layer.w_qkv.double().t())
    t = qkv.shape[0]
    q = qkv[:, :m.q_size].reshape(t, m.heads, m.head_dim)
    k = qkv[:, m.q_size:m.q_size + m.kv_size].reshape(t, m.kv_heads, m.head_dim)
    v = qkv[:, m.q_size + m.kv_size:].reshape(t, m.kv_heads, m.head_dim)
    q, k = rnd(rope_fp64(q, s.positions, s.cos_sin_cache)), rnd(rope_fp64(k, s.positions, s.cos_sin_cache))
    flat_k = layer.k_cache.view(-1, m.kv_heads, m.head_dim)
    torch.testing.assert_close(flat_k[s.slot_mapping.long()].double(), k, **tol)
    if cfg.phase == "decode":
        attn = decode_attention_dense(q, layer.k_cache, layer.v_cache, s.block_table, s.seq_lens,
                                      dtype=torch.float64)
    else:
        b, c = cfg.batch, cfg.context

        def heads_first(x):
            return x.reshape(b, c, x.shape[1], m.head_dim).transpose(1, 2)

        attn = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                              enable_gqa=True).transpose(1, 2)
    res = rnd(res + rnd(rnd(attn.reshape(t, m.q_size)) @ layer.w_o.double().t()))
    gu = rnd(rmsnorm_fp64(res, layer.w_post_norm, 1e-6)) @ layer.w_gate_up.double().t()
    gate = gu[:, :m.intermediate]
    act = F.silu(gate) if m.act == "silu" else F.gelu(gate, approximate="tanh")
    mid = rnd(act * gu[:, m.intermediate:])
    return rnd(mid @ layer.w_down.double().t()), res


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fusion", ["unfused", "fused"])
def test_layer_stream_matches_fp64_reference(phase, fusion, interpreted):
    s = build_stream(tiny(phase, "layer", fusion=fusion, layers=1), device="cpu", warmup=False)
    assert s.op_backends["rope_kv_append"] == ("triton" if fusion == "fused" else "torch")
    h0, res0 = s.h.double().clone(), s.residual.double().clone()
    s.step()
    tol = dict(rtol=1e-2, atol=1e-2)
    h_ref, res_ref = ref_layer(s, s._layers[0], h0, res0, tol)
    torch.testing.assert_close(s.residual.double(), res_ref, **tol)
    torch.testing.assert_close(s.h.double(), h_ref, **tol)


def test_decode_layer_appends_at_last_position():
    s = build_stream(tiny("decode", "layer"), device="cpu", warmup=False)
    s.step()
    c, p = s.config.context, s.config.page_size
    assert (s.positions == c - 1).all()
    expect = s.block_table[:, (c - 1) // p].long() * p + (c - 1) % p
    assert torch.equal(s.slot_mapping.long(), expect)
    last = s._layers[-1]
    flat_v = last.v_cache.view(-1, TINY.kv_heads, TINY.head_dim)
    assert torch.equal(flat_v[expect], s.v)  # the qkv buffer holds the last layer's values
