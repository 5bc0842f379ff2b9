"""Bytes, FLOPs, working set and memory of a stream, and the layer count chosen from them (host-only).

Notation: ``e`` bytes per element, ``B`` batch, ``C`` context, ``T`` tokens per step (decode ``B``, prefill
``B*C``), ``Hd`` hidden, ``H``/``KVH`` heads, ``D`` head_dim, ``q = H*D``, ``kv = KVH*D``, ``qkv = q + 2*kv``,
``I`` intermediate.

**Bytes** are the minimum device-memory traffic of each op at the op API's fusion level (what a fused kernel
must move; the unfused torch path moves more, but a fixed count keeps GB/s comparable across fusion levels
and backends): weights read once per layer per step, KV read once, each activation read by its consumer and
written by its producer once. Per layer:

- ``decode_attention``: ``2*T*q*e`` (q in, out) + ``2*B*C*kv*e`` (K and V of all ``C`` tokens)
- ``prefill_attention``: ``T*qkv*e`` (q, k, v in) + ``T*q*e`` (out)
- ``gate_up_act``: ``2*I*Hd*e`` (weights) + ``T*Hd*e`` (in) + ``T*I*e`` (out)
- ``down_proj``: ``I*Hd*e`` + ``T*I*e`` + ``T*Hd*e``
- ``input_norm`` / ``post_attn_norm`` (with residual): ``4*T*Hd*e`` (x, residual in; residual, out) + ``Hd*e``
- ``qkv_proj``: ``qkv*Hd*e`` + ``T*Hd*e`` + ``T*qkv*e``
- ``rope_kv_append``: ``2*T*(q+kv)*e`` (q, k rotated in place) + ``T*kv*e`` (v in) + ``2*T*kv*e`` (cache)
- ``o_proj``: ``q*Hd*e`` + ``T*q*e`` + ``T*Hd*e``

Index tensors (block table, seq_lens, positions, slots) and the cos/sin table are left out: each is well
under 1% of a layer.

**FLOPs** count matmuls and attention only (2 per multiply-add): ``qkv_proj`` ``2*T*Hd*qkv``, ``o_proj``
``2*T*q*Hd``, ``gate_up_act`` ``4*T*Hd*I``, ``down_proj`` ``2*T*I*Hd``, ``decode_attention`` ``4*B*H*C*D``
(QK and PV), ``prefill_attention`` ``2*B*C**2*H*D`` (= 2·2·S²·D·H/2 per sequence: causal, half the square,
as in ANCHORS.md). Norms, rotary and activations are not counted.

A stream step is ``L`` layers, so ``bytes_per_step = L * bytes_per_layer`` (likewise FLOPs).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..models import ModelShape
from .config import ELEM_BYTES, GIB, WorkloadConfig, check_fields

L2_FACTOR = 4  # the working set of a step must be at least this many times the L2 size
DEFAULT_L2_BYTES = 50 * 2**20  # H100 / H200


@dataclass(frozen=True)
class OpCount:
    """One op of one layer: bytes moved and FLOPs (see the module docstring for the formulas)."""
    name: str
    bytes: int
    flops: int


@dataclass(frozen=True)
class Footprint:
    """Distinct bytes a step touches and allocates: ``own`` per layer (weights, KV cache, per-layer inputs),
    ``shared`` once (activations every layer reuses), ``transient`` the peak of temporaries (the torch
    paths' intermediates; counted whatever the backend, so every backend gets the same layer count)."""
    own_touched: int
    shared_touched: int
    own_alloc: int
    shared_alloc: int
    transient: int


@dataclass(frozen=True)
class StreamPlan:
    config: WorkloadConfig
    model: ModelShape
    layers: int
    layers_reason: str  # "model" | "explicit" | "memory" (reduced to fit) | "l2" (raised past the model's count)
    min_layers: int  # fewest layers whose working set is >= L2_FACTOR x L2
    max_layers: int  # most layers that fit the memory budget
    l2_bytes: int
    tokens_per_step: int
    pages_per_seq: int
    ops: tuple[OpCount, ...]  # per layer, in launch order
    bytes_per_layer: int
    flops_per_layer: int
    bytes_per_step: int
    flops_per_step: int
    working_set_bytes: int  # distinct bytes touched per step
    memory_bytes: int  # tensor memory the stream allocates (estimate incl. transient peaks)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.as_dict()
        d["ops"] = [asdict(o) for o in self.ops]
        return d


def op_counts(m: ModelShape, phase: str, kernel: str, batch: int, context: int, e: int) -> tuple[OpCount, ...]:
    """Per-layer ops of a stream with their bytes and FLOPs."""
    t = batch if phase == "decode" else batch * context
    hd, inter, d = m.hidden, m.intermediate, m.head_dim
    q, kv = m.q_size, m.kv_size
    qkv = q + 2 * kv
    if phase == "decode":
        kv_read = 2 * batch * context * kv
        attn = OpCount("decode_attention", (2 * t * q + kv_read) * e, 4 * batch * m.heads * context * d)
    else:
        attn = OpCount("prefill_attention", (t * qkv + t * q) * e, 2 * batch * context**2 * m.heads * d)
    mlp = (
        OpCount("gate_up_act", (2 * inter * hd + t * hd + t * inter) * e, 4 * t * hd * inter),
        OpCount("down_proj", (inter * hd + t * inter + t * hd) * e, 2 * t * inter * hd),
    )
    if kernel == "attn":
        return (attn,)
    if kernel == "mlp":
        return mlp
    norm = (4 * t * hd + hd) * e
    return (
        OpCount("input_norm", norm, 0),
        OpCount("qkv_proj", (qkv * hd + t * hd + t * qkv) * e, 2 * t * hd * qkv),
        OpCount("rope_kv_append", (2 * t * (q + kv) + 3 * t * kv) * e, 0),
        attn,
        OpCount("o_proj", (q * hd + t * q + t * hd) * e, 2 * t * q * hd),
        OpCount("post_attn_norm", norm, 0),
        *mlp,
    )


def footprint(m: ModelShape, phase: str, kernel: str, batch: int, context: int, e: int, page_size: int) -> Footprint:
    t = batch if phase == "decode" else batch * context
    hd, inter, d = m.hidden, m.intermediate, m.head_dim
    q, kv = m.q_size, m.kv_size
    qkv = q + 2 * kv
    pages = math.ceil(context / page_size)
    cache_alloc = 2 * batch * pages * page_size * kv * e  # K and V pages of one layer
    index_alloc = batch * pages * 4 + batch * 4 + t * 12 + context * d * 4  # tables, positions, slots, cos/sin
    # Transient peaks of the torch paths (the fallback for any op a custom backend lacks).
    decode_gather = cache_alloc + batch * pages * page_size * 8 + 2 * t * q * e  # dense K/V, mask, out
    sdpa = 2 * t * q * e + t * m.heads * 4  # output, its token-major copy, log-sum-exp
    mlp_torch = 4 * t * inter * e  # [T, 2I] GEMM out, act(gate), the product
    small_torch = 4 * t * max(hd, q + kv) * 4 + 2 * t * d * 4  # fp32 temporaries of the unfused norm / rotary
    attn_transient = decode_gather if phase == "decode" else sdpa

    if kernel == "attn":
        if phase == "decode":
            own = 2 * batch * context * kv * e
            return Footprint(own, 2 * t * q * e, cache_alloc, 2 * t * q * e + index_alloc, attn_transient)
        own = t * qkv * e  # each layer has its own q, k, v: attention's inputs, like the KV cache in decode
        return Footprint(own, t * q * e, own, t * q * e, attn_transient)
    weights_mlp = 3 * inter * hd * e
    if kernel == "mlp":
        shared = (2 * t * hd + t * inter) * e
        return Footprint(weights_mlp, shared, weights_mlp, shared, mlp_torch)
    weights = m.params_per_layer() * e
    kv_touched = 2 * batch * context * kv * e if phase == "decode" else 2 * t * kv * e
    shared = (4 * t * hd + t * qkv + t * q + t * inter) * e  # h, residual, normed, o_out, qkv, attn out, mlp mid
    return Footprint(weights + kv_touched, shared, weights + cache_alloc, shared + index_alloc,
                     max(attn_transient, mlp_torch, small_torch))


def plan(config: WorkloadConfig, l2_bytes: int = DEFAULT_L2_BYTES) -> StreamPlan:
    """Size a stream without allocating anything: its layer count, bytes/FLOPs per step, working set, memory.

    Layer count: the model's, unless (a) its working set would be under ``L2_FACTOR`` × ``l2_bytes`` (then
    more layers, repeating the layer shape, so the stream does not run from L2 where an engine would not),
    or (b) it does not fit ``memory_budget_gb`` (then fewer). An explicit ``config.layers`` is used as is.
    Raises ``ValueError`` when no layer count satisfies both, or the explicit one breaks either.
    ``l2_bytes=0`` drops the L2 rule (CPU streams).
    """
    m = check_fields(config)
    e = ELEM_BYTES[config.dtype_name]
    args = (m, config.phase, config.kernel, config.batch, config.context, e)
    ops = op_counts(*args)
    fp = footprint(*args, config.page_size)
    budget = int(config.memory_budget_gb * GIB)
    what = f"{m.name} {config.phase} {config.kernel} batch {config.batch} context {config.context}"

    target = L2_FACTOR * max(int(l2_bytes), 0)
    min_layers = max(1, math.ceil((target - fp.shared_touched) / fp.own_touched)) if target else 1
    max_layers = (budget - fp.shared_alloc - fp.transient) // fp.own_alloc
    if max_layers < 1:
        need = (fp.own_alloc + fp.shared_alloc + fp.transient) / GIB
        raise ValueError(f"{what}: one layer needs {need:.2f} GiB, over the memory budget "
                         f"({config.memory_budget_gb} GiB); lower batch or context, or raise memory_budget_gb")
    if config.layers is not None:
        layers, reason = config.layers, "explicit"
    elif m.layers < min_layers:
        layers, reason = min_layers, "l2"
    elif m.layers > max_layers:
        layers, reason = max_layers, "memory"
    else:
        layers, reason = m.layers, "model"
    if layers > max_layers:
        raise ValueError(f"{what}: {layers} layers need {_gib(fp, layers):.2f} GiB, over the memory budget "
                         f"({config.memory_budget_gb} GiB; at most {max_layers} layers fit)")
    if layers < min_layers:
        hint = ("the memory budget only fits " + str(max_layers)) if reason == "memory" else f"{layers} were asked for"
        raise ValueError(f"{what}: needs at least {min_layers} layers for a working set of {L2_FACTOR}x L2 "
                         f"({target / 2**20:.0f} MiB) but {hint}")

    bytes_layer = sum(o.bytes for o in ops)
    flops_layer = sum(o.flops for o in ops)
    return StreamPlan(
        config=config, model=m, layers=layers, layers_reason=reason, min_layers=min_layers,
        max_layers=max_layers, l2_bytes=int(l2_bytes), tokens_per_step=config.tokens_per_step,
        pages_per_seq=math.ceil(config.context / config.page_size), ops=ops,
        bytes_per_layer=bytes_layer, flops_per_layer=flops_layer,
        bytes_per_step=layers * bytes_layer, flops_per_step=layers * flops_layer,
        working_set_bytes=layers * fp.own_touched + fp.shared_touched,
        memory_bytes=layers * fp.own_alloc + fp.shared_alloc + fp.transient,
    )


def _gib(fp: Footprint, layers: int) -> float:
    return (layers * fp.own_alloc + fp.shared_alloc + fp.transient) / GIB


def validate(config: WorkloadConfig, l2_bytes: int = DEFAULT_L2_BYTES) -> None:
    """Raise ``ValueError`` (one line) for a config no stream can be built for: unknown names, non-positive
    sizes, a shape the kernels do not support, or sizes that do not fit the memory budget with the layer
    count the L2 rule demands. Host-only: needs no GPU."""
    plan(config, l2_bytes)
