"""Input validation shared by every op and backend: clear errors naming the argument, before any launch."""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128, 256)
MAX_PAGE_SIZE = 256


def tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(a).removeprefix("torch.") for a in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).removeprefix('torch.')}")


def ndim(name: str, t: torch.Tensor, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name} must be {n}-D {layout}; got shape {tuple(t.shape)}")


def shape(name: str, t: torch.Tensor, expected: tuple, layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}; got {tuple(t.shape)}")


def contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)})")


def last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (got strides {t.stride()})")


def same_device(named: dict[str, torch.Tensor]) -> torch.device:
    devices = {n: t.device for n, t in named.items()}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but {first_name} is on {first}; all tensors must share one device")
    return first


def cuda_device(name: str, t: torch.Tensor, backend: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"backend {backend!r} needs CUDA tensors; {name} is on {t.device}")


def head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported; supported: {HEAD_DIMS}")


def gqa(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads}): "
            "the GQA ratio must be an integer"
        )
    return num_heads // num_kv_heads


def page_size(p: int) -> None:
    if p < 1 or p > MAX_PAGE_SIZE or p & (p - 1):
        raise ValueError(f"page_size must be a power of two in [1, {MAX_PAGE_SIZE}]; got {p}")


def triton_interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1), where Triton kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
