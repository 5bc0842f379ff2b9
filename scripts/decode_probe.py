"""Where does the paged decode kernel lose time to cuDNN? Time vs KV bytes at several batches, fitted as
fixed µs + bytes / streaming rate, for our kernels (auto split, and unsplit for CUDA) and SDPA over
contiguous KV, with KV-head interleaving (KVH 2 vs 1 at equal bytes) and page size (16 vs 128) as the
variables. `waves`: CUDA (unsplit) and SDPA time against batch at ctx 2048 on the 3B shape, where CTA waves
step. `triton-configs`: the D = 128 Triton kernel unsplit under every (BLOCK_N, warps, stages), against CUDA
and SDPA on three 2-wave benchmark shapes. `pages`: the CUDA kernel and a paged-read roofline over shuffled,
per-sequence sorted and sequential pages, each against SDPA round by round. The benchmark shapes themselves
are timed by `pytest benchmarks` (scripts/gpu_check.sh bench).
usage: python scripts/decode_probe.py [waves | triton-configs | pages]"""
from __future__ import annotations

import itertools
import statistics
import sys

import torch

from mpskern import ops
from mpskern.models import get_model
from mpskern.paged_kv import contiguous_decode_inputs, decode_inputs
from mpskern.reference import sdpa_decode_contiguous
from mpskern.timing import graphed, interleaved_ms, rotating, round_ratios, time_per_call_ms
from mpskern.triton import decode_attention as td
from mpskern.triton.paged_read import paged_read

CTX = 2048
SETS = 2  # buffer sets that alternate, so no call runs from L2
READ_PAGES = 8  # pages per paged-read program: 8 and 32 read alike (BENCHMARKS.md)
FAMILIES = [  # name, heads, kv_heads, head_dim, page, batches
    ("3B-like H16/2 D128 p16", 16, 2, 128, 16, [64, 128, 256, 512]),
    ("H8/1 D128 p16 (no KV-head interleave)", 8, 1, 128, 16, [128, 256, 512, 1024]),
    ("3B-like H16/2 D128 p128", 16, 2, 128, 128, [64, 128, 256, 512]),
    ("0.5B-like H14/2 D64 p16", 14, 2, 64, 16, [128, 256, 512, 1024]),
    ("7B-like H28/4 D128 p16", 28, 4, 128, 16, [32, 64, 128, 256]),
]
VARIANTS = {"cuda": ("cuda", None), "cuda_s1": ("cuda", 1), "triton": ("triton", None)}  # backend, num_splits


def median_us(fns) -> float:
    return statistics.median(time_per_call_ms(rotating(fns), calls=20, rounds=10)) * 1e3


def paged_calls(sets, backend: str = "cuda", num_splits: int | None = None) -> list:
    """One paged decode call per set of decode_inputs."""
    return [lambda s=s: ops.decode_attention(s[0], s[1].k_cache, s[1].v_cache, s[1].block_table, s[1].seq_lens,
                                             out=s[2], backend=backend, num_splits=num_splits) for s in sets]


def paged_us(sets, backend: str = "cuda", num_splits: int | None = None) -> float:
    """Median µs of one paged decode call, alternating over `sets` of decode_inputs."""
    return median_us(paged_calls(sets, backend, num_splits))


def sdpa_us(dense_sets) -> float:
    """Median µs of SDPA over contiguous KV, alternating over `dense_sets` of contiguous_decode_inputs."""
    return median_us([lambda s=s: sdpa_decode_contiguous(*s) for s in dense_sets])


def fit(points):  # least squares t = a + bytes / r
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, 1e-6 / slope  # fixed µs, TB/s (bytes / µs / 1e6)


def main() -> None:
    print(torch.cuda.get_device_name())
    for name, h, kvh, d, page, batches in FAMILIES:
        rows: dict[str, list] = {k: [] for k in (*VARIANTS, "sdpa")}
        for b in batches:
            nbytes = b * CTX * 2 * kvh * d * 2
            sets = [decode_inputs(b, CTX, h, kvh, d, page_size=page, seed=i) for i in range(SETS)]
            for variant, (backend, splits) in VARIANTS.items():
                rows[variant].append((nbytes, paged_us(sets, backend, splits)))
            del sets
            dense = [contiguous_decode_inputs(b, CTX, h, kvh, d, seed=100 + i) for i in range(SETS)]
            rows["sdpa"].append((nbytes, sdpa_us(dense)))
            del dense
            torch.cuda.empty_cache()
        print(f"\n{name}, ctx {CTX}")
        print("  " + " ".join(f"B{b}:" + "/".join(f"{rows[k][i][1]:.1f}" for k in rows) for i, b in enumerate(batches))
              + "   (µs " + "/".join(rows) + ")")
        for k, pts in rows.items():
            a, r = fit(pts)
            print(f"  {k:8s} fixed {a:6.1f} µs  stream {r:5.2f} TB/s  "
                  + " ".join(f"{p[0] / p[1] / 1e6:.2f}" for p in pts) + " TB/s")


