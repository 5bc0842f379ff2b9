"""Random paged KV caches for tests, benchmarks and workloads: pages handed out in shuffled order, as an
engine's allocator would after some churn, so kernels never get to rely on contiguous page ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_pages, page_size, KVH, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V a decode step must read (the valid tokens only)."""
        per_token = 2 * self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        return int(self.seq_lens.sum()) * per_token


def make_paged_kv(
    seq_lens: list[int],
    kv_heads: int,
    head_dim: int,
    *,
    page_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    max_pages: int | None = None,
    shuffle: bool = True,
) -> PagedKV:
    """Fresh random (normal) K/V for sequences of the given lengths. Each sequence owns
    ceil(len / page_size) pages; unused block-table slots point at page 0 (never read)."""
    pages_per_seq = [max(1, -(-n // page_size)) for n in seq_lens]
    max_pages = max(pages_per_seq) if max_pages is None else max_pages
    num_pages = sum(pages_per_seq)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    v_cache = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    order = torch.randperm(num_pages) if shuffle else torch.arange(num_pages)
    table = torch.zeros((len(seq_lens), max_pages), dtype=torch.int32)
    start = 0
    for i, n in enumerate(pages_per_seq):
        table[i, :n] = order[start : start + n].to(torch.int32)
        start += n
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return PagedKV(k_cache, v_cache, table.to(device), lens.to(device))


def decode_inputs(batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int, *, page_size: int = 16,
                  seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                  shuffle: bool = True) -> tuple[torch.Tensor, PagedKV, torch.Tensor]:
    """A decode step's (q, paged KV, out) with every sequence at ``ctx`` tokens: benchmark and probe inputs.
    ``shuffle=False`` hands the pages out in order (each sequence's KV contiguous), as a probe of paging's cost."""
    torch.manual_seed(seed)
    kv = make_paged_kv([ctx] * batch, kv_heads, head_dim, page_size=page_size, dtype=dtype, device=device,
                       shuffle=shuffle)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    return q, kv, torch.empty_like(q)


def contiguous_decode_inputs(batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int, *, seed: int = 0,
                             dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same step for SDPA with contiguous KV: (q ``[B, H, D]``, k, v ``[B, KVH, ctx, D]``)."""
    torch.manual_seed(seed)
    k = torch.randn(batch, kv_heads, ctx, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    return torch.randn(batch, heads, head_dim, device=device, dtype=dtype), k, v
