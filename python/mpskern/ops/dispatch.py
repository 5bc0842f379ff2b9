"""Backend dispatch: each op names, per backend, the "module:function" that implements it.

Backends: ``"cuda"`` (csrc, mpskern._C), ``"triton"``, ``"torch"`` (the reference built from cuBLAS/SDPA,
also the vendor baseline). Implementations are imported on first use, so a missing backend (no nvcc at
install time, no GPU) only fails when it is asked for.
"""
from __future__ import annotations

import importlib
from typing import Callable

BACKENDS = ("cuda", "triton", "torch")

_IMPLS: dict[str, dict[str, str]] = {}


def register(op: str, backend: str, target: str) -> None:
    """Plug an implementation (``"module:function"``) of ``op`` into the dispatch table."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = target


def implementation(op: str, backend: str) -> Callable:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    target = _IMPLS.get(op, {}).get(backend)
    if target is None:
        raise NotImplementedError(f"op {op!r} has no {backend!r} backend yet")
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def has_backend(op: str, backend: str) -> bool:
    return backend in _IMPLS.get(op, {})
