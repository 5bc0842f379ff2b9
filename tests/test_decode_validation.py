"""CPU: every input check of ops.decode_attention raises a clear error naming the argument."""
from __future__ import annotations

import pytest
import torch

from mpskern import ops

B, H, KVH, D, P, PAGES = 2, 8, 2, 64, 16, 6


def inputs(**over):
    args = dict(
        q=torch.randn(B, H, D).half(),
        k_cache=torch.randn(PAGES, P, KVH, D).half(),
        v_cache=torch.randn(PAGES, P, KVH, D).half(),
        block_table=torch.arange(B * 3, dtype=torch.int32).view(B, 3),
        seq_lens=torch.tensor([5, 40], dtype=torch.int32),
    )
    args.update(over)
    return args


CASES = [
    ("q not a tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("q fp32", dict(q=torch.randn(B, H, D)), TypeError, "q must have dtype float16, bfloat16"),
    ("k dtype", dict(k_cache=torch.randn(PAGES, P, KVH, D).bfloat16()), TypeError, "k_cache must have dtype float16"),
    ("v dtype", dict(v_cache=torch.randn(PAGES, P, KVH, D)), TypeError, "v_cache must have dtype"),
    ("table int64", dict(block_table=torch.zeros(B, 3, dtype=torch.int64)), TypeError, "block_table must have dtype int32"),
    ("lens int64", dict(seq_lens=torch.zeros(B, dtype=torch.int64)), TypeError, "seq_lens must have dtype int32"),
    ("q 2-D", dict(q=torch.randn(B, H * D).half()), ValueError, "q must be 3-D"),
    ("k 3-D", dict(k_cache=torch.randn(PAGES, P, KVH * D).half()), ValueError, "k_cache must be 4-D"),
    ("head_dim 96", dict(q=torch.randn(B, H, 96).half(), k_cache=torch.randn(PAGES, P, KVH, 96).half(),
                         v_cache=torch.randn(PAGES, P, KVH, 96).half()), ValueError, "head_dim 96 is not supported"),
    ("k head_dim", dict(k_cache=torch.randn(PAGES, P, KVH, 128).half()), ValueError, "k_cache head_dim"),
    ("v shape", dict(v_cache=torch.randn(PAGES, P, 1, D).half()), ValueError, "v_cache must have shape"),
    ("gqa ratio", dict(k_cache=torch.randn(PAGES, P, 3, D).half(), v_cache=torch.randn(PAGES, P, 3, D).half()),
     ValueError, "GQA ratio must be an integer"),
    ("page 24", dict(k_cache=torch.randn(PAGES, 24, KVH, D).half(), v_cache=torch.randn(PAGES, 24, KVH, D).half()),
     ValueError, "page_size must be a power of two"),
    ("page 512", dict(k_cache=torch.randn(1, 512, KVH, D).half(), v_cache=torch.randn(1, 512, KVH, D).half()),
     ValueError, "page_size must be a power of two"),
    ("table rows", dict(block_table=torch.zeros(B + 1, 3, dtype=torch.int32)), ValueError, "block_table must have batch rows"),
    ("lens shape", dict(seq_lens=torch.zeros(B + 1, dtype=torch.int32)), ValueError, "seq_lens must have shape"),
    ("k non-contiguous", dict(k_cache=torch.randn(PAGES, P, D, KVH).half().transpose(2, 3)), ValueError,
     "k_cache must be contiguous"),
    ("q last dim strided", dict(q=torch.randn(B, D, H).half().transpose(1, 2)), ValueError,
     "q must be contiguous in its last dimension"),
    ("empty table", dict(block_table=torch.zeros(B, 0, dtype=torch.int32)), ValueError, "must be non-zero"),
]


@pytest.mark.parametrize("name,over,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_inputs(name, over, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.decode_attention(**inputs(**over), backend="torch")


def test_bad_out():
    with pytest.raises(ValueError, match="out must have shape"):
        ops.decode_attention(**inputs(), out=torch.empty(B, H, D + 1).half(), backend="torch")
    with pytest.raises(TypeError, match="out must have dtype float16"):
        ops.decode_attention(**inputs(), out=torch.empty(B, H, D), backend="torch")


def test_bad_backend_and_splits():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.decode_attention(**inputs(), backend="cudnn")
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        ops.decode_attention(**inputs(), backend="torch", num_splits=0)


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.decode_attention(**inputs(), backend="cuda")


def test_mixed_devices():
    meta = torch.empty(B, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="all tensors must share one device"):
        ops.decode_attention(**inputs(seq_lens=meta), backend="torch")
