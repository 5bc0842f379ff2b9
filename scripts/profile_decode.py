"""Run one paged-decode shape a few times (for ncu / compute-sanitizer).
usage: python scripts/profile_decode.py MODEL BATCH CTX BACKEND [sdpa]"""
from __future__ import annotations

import sys

import torch

from mpskern import ops
from mpskern.models import get_model
from mpskern.paged_kv import make_paged_kv
from mpskern.reference import sdpa_decode_contiguous

model, batch, ctx, backend = get_model(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
q = torch.randn(batch, model.heads, model.head_dim, device="cuda", dtype=torch.bfloat16)
if backend == "sdpa":
    k = torch.randn(batch, model.kv_heads, ctx, model.head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    run = lambda: sdpa_decode_contiguous(q, k, v)  # noqa: E731
else:
    kv = make_paged_kv([ctx] * batch, model.kv_heads, model.head_dim, page_size=16)
    run = lambda: ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,  # noqa: E731
                                       backend=backend)
for _ in range(3):
    run()
torch.cuda.synchronize()
print("ok")
