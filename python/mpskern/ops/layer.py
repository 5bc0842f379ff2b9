"""The rest of a decoder layer: RMSNorm (+ residual add), rotary embedding + KV-cache append, and the MLP
GEMMs (``gate_up_act``, ``linear``, ``mlp``).

The small ops exist at two fusion levels, because how much an engine fuses moves the MPS gain:
``backend="torch"`` is the unfused sequence of torch ops an engine without custom kernels runs (vLLM's
``forward_native``), ``backend="triton"`` is one fused kernel per op (:mod:`mpskern.triton.layer_kernels`).
The MLP ops have only the ``"torch"`` backend (cuBLAS + torch activation) until the custom GEMMs land.
Every op validates before launch, works on the current stream and is CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks
from ..models import ACTIVATIONS
from .dispatch import implementation, register

register("rmsnorm", "triton", "mpskern.triton.layer_kernels:rmsnorm")
register("rmsnorm", "torch", "mpskern.ops.layer:_rmsnorm_torch")
register("rope_kv_append", "triton", "mpskern.triton.layer_kernels:rope_kv_append")
register("rope_kv_append", "torch", "mpskern.ops.layer:_rope_kv_append_torch")
register("gate_up_act", "torch", "mpskern.ops.layer:_gate_up_act_torch")
register("linear", "torch", "mpskern.ops.layer:_linear_torch")
register("mlp", "torch", "mpskern.ops.layer:_mlp_torch")

MAX_ROPE_HEAD_DIM = 512


def _device_ok(name: str, t: torch.Tensor, backend: str) -> None:
    if backend == "cuda" or (backend == "triton" and not checks.triton_interpreting()):
        checks.cuda_device(name, t, backend)


def _out(out, like: torch.Tensor, shape: tuple, layout: str, dense: bool = False) -> torch.Tensor:
    """The checked ``out``, or a new contiguous one with ``like``'s dtype and device. ``dense``: the GEMM ops
    want a contiguous ``out`` (cuBLAS would otherwise write a temporary and copy)."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    out = checks.tensor("out", out)
    checks.dtype("out", out, (like.dtype,))
    checks.shape("out", out, shape, layout)
    (checks.contiguous if dense else checks.last_dim_contiguous)("out", out)
    return out


def _intermediate(w_gate_up: torch.Tensor) -> int:
    """I of a fused ``[2I, K]`` gate/up weight."""
    if w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must have an even number of rows [2 * intermediate]; got {w_gate_up.shape[0]}")
    return w_gate_up.shape[0] // 2


# ---------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x**2) + eps) * weight``, fp32 math.

    x ``[T, hidden]``, weight ``[hidden]`` (same dtype). With ``residual`` (``[T, hidden]``, contiguous) this is
    vLLM's ``fused_add_rms_norm``: ``residual += x`` in place (rounded to the dtype, as torch's in-place add
    does), and the result is ``rmsnorm(residual)``. The result goes into ``out`` when given (``out`` may be
    ``x`` itself); otherwise into a new tensor.
    """
    impl = implementation("rmsnorm", backend)
    x = checks.tensor("x", x)
    weight = checks.tensor("weight", weight)
    checks.dtype("x", x, checks.HALF_DTYPES)
    checks.dtype("weight", weight, (x.dtype,))
    checks.ndim("x", x, 2, "[tokens, hidden]")
    t, hidden = x.shape
    checks.shape("weight", weight, (hidden,), "[hidden]")
    if t == 0 or hidden == 0:
        raise ValueError(f"x must have non-zero tokens and hidden; got shape {tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    checks.last_dim_contiguous("x", x)
    checks.contiguous("weight", weight)
    named = {"x": x, "weight": weight}
    if residual is not None:
        residual = checks.tensor("residual", residual)
        checks.dtype("residual", residual, (x.dtype,))
        checks.shape("residual", residual, (t, hidden), "[tokens, hidden]")
        checks.last_dim_contiguous("residual", residual)
        named["residual"] = residual
    named["out"] = out = _out(out, x, (t, hidden), "[tokens, hidden]")
    checks.same_device(named)
    _device_ok("x", x, backend)
    return impl(x, weight, float(eps), residual, out)


def _rmsnorm_torch(x, weight, eps, residual, out):
    """Unfused: the add, the fp32 upcast, the mean of squares, rsqrt, the scale, the downcast, the weight."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    torch.mul(xf.to(x.dtype), weight, out=out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Rotary embedding + KV-cache append
