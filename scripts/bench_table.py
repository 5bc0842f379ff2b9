"""Render a pytest-benchmark JSON (benchmarks/) as the Markdown table kept in BENCHMARKS.md: one row per
shape, each backend's time, KV GB/s, % of the copy ceiling and ratio to torch side by side.
usage: python scripts/bench_table.py BENCH_JSON"""
from __future__ import annotations

import json
import subprocess
import sys

from mpskern.models import get_model


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
    print(f"card: {rows[0]['device']} · copy ceiling {rows[0]['copy_gbs']:.0f} GB/s (read + write, same run) · "
          f"commit {commit}\n")
    cols = [f"{b} {c}" for b in backends for c in ("µs", "GB/s", "% copy", "× torch")]
    print("| model (H/KVH, D) | B × ctx | KV MB | " + " | ".join(cols) + " | torch µs | cuDNN µs | flash µs |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " | ---: | ---: | ---: |")
    for (model, batch, ctx), by in shapes.items():
        m, any_r = get_model(model), next(iter(by.values()))
        cells = []
        for b in backends:
            r = by[b]
            cells += [f"{r['time_ms'] * 1e3:.1f}", f"{r['kv_gbs']:.0f}", f"{r['pct_of_copy_bw']:.1f}",
                      f"{r['speedup_vs_torch']:.2f}"]
        print(f"| {model} ({m.heads}/{m.kv_heads}, {m.head_dim}) | {batch} × {ctx} | {any_r['kv_bytes'] / 1e6:.0f} | "
              + " | ".join(cells) + f" | {any_r['torch_ms'] * 1e3:.1f} | {any_r['sdpa_cudnn_ms'] * 1e3:.1f} | "
              f"{any_r['sdpa_flash_ms'] * 1e3:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
