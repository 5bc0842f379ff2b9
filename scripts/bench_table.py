"""Render a pytest-benchmark JSON (benchmarks/) as the Markdown table kept in BENCHMARKS.md."""
from __future__ import annotations

import json
import subprocess
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    info = data.get("commit_info", {})
    commit = info.get("id") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit = commit[:10] + (" (dirty: the measured tree is not this commit)" if info.get("dirty") else "")
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info")]
    if not rows:
        sys.exit("no benchmark rows with extra_info")
    first = rows[0]
    print(f"card: {first['device']} · copy ceiling {first['copy_gbs']:.0f} GB/s (read + write, same run) · "
          f"commit {commit}\n")
    print("| kernel | backend | model | batch × ctx | time (µs) | KV GB/s | % copy BW | torch (µs) | × torch |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['kernel']} | {r['backend']} | {r['model']} | {r['batch']} × {r['context']} | "
              f"{r['time_ms'] * 1e3:.1f} | {r['kv_gbs']:.0f} | {r['pct_of_copy_bw']:.1f} | "
              f"{r['torch_ms'] * 1e3:.1f} | {r['speedup_vs_torch']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
