"""Torch implementations: the ``torch`` backend (SDPA over gathered KV; the vendor baseline) and the
naive high-precision references the tests compare every backend with."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_paged_kv(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_pages, page_size, KVH, D] paged cache -> dense [B, KVH, max_pages * page_size, D]."""
    b, max_pages = block_table.shape
    _, page_size, kvh, d = cache.shape
    dense = cache.index_select(0, block_table.reshape(-1).long())  # [B * max_pages, page_size, KVH, D]
    return dense.view(b, max_pages * page_size, kvh, d).transpose(1, 2)


def sdpa_decode_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over contiguous KV ``[B, KVH, L, D]`` with the GQA group folded into the query length,
    so SDPA's flash/cuDNN kernels read each KV head once. ``q`` is ``[B, H, D]``; returns ``[B, H, D]``."""
    b, h, d = q.shape
    kvh = k.shape[1]
    qg = q.view(b, kvh, h // kvh, d)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=attn_mask, scale=scale).reshape(b, h, d)


def decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, out, num_splits=None):
    """The ``torch`` backend: gather the pages, mask past each sequence's length, SDPA.
    Sequences of length 0 give zeros, as in the custom kernels."""
    del num_splits  # SDPA plans its own launch
    k = gather_paged_kv(k_cache, block_table)
    v = gather_paged_kv(v_cache, block_table)
    positions = torch.arange(k.shape[2], device=q.device)
    valid = positions[None, :] < seq_lens[:, None]  # [B, L]
    res = sdpa_decode_contiguous(q, k, v, scale, attn_mask=valid[:, None, None, :])
    res = torch.where((seq_lens > 0)[:, None, None], res, torch.zeros((), dtype=res.dtype, device=res.device))
    out.copy_(res)
    return out


def decode_attention_naive(q, k_cache, v_cache, block_table, seq_lens, scale=None, dtype=torch.float64):
    """Per-sequence loop in high precision, straight from the definition (tests only)."""
    b, h, d = q.shape
    page_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros((b, h, d), dtype=dtype, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        pages = block_table[i, : (n + page_size - 1) // page_size].long()
        k = k_cache[pages].reshape(-1, kvh, d)[:n].to(dtype)  # [n, KVH, D]
        v = v_cache[pages].reshape(-1, kvh, d)[:n].to(dtype)
        for hh in range(h):
            s = (k[:, hh // group, :] @ q[i, hh].to(dtype)) * scale
            out[i, hh] = torch.softmax(s, dim=0) @ v[:, hh // group, :]
    return out


def decode_attention_dense(q, k_cache, v_cache, block_table, seq_lens, scale=None, dtype=torch.float32):
    """Vectorised high-precision reference: gather pages into dense K/V, masked softmax (GPU tests)."""
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    k = gather_paged_kv(k_cache, block_table).to(dtype)  # [B, KVH, L, D]
    v = gather_paged_kv(v_cache, block_table).to(dtype)
    qg = q.to(dtype).view(b, kvh, h // kvh, d)
    s = torch.einsum("bkgd,bkld->bkgl", qg, k) * scale
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None].long()
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows (length 0) -> zeros
    return torch.einsum("bkgl,bkld->bkgd", p, v).reshape(b, h, d)


# -- fp64 references of the layer ops ------------------------------------------------------------------------

def rmsnorm_fp64(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """RMSNorm in fp64; with a residual the sum is rounded to x's dtype first (the op's contract)."""
    if residual is not None:
        x = (x.double() + residual.double()).to(x.dtype)
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def rope_fp64(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox rotate-half in fp64 of x ``[T, heads, D]`` (cos in the first D/2 cache columns, sin in the rest)."""
    half = x.shape[-1] // 2
    cs = cos_sin_cache.double()[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def gate_up_act_fp64(x: torch.Tensor, w_gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x @ w_gate.T) * (x @ w_up.T)`` in fp64 (rows [0, I) of w_gate_up the gate, [I, 2I) the up)."""
    inter = w_gate_up.shape[0] // 2
    y = x.double() @ w_gate_up.double().t()
    gate = F.silu(y[:, :inter]) if act == "silu" else F.gelu(y[:, :inter], approximate="tanh")
    return gate * y[:, inter:]