def waves() -> None:
    h, kvh, d = 16, 2, 128  # Qwen2.5-3B
    print(torch.cuda.get_device_name(), f"H{h}/{kvh} D{d} ctx {CTX}: batch (CTAs) cuda_s1 / sdpa µs")
    for b in range(96, 297, 8):
        sets = [decode_inputs(b, CTX, h, kvh, d, seed=i) for i in range(SETS)]
        cuda = paged_us(sets, num_splits=1)
        del sets
        dense = [contiguous_decode_inputs(b, CTX, h, kvh, d, seed=100 + i) for i in range(SETS)]
        sdpa = sdpa_us(dense)
        del dense
        torch.cuda.empty_cache()
        print(f"  {b} ({b * kvh}) {cuda:.1f} / {sdpa:.1f}", flush=True)


def triton_configs() -> None:
    shapes = [("Qwen2.5-3B", 1024, 512), ("Qwen2.5-3B", 256, 2048), ("Qwen2.5-7B", 256, 2048)]
    print(torch.cuda.get_device_name(), "µs at", ", ".join(f"{m[7:]} {b}x{c}" for m, b, c in shapes))
    paged, dense = [], []
    for name, b, c in shapes:
        m = get_model(name)
        paged.append([decode_inputs(b, c, m.heads, m.kv_heads, m.head_dim, seed=i) for i in range(SETS)])
        dense.append([contiguous_decode_inputs(b, c, m.heads, m.kv_heads, m.head_dim, seed=100 + i)
                      for i in range(SETS)])

    def row(backend: str) -> str:
        return " ".join(f"{paged_us(sets, backend, num_splits=1):.1f}" for sets in paged)

    print("  sdpa", " ".join(f"{sdpa_us(sets):.1f}" for sets in dense))
    print("  cuda", row("cuda"), flush=True)
    shipped = td.CONFIGS[128]
    try:
        for bn, w, st in itertools.product((16, 32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
            td.CONFIGS[128] = td.DecodeConfig(block_n=bn, num_warps=w, num_stages=st, ctas_per_sm=shipped.ctas_per_sm)
            print(f"  triton BLOCK_N {bn} warps {w} stages {st}:", row("triton"), flush=True)
    finally:
        td.CONFIGS[128] = shipped


ORDERS = ("shuffled", "sorted", "sequential")  # page order: the benchmark's, per sequence by page id, contiguous


def page_sets(b: int, c: int, m, order: str) -> list:
    """SETS decode_inputs of one shape with pages in ``order``."""
    sets = [decode_inputs(b, c, m.heads, m.kv_heads, m.head_dim, seed=i, shuffle=order != "sequential")
            for i in range(SETS)]
    if order == "sorted":
        for _, kv, _ in sets:
            kv.block_table = kv.block_table.sort(dim=1).values.contiguous()
    return sets


def pages() -> None:
    """The price of paging: the CUDA kernel and a paged-read roofline (mpskern.triton.paged_read: the kernel's
    bytes in its access pattern, no math) over the same pages in three orders, each timed round by round
    against SDPA over contiguous KV (µs, median ratio SDPA / it)."""
    shapes = [("Qwen2.5-3B", 1024, 512), ("Qwen2.5-3B", 256, 2048), ("Qwen2.5-3B", 64, 8192),
              ("Qwen2.5-7B", 1024, 512), ("Qwen2.5-7B", 256, 2048), ("Qwen2.5-7B", 64, 8192)]
    print(torch.cuda.get_device_name(), "µs (x SDPA) of the CUDA kernel | paged read, pages", " / ".join(ORDERS))
    for name, b, c in shapes:
        m = get_model(name)
        dense = [contiguous_decode_inputs(b, c, m.heads, m.kv_heads, m.head_dim, seed=100 + i) for i in range(SETS)]
        sdpa = graphed(rotating([lambda s=s: sdpa_decode_contiguous(*s) for s in dense]))
        cells = []
        for order in ORDERS:
            sets = page_sets(b, c, m, order)
            sums = torch.empty(b, m.kv_heads, sets[0][1].block_table.shape[1] // READ_PAGES, device="cuda")
            read = graphed(rotating([lambda s=s: paged_read(s[1].k_cache, s[1].v_cache, s[1].block_table, sums,
                                                            READ_PAGES) for s in sets]))
            times = interleaved_ms([graphed(rotating(paged_calls(sets))), read, sdpa], calls=20, rounds=16)
            t_sdpa = times[-1]
            speedups = [statistics.median(round_ratios(t_sdpa, t)) for t in times[:2]]
            cells.append(" | ".join(f"{statistics.median(t) * 1e3:.1f} (x{x:.3f})"
                                    for t, x in zip(times[:2], speedups)))
            del sets, read
            torch.cuda.empty_cache()
        print(f"  {name[6:]} {b} x {c}: " + " / ".join(cells) + f"; SDPA {statistics.median(t_sdpa) * 1e3:.1f}",
              flush=True)
        del dense, sdpa
        torch.cuda.empty_cache()


if __name__ == "__main__":
    modes = {"": main, "waves": waves, "triton-configs": triton_configs, "pages": pages}
    mode = " ".join(sys.argv[1:])
    if mode not in modes:
        sys.exit(f"unknown mode {mode!r}; usage: python scripts/decode_probe.py [waves | triton-configs | pages]")
    modes[mode]()
