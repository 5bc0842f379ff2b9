"""Paged decode attention: KV bytes read per second, % of the copy and streaming-read ceilings measured in the
same run, and the ratio to the torch backend's vendor kernel (SDPA, default dispatch, over the same KV laid out
contiguously) on the same shape. Page size 16 (pages in shuffled order), bf16.

Each side is 20 back-to-back calls captured in one CUDA graph (as an engine replays its decode step), so host
launch cost is counted for neither. The kernel's graph and SDPA's are replayed alternately, round by round, and
the ratio to torch is the median of the per-round ratios (p10 / p90 kept too): drift of the card during a run
then reaches both sides alike. Two full sets of buffers alternate on each side; each set's KV is >= 128 MB,
several times the 50-60 MB L2, so no call runs from cache.
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
from mpskern.timing import graphed, interleaved_ms, rotating, round_ratios, time_per_call_ms

MODELS = ["Qwen2.5-0.5B", "Qwen2.5-3B", "Qwen2.5-7B"]
POINTS = [(1024, 512), (256, 2048), (64, 8192), (8, 32768)]
BACKENDS = ["cuda", "triton"]
SETS = 2
CALLS = 20
ROUNDS_PER_CALL = 4  # interleaved rounds per benchmark round: 6 x 4 = 24 timed pairs per shape


def kv_bytes(model, batch, ctx) -> int:
    return batch * ctx * model.kv_bytes_per_token_per_layer(2)


def paged_sets(model, batch, ctx):
    return [decode_inputs(batch, ctx, model.heads, model.kv_heads, model.head_dim, seed=i) for i in range(SETS)]


def dense_sets(model, batch, ctx):
    return [contiguous_decode_inputs(batch, ctx, model.heads, model.kv_heads, model.head_dim, seed=100 + i)
            for i in range(SETS)]


def sdpa_backend_ms(model, batch, ctx) -> dict:
    """Per-call ms of SDPA pinned to its flash and cuDNN backends (context for the table; None if unavailable)."""
    fns = [lambda s=s: sdpa_decode_contiguous(*s) for s in dense_sets(model, batch, ctx)]
    res = {}
    for name, backend in (("sdpa_flash_ms", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn_ms", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                res[name] = statistics.median(time_per_call_ms(rotating(fns), calls=CALLS))
        except RuntimeError:  # backend not available for this shape / build
            res[name] = None
    del fns
    torch.cuda.empty_cache()
    return res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,ctx", POINTS, ids=[f"B{b}-ctx{c}" for b, c in POINTS])
@pytest.mark.parametrize("model_name", MODELS)
def test_decode_attention(benchmark, ceilings, baseline_cache, model_name, batch, ctx, backend):
    model = get_model(model_name)
    key = (model_name, batch, ctx)
    if key not in baseline_cache:
        baseline_cache[key] = sdpa_backend_ms(model, batch, ctx)
    base = baseline_cache[key]

    sets, dense = paged_sets(model, batch, ctx), dense_sets(model, batch, ctx)
    kernel = graphed(rotating([lambda s=s: ops.decode_attention(s[0], s[1].k_cache, s[1].v_cache, s[1].block_table,
                                                                s[1].seq_lens, out=s[2], backend=backend)
                               for s in sets]), calls=CALLS)
    sdpa = graphed(rotating([lambda s=s: sdpa_decode_contiguous(*s) for s in dense]), calls=CALLS)
    kernel_ms, torch_ms = [], []

    def timed_round():
        k, t = interleaved_ms([kernel, sdpa], calls=CALLS, rounds=ROUNDS_PER_CALL)
        kernel_ms.extend(k)
        torch_ms.extend(t)

    benchmark.pedantic(timed_round, rounds=6, iterations=1, warmup_rounds=1)

    k, t = kernel_ms[ROUNDS_PER_CALL:], torch_ms[ROUNDS_PER_CALL:]  # drop the warm-up round
    ratios = round_ratios(t, k)  # torch / kernel, round by round
    deciles = statistics.quantiles(ratios, n=10)
    ms = statistics.median(k)
    nbytes = kv_bytes(model, batch, ctx)
    gbs = nbytes / (ms * 1e-3) / 1e9
    benchmark.extra_info.update({
        "kernel": "decode_attention", "backend": backend, "model": model_name, "batch": batch, "context": ctx,
        "page_size": 16, "dtype": "bfloat16", "kv_bytes": nbytes, "time_ms": ms, "kv_gbs": gbs,
        "copy_gbs": ceilings["copy_gbs"], "pct_of_copy_bw": 100 * gbs / ceilings["copy_gbs"],
        "read_gbs": ceilings["read_gbs"], "pct_of_read_bw": 100 * gbs / ceilings["read_gbs"],
        "torch_ms": statistics.median(t), "speedup_vs_torch": statistics.median(ratios),
        "speedup_p10": deciles[0], "speedup_p90": deciles[-1],
        "sdpa_flash_ms": base["sdpa_flash_ms"], "sdpa_cudnn_ms": base["sdpa_cudnn_ms"],
        "device": ceilings["device"]["name"],
    })
    del sets, dense, kernel, sdpa
    torch.cuda.empty_cache()
