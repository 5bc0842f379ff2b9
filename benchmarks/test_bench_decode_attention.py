"""Paged decode attention: KV bytes read per second, % of the measured copy bandwidth, and the ratio to the
torch backend's vendor kernel (SDPA, default dispatch, over the same KV laid out contiguously) on the same
shape in the same run. Page size 16, bf16.

The time is the median over rounds of CUDA-event time per call: 20 back-to-back calls captured in one CUDA
graph and replayed each round (as an engine replays its decode step), so host-side launch cost is not
counted for either side. Two full sets of buffers alternate; each set's KV is >= 128 MB, several times the
50 MB L2, so no call runs from cache.
"""
from __future__ import annotations

import statistics

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mpskern import ops
from mpskern.models import get_model
from mpskern.paged_kv import contiguous_decode_inputs, decode_inputs
from mpskern.reference import sdpa_decode_contiguous
from mpskern.timing import rotating, time_per_call_ms

MODELS = ["Qwen2.5-0.5B", "Qwen2.5-3B", "Qwen2.5-7B"]
POINTS = [(1024, 512), (256, 2048), (64, 8192), (8, 32768)]
BACKENDS = ["cuda", "triton"]
SETS = 2
CALLS = 20


def kv_bytes(model, batch, ctx) -> int:
    return batch * ctx * model.kv_bytes_per_token_per_layer(2)


def paged_sets(model, batch, ctx):
    return [decode_inputs(batch, ctx, model.heads, model.kv_heads, model.head_dim, seed=i) for i in range(SETS)]


def sdpa_baselines(model, batch, ctx) -> dict:
    """Per-call ms of SDPA over contiguous [B, KVH, ctx, D] KV: default dispatch, plus flash and cuDNN."""
    sets = [contiguous_decode_inputs(batch, ctx, model.heads, model.kv_heads, model.head_dim, seed=100 + i)
            for i in range(SETS)]
    fns = [lambda s=s: sdpa_decode_contiguous(*s) for s in sets]
    res = {"sdpa_default_ms": statistics.median(time_per_call_ms(rotating(fns), calls=CALLS))}
    for name, backend in (("sdpa_flash_ms", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn_ms", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                res[name] = statistics.median(time_per_call_ms(rotating(fns), calls=CALLS))
        except RuntimeError:  # backend not available for this shape / build
            res[name] = None
    del sets, fns
    torch.cuda.empty_cache()
    return res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,ctx", POINTS, ids=[f"B{b}-ctx{c}" for b, c in POINTS])
@pytest.mark.parametrize("model_name", MODELS)
def test_decode_attention(benchmark, ceilings, baseline_cache, model_name, batch, ctx, backend):
    model = get_model(model_name)
    key = (model_name, batch, ctx)
    if key not in baseline_cache:
        baseline_cache[key] = sdpa_baselines(model, batch, ctx)
    base = baseline_cache[key]

    sets = paged_sets(model, batch, ctx)
    fns = [lambda s=s: ops.decode_attention(s[0], s[1].k_cache, s[1].v_cache, s[1].block_table, s[1].seq_lens,
                                            out=s[2], backend=backend) for s in sets]
    run = rotating(fns)
    per_call = []

    def timed_round():
        per_call.extend(time_per_call_ms(run, calls=CALLS, rounds=3, warmup=0))

    run()  # compile / set up outside the timed rounds
    benchmark.pedantic(timed_round, rounds=6, iterations=1, warmup_rounds=1)

    ms = statistics.median(per_call[3:])  # drop the warm-up round
    nbytes = kv_bytes(model, batch, ctx)
    gbs = nbytes / (ms * 1e-3) / 1e9
    benchmark.extra_info.update({
        "kernel": "decode_attention", "backend": backend, "model": model_name, "batch": batch, "context": ctx,
        "page_size": 16, "dtype": "bfloat16", "kv_bytes": nbytes, "time_ms": ms, "kv_gbs": gbs,
        "copy_gbs": ceilings["copy_gbs"], "pct_of_copy_bw": 100 * gbs / ceilings["copy_gbs"],
        "torch_ms": base["sdpa_default_ms"], "speedup_vs_torch": base["sdpa_default_ms"] / ms,
        "sdpa_flash_ms": base["sdpa_flash_ms"], "sdpa_cudnn_ms": base["sdpa_cudnn_ms"],
        "device": ceilings["device"]["name"],
    })
    del sets, fns
    torch.cuda.empty_cache()
