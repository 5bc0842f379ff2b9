"""Render a pytest-benchmark JSON (benchmarks/) as the Markdown table kept in BENCHMARKS.md: one row per
shape, each backend's time, KV GB/s, % of the copy and read ceilings and ratio to torch (median of the
per-round ratios, with p10-p90) side by side.
usage: python scripts/bench_table.py BENCH_JSON"""
from __future__ import annotations

import json
import subprocess
import sys

from mpskern.models import get_model


def us(ms: float | None) -> str:
    return "—" if ms is None else f"{ms * 1e3:.1f}"


def main(path: str) -> None:
    data = json.load(open(path))
    info = data.get("commit_info", {})
    commit = info.get("id") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit = commit[:10] + (" (dirty: the measured tree is not this commit)" if info.get("dirty") else "")
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info")]
    if not rows:
        sys.exit("no benchmark rows with extra_info")
    shapes: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        shapes.setdefault((r["model"], r["batch"], r["context"]), {})[r["backend"]] = r
    backends = sorted({r["backend"] for r in rows}, key=lambda b: (b != "cuda", b))  # cuda first
    read = rows[0].get("read_gbs")
    print(f"card: {rows[0]['device']} · copy ceiling {rows[0]['copy_gbs']:.0f} GB/s (read + write, same run) · "
          f"read ceiling {f'{read:.0f} GB/s' if read else '—'} · commit {commit}\n")
    cols = [f"{b} {c}" for b in backends for c in ("µs", "GB/s", "% copy", "% read", "× torch (p10–p90)")]
    print("| model (H/KVH, D) | B × ctx | KV MB | " + " | ".join(cols) + " | torch µs | cuDNN µs | flash µs |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " | ---: | ---: | ---: |")
    for (model, batch, ctx), by in shapes.items():
        m, any_r = get_model(model), next(iter(by.values()))
        cells = []
        for b in backends:
            r = by[b]
            spread = f" ({r['speedup_p10']:.3f}–{r['speedup_p90']:.3f})" if "speedup_p10" in r else ""
            pct_read = f"{r['pct_of_read_bw']:.1f}" if "pct_of_read_bw" in r else "—"
            cells += [f"{r['time_ms'] * 1e3:.1f}", f"{r['kv_gbs']:.0f}", f"{r['pct_of_copy_bw']:.1f}", pct_read,
                      f"{r['speedup_vs_torch']:.3f}{spread}"]
        ref = by.get("cuda", any_r)  # torch µs as timed beside the CUDA kernel
        print(f"| {model} ({m.heads}/{m.kv_heads}, {m.head_dim}) | {batch} × {ctx} | {any_r['kv_bytes'] / 1e6:.0f} | "
              + " | ".join(cells) + f" | {us(ref['torch_ms'])} | {us(ref['sdpa_cudnn_ms'])} | "
              f"{us(ref['sdpa_flash_ms'])} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
