"""Run one paged-decode shape a few times (for ncu / compute-sanitizer).
usage: python scripts/profile_decode.py MODEL BATCH CTX BACKEND   (BACKEND: cuda | triton | torch | sdpa)"""
from __future__ import annotations

import sys

import torch

from mpskern import ops
from mpskern.models import get_model
from mpskern.paged_kv import contiguous_decode_inputs, decode_inputs
from mpskern.reference import sdpa_decode_contiguous

model, batch, ctx, backend = get_model(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
shape = (batch, ctx, model.heads, model.kv_heads, model.head_dim)
if backend == "sdpa":
    q, k, v = contiguous_decode_inputs(*shape)
    run = lambda: sdpa_decode_contiguous(q, k, v)  # noqa: E731
else:
    q, kv, out = decode_inputs(*shape)
    run = lambda: ops.decode_attention(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,  # noqa: E731
                                       out=out, backend=backend)
for _ in range(3):
    run()
torch.cuda.synchronize()
print("ok")
