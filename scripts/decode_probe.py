"""Where does the paged decode kernel lose time to cuDNN? Time vs KV bytes at several batches, fitted as
fixed µs + bytes / streaming rate, for our kernels and SDPA over contiguous KV, with KV-head interleaving
(KVH 2 vs 1 at equal bytes) and page size (16 vs 128) as the variables.
usage: python scripts/decode_probe.py             (the fits)
       python scripts/decode_probe.py bench [triton] (the benchmark shapes: cuda [and triton] vs SDPA)"""
from __future__ import annotations

import statistics

import torch

import sys

from mpskern import ops
from mpskern.models import get_model
from mpskern.paged_kv import make_paged_kv
from mpskern.reference import sdpa_decode_contiguous
from mpskern.timing import time_per_call_ms

CTX = 2048
FAMILIES = [  # name, heads, kv_heads, head_dim, page, batches
    ("3B-like H16/2 D128 p16", 16, 2, 128, 16, [64, 128, 256, 512]),
    ("H8/1 D128 p16 (no KV-head interleave)", 8, 1, 128, 16, [128, 256, 512, 1024]),
    ("3B-like H16/2 D128 p128", 16, 2, 128, 128, [64, 128, 256, 512]),
    ("0.5B-like H14/2 D64 p16", 14, 2, 64, 16, [128, 256, 512, 1024]),
    ("7B-like H28/4 D128 p16", 28, 4, 128, 16, [32, 64, 128, 256]),
]


def med(fns) -> float:
    state = {"i": 0}

    def run():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return statistics.median(time_per_call_ms(run, calls=20, rounds=10)) * 1e3  # µs


def fit(points):  # least squares t = a + bytes / r
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, 1e-6 / slope  # fixed µs, TB/s (bytes / µs / 1e6)


def main() -> None:
    print(torch.cuda.get_device_name())
    for name, h, kvh, d, page, batches in FAMILIES:
        rows = {"cuda": [], "cuda_s1": [], "triton": [], "sdpa": []}
        for b in batches:
            nbytes = b * CTX * 2 * kvh * d * 2
            sets = []
            for i in range(2):
                torch.manual_seed(i)
                kv = make_paged_kv([CTX] * b, kvh, d, page_size=page)
                q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
                sets.append((q, kv, torch.empty_like(q)))
            for backend, splits in (("cuda", None), ("cuda_s1", 1), ("triton", None)):
                be = "cuda" if backend.startswith("cuda") else backend
                fns = [lambda s=s, be=be, splits=splits: ops.decode_attention(
                    s[0], s[1].k_cache, s[1].v_cache, s[1].block_table, s[1].seq_lens, out=s[2], backend=be,
                    num_splits=splits) for s in sets]
                rows[backend].append((nbytes, med(fns)))
            del sets
            torch.cuda.empty_cache()
            dense = []
            for i in range(2):
                k = torch.randn(b, kvh, CTX, d, device="cuda", dtype=torch.bfloat16)
                dense.append((torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16), k, torch.randn_like(k)))
            rows["sdpa"].append((nbytes, med([lambda s=s: sdpa_decode_contiguous(*s) for s in dense])))
            del dense
            torch.cuda.empty_cache()
        print(f"\n{name}, ctx {CTX}")
        print("  " + " ".join(f"B{b}:" + "/".join(f"{rows[k][i][1]:.1f}" for k in rows) for i, b in enumerate(batches))
              + "   (µs cuda/cuda_s1/triton/sdpa)")
        for k, pts in rows.items():
            a, r = fit(pts)
            print(f"  {k:8s} fixed {a:6.1f} µs  stream {r:5.2f} TB/s  "
                  + " ".join(f"{p[0] / p[1] / 1e6:.2f}" for p in pts) + " TB/s")


def bench_shapes(backends: list[str]) -> None:
    print(torch.cuda.get_device_name(), "µs per call, x = SDPA time / ours")
    for name in ("Qwen2.5-0.5B", "Qwen2.5-3B", "Qwen2.5-7B"):
        m = get_model(name)
        for b, ctx in ((1024, 512), (256, 2048), (64, 8192), (8, 32768)):
            sets = []
            for i in range(2):
                torch.manual_seed(i)
                kv = make_paged_kv([ctx] * b, m.kv_heads, m.head_dim, page_size=16)
                q = torch.randn(b, m.heads, m.head_dim, device="cuda", dtype=torch.bfloat16)
                sets.append((q, kv, torch.empty_like(q)))
            ours = {be: med([lambda s=s, be=be: ops.decode_attention(
                s[0], s[1].k_cache, s[1].v_cache, s[1].block_table, s[1].seq_lens, out=s[2], backend=be)
                for s in sets]) for be in backends}
            del sets
            torch.cuda.empty_cache()
            dense = []
            for i in range(2):
                k = torch.randn(b, m.kv_heads, ctx, m.head_dim, device="cuda", dtype=torch.bfloat16)
                dense.append((torch.randn(b, m.heads, m.head_dim, device="cuda", dtype=torch.bfloat16), k,
                              torch.randn_like(k)))
            sdpa = med([lambda s=s: sdpa_decode_contiguous(*s) for s in dense])
            del dense
            torch.cuda.empty_cache()
            print(f"{name:13s} {b:5d} x {ctx:5d}  sdpa {sdpa:6.1f}  "
                  + "  ".join(f"{be} {t:6.1f} x{sdpa / t:.3f}" for be, t in ours.items()), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        bench_shapes(["cuda"] + (["triton"] if "triton" in sys.argv else []))
    else:
        main()
