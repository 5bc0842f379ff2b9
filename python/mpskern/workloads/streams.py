"""Kernel streams: one forward step of ``attn``, ``mlp`` or a whole decoder ``layer`` through L layers.

A stream is built inside a client process on its own buffers. Every layer has its own weights and KV cache
(fresh random values, never zeros), so a step streams its working set from DRAM as an engine does; the
activations are shared by the layers, as in an engine. ``step()`` only enqueues work on the current CUDA
stream: no host sync, no data-dependent Python, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import checks, ops
from ..ops.dispatch import has_backend, implementation
from .config import WorkloadConfig
from .counts import StreamPlan, plan

EPS = 1e-6
ROPE_THETA = 10000.0

# role in the stream -> the mpskern op that runs it (None: torch only, no op registered yet)
ROLE_OPS = {
    "input_norm": "rmsnorm",
    "qkv_proj": "linear",
    "rope_kv_append": "rope_kv_append",
    "decode_attention": "decode_attention",
    "prefill_attention": None,  # torch SDPA until the flash prefill kernel lands
    "o_proj": "linear",
    "post_attn_norm": "rmsnorm",
    "gate_up_act": "gate_up_act",
    "down_proj": "linear",
}
SMALL_ROLES = ("input_norm", "rope_kv_append", "post_attn_norm")  # the ops with two fusion levels


def _usable(op: str, backend: str, device: torch.device) -> bool:
    """Can ``backend`` run ``op`` on ``device`` in this process?"""
    if not has_backend(op, backend):
        return False
    if backend == "cuda" and device.type != "cuda":
        return False
    if backend == "triton" and device.type != "cuda" and not checks.triton_interpreting():
        return False
    if backend == "cuda":
        try:
            from .. import cuda_backend
        except ImportError:
            return False
        if not cuda_backend.available():  # extension not built: would fail at the first call
            return False
    try:
        implementation(op, backend)  # imports the module: a missing one shows up here, not mid-capture
    except (ImportError, NotImplementedError, AttributeError):
        return False
    return True


def resolve_backends(config: WorkloadConfig, roles: tuple[str, ...], device: torch.device) -> dict[str, str]:
    """Backend that runs each role: the config's backend where it has the op, else torch. The small ops
    follow ``fusion`` instead: "unfused" is torch's op sequence, "fused" mpskern's kernels (the config's
    custom backend if it has them, else Triton; torch if neither can run here)."""
    chosen = {}
    for role in roles:
        op = ROLE_OPS[role]
        if role in SMALL_ROLES:
            prefs = [] if config.fusion == "unfused" else [config.backend, "triton"]
        else:
            prefs = [config.backend]
        prefs = [b for b in dict.fromkeys(prefs) if b != "torch"]  # torch is the fallback anyway
        chosen[role] = next((b for b in prefs if op is not None and _usable(op, b, device)), "torch")
    return chosen


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor:
    """Causal GQA attention with torch SDPA over ``B`` sequences of equal length: q ``[T, H, D]``, k/v
    ``[T, KVH, D]`` token-major (views into the qkv buffer) → ``[T, H*D]``."""
    t, h, d = q.shape
    s = t // batch

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, s, x.shape[1], d).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                       enable_gqa=k.shape[1] != h)
    return o.transpose(1, 2).reshape(t, h * d)  # a view when SDPA's output is token-major (flash, cuDNN)


class Stream:
    """One forward step of a workload through ``layers`` layers; see :func:`build_stream`."""

    def __init__(self, config: WorkloadConfig, stream_plan: StreamPlan, device: torch.device, seed: int = 0):
        self.config = config
        self.plan = stream_plan
        self.layers = stream_plan.layers
        self.bytes_per_step = stream_plan.bytes_per_step
        self.flops_per_step = stream_plan.flops_per_step
        self.tokens_per_step = stream_plan.tokens_per_step
        self.device = device
        self.op_backends = resolve_backends(config, tuple(o.name for o in stream_plan.ops), device)
        m = stream_plan.model
        self._m = m
        self._dtype = getattr(torch, config.dtype_name)
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(seed)
        b, c, p = config.batch, config.context, config.page_size
        t = self.tokens_per_step
        self._t = t
        q_size, kv_size = m.q_size, m.kv_size
        self._layers = [SimpleNamespace() for _ in range(self.layers)]
        kind, phase = config.kernel, config.phase
        needs_cache = (phase == "decode" and kind == "attn") or kind == "layer"

        if needs_cache:
            pps = stream_plan.pages_per_seq
            # Shuffled pages: a sequence's KV is scattered over the cache, as after an engine's churn.
            perm = torch.randperm(b * pps, generator=self._gen, device=device)
            self.block_table = perm.view(b, pps).to(torch.int32)
            self.seq_lens = torch.full((b,), c, dtype=torch.int32, device=device)
            for layer in self._layers:
                layer.k_cache = self._rand(b * pps, p, m.kv_heads, m.head_dim)
                layer.v_cache = self._rand(b * pps, p, m.kv_heads, m.head_dim)
        if kind in ("mlp", "layer"):
            for layer in self._layers:
                layer.w_gate_up = self._rand(2 * m.intermediate, m.hidden, scale=m.hidden ** -0.5)
                layer.w_down = self._rand(m.hidden, m.intermediate, scale=m.intermediate ** -0.5)
            self.mlp_mid = self._empty(t, m.intermediate)

        if kind == "attn" and phase == "decode":
            self.q = self._rand(b, m.heads, m.head_dim)
            self.attn_out = self._empty(b, m.heads, m.head_dim)
        elif kind == "attn":
            # Per-layer q/k/v: attention's inputs are its working set here, as the KV cache is in decode.
            for layer in self._layers:
                layer.qkv = self._rand(t, q_size + 2 * kv_size)
                layer.q, layer.k, layer.v = self._split_qkv(layer.qkv)
        elif kind == "mlp":
            self.x = self._rand(t, m.hidden)
            self.out = self._empty(t, m.hidden)
        else:
            self._build_layer(b, c, p)

    # -- construction helpers ---------------------------------------------------------------------------

    def _rand(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(shape, generator=self._gen, device=self.device, dtype=self._dtype)
        return x.mul_(scale) if scale != 1.0 else x

    def _empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, device=self.device, dtype=self._dtype)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self._m
        q, kv = m.q_size, m.kv_size
        t = qkv.shape[0]
        return (qkv[:, :q].view(t, m.heads, m.head_dim), qkv[:, q:q + kv].view(t, m.kv_heads, m.head_dim),
                qkv[:, q + kv:].view(t, m.kv_heads, m.head_dim))

    def _build_layer(self, b: int, c: int, p: int) -> None:
        m, t, dev = self._m, self._t, self.device
        for layer in self._layers:
            layer.w_input_norm = self._rand(m.hidden, scale=0.1).add_(1.0)
            layer.w_post_norm = self._rand(m.hidden, scale=0.1).add_(1.0)
            layer.w_qkv = self._rand(m.q_size + 2 * m.kv_size, m.hidden, scale=m.hidden ** -0.5)
            layer.w_o = self._rand(m.hidden, m.q_size, scale=m.q_size ** -0.5)
        self.h = self._rand(t, m.hidden)  # layer input, then each layer's MLP output
        self.residual = self._rand(t, m.hidden)
        self.normed = self._empty(t, m.hidden)
        self.qkv = self._empty(t, m.q_size + 2 * m.kv_size)
        self.q, self.k, self.v = self._split_qkv(self.qkv)
        self.o = self._empty(t, m.hidden)
        if self.config.phase == "decode":
            self.attn_out = self._empty(b, m.heads, m.head_dim)
            pos = torch.full((b,), c - 1, dtype=torch.int64, device=dev)  # the new token is the C-th
            rows = pos.view(b, 1)
        else:
            pos = torch.arange(c, device=dev).repeat(b)
            rows = torch.arange(c, device=dev).expand(b, c)
        self.positions = pos
        pages = torch.gather(self.block_table.long(), 1, rows // p)
        self.slot_mapping = (pages * p + rows % p).reshape(-1).to(torch.int32)
        self.cos_sin_cache = ops.rope_cos_sin_cache(c, m.head_dim, theta=ROPE_THETA, device=dev)

    # -- the step -------------------------------------------------------------------------------------

    def step(self) -> None:
        """Enqueue one forward step over all layers on the current CUDA stream (no host sync)."""
        kind = self.config.kernel
        if kind == "attn":
            self._step_attn()
        elif kind == "mlp":
            self._step_mlp()
        else:
            self._step_layer()

    def _attention(self, layer, q, k, v, out) -> torch.Tensor:
        """Attention of one layer → ``[T, H*D]``."""
        if self.config.phase == "decode":
            ops.decode_attention(q, layer.k_cache, layer.v_cache, self.block_table, self.seq_lens, out=out,
                                 backend=self.op_backends["decode_attention"])
            return out.view(out.shape[0], -1)
        return prefill_attention(q, k, v, self.config.batch)

    def _step_attn(self) -> None:
        for layer in self._layers:
            if self.config.phase == "decode":
                self._attention(layer, self.q, None, None, self.attn_out)
            else:
                self._attention(layer, layer.q, layer.k, layer.v, None)

    def _mlp(self, layer, x: torch.Tensor, out: torch.Tensor) -> None:
        b = self.op_backends
        ops.gate_up_act(x, layer.w_gate_up, self._m.act, out=self.mlp_mid, backend=b["gate_up_act"])
        ops.linear(self.mlp_mid, layer.w_down, out=out, backend=b["down_proj"])

    def _step_mlp(self) -> None:
        for layer in self._layers:
            self._mlp(layer, self.x, self.out)

    def _step_layer(self) -> None:
        b = self.op_backends
        for layer in self._layers:
            # residual += h; normed = rmsnorm(residual)
            ops.rmsnorm(self.h, layer.w_input_norm, EPS, residual=self.residual, out=self.normed,
                        backend=b["input_norm"])
            ops.linear(self.normed, layer.w_qkv, out=self.qkv, backend=b["qkv_proj"])
            ops.rope_kv_append(self.q, self.k, self.v, self.positions, self.cos_sin_cache, layer.k_cache,
                               layer.v_cache, self.slot_mapping, backend=b["rope_kv_append"])
            attn = self._attention(layer, self.q, self.k, self.v, getattr(self, "attn_out", None))
            ops.linear(attn, layer.w_o, out=self.o, backend=b["o_proj"])
            ops.rmsnorm(self.o, layer.w_post_norm, EPS, residual=self.residual, out=self.normed,
                        backend=b["post_attn_norm"])
            self._mlp(layer, self.normed, self.h)

    def as_dict(self) -> dict:
        """What a result record needs: the plan (config, layers, bytes, FLOPs) and the backend of each op."""
        return {"plan": self.plan.as_dict(), "op_backends": dict(self.op_backends), "device": str(self.device)}


def build_stream(config: WorkloadConfig, device: str | torch.device = "cuda", seed: int = 0, *,
                 l2_bytes: int | None = None, warmup: bool = True) -> Stream:
    """Build a stream for ``config`` on ``device`` (fresh random buffers from ``seed``).

    ``l2_bytes`` defaults to the device's L2 size (0 on CPU: no L2 rule). With ``warmup`` one step runs
    eagerly, so Triton kernels are compiled and cuBLAS is initialised before any CUDA-graph capture.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if l2_bytes is None:
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    stream = Stream(config, plan(config, l2_bytes), device, seed)
    if warmup:
        stream.step()
    return stream


__all__ = ["Stream", "build_stream", "prefill_attention", "resolve_backends", "ROLE_OPS", "SMALL_ROLES"]