# ---------------------------------------------------------------------------------------------------------


def rope_cos_sin_cache(max_pos: int, head_dim: int, *, theta: float = 10000.0, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``cos_sin_cache`` rope_kv_append takes: ``[max_pos, head_dim]``, cos of position * theta^(-2i/D) in
    the first D/2 columns, sin in the last D/2 (computed in fp32)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype).contiguous()


def rope_kv_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "triton",
) -> None:
    """Neox-style rotary embedding (rotate-half) of q and k in place, then k and v into the paged caches.

    q ``[T, H, D]``, k/v ``[T, KVH, D]`` (views into a fused qkv buffer are fine: only the last dim must be
    contiguous); positions ``[T]`` int32/int64; cos_sin_cache ``[max_pos, D]`` (cos in the first D/2
    columns, sin in the last D/2; fp32 or q's dtype); k_cache/v_cache ``[num_pages, page_size, KVH, D]``
    contiguous; slot_mapping ``[T]`` int32 (``page * page_size + row``). Token t's rotated k and its v land
    in slot ``slot_mapping[t]``. Positions and slots live on the device and are not range-checked.
    """
    impl = implementation("rope_kv_append", backend)
    q = checks.tensor("q", q)
    k = checks.tensor("k", k)
    v = checks.tensor("v", v)
    positions = checks.tensor("positions", positions)
    cos_sin_cache = checks.tensor("cos_sin_cache", cos_sin_cache)
    k_cache = checks.tensor("k_cache", k_cache)
    v_cache = checks.tensor("v_cache", v_cache)
    slot_mapping = checks.tensor("slot_mapping", slot_mapping)
    checks.dtype("q", q, checks.HALF_DTYPES)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        checks.dtype(name, t, (q.dtype,))
    checks.dtype("positions", positions, (torch.int32, torch.int64))
    checks.dtype("cos_sin_cache", cos_sin_cache, (torch.float32, q.dtype))
    checks.dtype("slot_mapping", slot_mapping, (torch.int32,))
    checks.ndim("q", q, 3, "[tokens, heads, head_dim]")
    checks.ndim("k", k, 3, "[tokens, kv_heads, head_dim]")
    checks.ndim("k_cache", k_cache, 4, "[num_pages, page_size, kv_heads, head_dim]")
    checks.ndim("cos_sin_cache", cos_sin_cache, 2, "[max_position, head_dim]")
    t, h, d = q.shape
    kvh = k.shape[1]
    if t == 0:
        raise ValueError("q must have at least one token")
    if d % 2 or d > MAX_ROPE_HEAD_DIM:
        raise ValueError(f"head_dim must be even and at most {MAX_ROPE_HEAD_DIM}; got {d}")
    checks.gqa(h, kvh)
    checks.shape("k", k, (t, kvh, d), "[tokens, kv_heads, head_dim]")
    checks.shape("v", v, (t, kvh, d), "[tokens, kv_heads, head_dim]")
    checks.shape("positions", positions, (t,), "[tokens]")
    checks.shape("slot_mapping", slot_mapping, (t,), "[tokens]")
    if cos_sin_cache.shape[1] != d or cos_sin_cache.shape[0] == 0:
        raise ValueError(f"cos_sin_cache must be [max_position > 0, head_dim = {d}]; got {tuple(cos_sin_cache.shape)}")
    num_pages, page_size, ckvh, cd = k_cache.shape
    if (ckvh, cd) != (kvh, d) or num_pages == 0:
        raise ValueError(
            f"k_cache must be [num_pages > 0, page_size, kv_heads = {kvh}, head_dim = {d}]; got {tuple(k_cache.shape)}"
        )
    checks.page_size(page_size)
    checks.shape("v_cache", v_cache, tuple(k_cache.shape), "k_cache's shape")
    for name, ten in (("q", q), ("k", k), ("v", v), ("cos_sin_cache", cos_sin_cache)):
        checks.last_dim_contiguous(name, ten)
    for name, ten in (("positions", positions), ("slot_mapping", slot_mapping), ("k_cache", k_cache),
                      ("v_cache", v_cache)):
        checks.contiguous(name, ten)
    checks.same_device({"q": q, "k": k, "v": v, "positions": positions, "cos_sin_cache": cos_sin_cache,
                        "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping})
    _device_ok("q", q, backend)
    impl(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)


def _rotate_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x [T, heads, D] <- rotate-half(x) in fp32; cos/sin [T, 1, D/2] fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def _rope_kv_append_torch(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
    """Unfused, as vLLM's native rotary + reshape_and_cache: gather cos/sin, rotate q, rotate k, then two
    scatters into the caches."""
    cos, sin = cos_sin_cache.index_select(0, positions).float().unsqueeze(1).chunk(2, dim=-1)
    _rotate_inplace(q, cos, sin)
    _rotate_inplace(k, cos, sin)
    kvh, d = k.shape[1:]
    slots = slot_mapping.long()
    k_cache.view(-1, kvh, d).index_copy_(0, slots, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slots, v)


# ---------------------------------------------------------------------------------------------------------
# MLP GEMMs
# ---------------------------------------------------------------------------------------------------------


def _check_gemm(x, w, wname: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = checks.tensor("x", x)
    w = checks.tensor(wname, w)
    checks.dtype("x", x, checks.HALF_DTYPES)
    checks.dtype(wname, w, (x.dtype,))
    checks.ndim("x", x, 2, "[tokens, in_features]")
    checks.ndim(wname, w, 2, "[out_features, in_features]")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{wname} must be [out_features, in_features = {x.shape[1]}]; got {tuple(w.shape)}")
    if 0 in x.shape or 0 in w.shape:
        raise ValueError(f"x {tuple(x.shape)} and {wname} {tuple(w.shape)} must have non-zero sizes")
    checks.last_dim_contiguous("x", x)
    checks.contiguous(wname, w)
    checks.same_device({"x": x, wname: w})
    _device_ok("x", x, backend)
    return x, w


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}; got {act!r}")


def gate_up_act(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    act: str = "silu",
    *,
    out: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """``act(x @ w_gate[:I].T) * (x @ w_gate_up[I:].T)``: x ``[T, K]``, w_gate_up ``[2I, K]`` (rows ``[0, I)``
    the gate projection, ``[I, 2I)`` the up projection) → ``[T, I]``. act: ``"silu"`` (SwiGLU) or
    ``"gelu_tanh"`` (GeGLU)."""
    impl = implementation("gate_up_act", backend)
    x, w_gate_up = _check_gemm(x, w_gate_up, "w_gate_up", backend)
    _check_act(act)
    inter = _intermediate(w_gate_up)
    out = _out(out, x, (x.shape[0], inter), "[tokens, intermediate]", dense=True)
    return impl(x, w_gate_up, act, out)


def linear(
    x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None, backend: str = "torch"
) -> torch.Tensor:
    """``x @ w.T``: x ``[T, K]``, w ``[N, K]`` (``nn.Linear`` layout) → ``[T, N]``."""
    impl = implementation("linear", backend)
    x, w = _check_gemm(x, w, "w", backend)
    out = _out(out, x, (x.shape[0], w.shape[0]), "[tokens, out_features]", dense=True)
    return impl(x, w, out)


def mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act: str = "silu",
    *,
    out: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """``linear(gate_up_act(x, w_gate_up, act), w_down)``: w_down ``[K, I]`` → ``[T, K]``."""
    impl = implementation("mlp", backend)
    x, w_gate_up = _check_gemm(x, w_gate_up, "w_gate_up", backend)
    _check_act(act)
    inter = _intermediate(w_gate_up)
    w_down = checks.tensor("w_down", w_down)
    checks.dtype("w_down", w_down, (x.dtype,))
    checks.shape("w_down", w_down, (x.shape[1], inter), "[hidden, intermediate]")
    checks.contiguous("w_down", w_down)
    checks.same_device({"x": x, "w_down": w_down})
    out = _out(out, x, tuple(x.shape), "[tokens, hidden]", dense=True)
    return impl(x, w_gate_up, w_down, act, out)


def _activate(gate: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")


def _gate_up_act_torch(x, w_gate_up, act, out):
    """cuBLAS GEMM into [T, 2I], then the activation and the product as two more kernels."""
    inter = w_gate_up.shape[0] // 2
    gate_up = torch.mm(x, w_gate_up.t())
    torch.mul(_activate(gate_up[:, :inter], act), gate_up[:, inter:], out=out)
    return out


def _linear_torch(x, w, out):
    return torch.mm(x, w.t(), out=out)


def _mlp_torch(x, w_gate_up, w_down, act, out):
    inter = w_gate_up.shape[0] // 2
    h = _gate_up_act_torch(x, w_gate_up, act, torch.empty((x.shape[0], inter), dtype=x.dtype, device=x.device))
    return _linear_torch(h, w_down, out)
