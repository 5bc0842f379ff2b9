"""What a workload is: (model, phase, kernel, batch, context, backend, fusion, ...), and its checks.

Everything here is host-only (no CUDA, no allocation), so the driver can validate configurations and plan
streams without creating a CUDA context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .. import checks
from ..models import ModelShape, get_model
from ..ops.dispatch import BACKENDS

PHASES = ("decode", "prefill")
KERNELS = ("attn", "mlp", "layer")
FUSIONS = ("unfused", "fused")
DTYPES = ("bfloat16", "float16")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}
ELEM_BYTES = {"bfloat16": 2, "float16": 2}
GIB = 2**30  # memory_budget_gb is in GiB, like torch's and nvidia-smi's memory figures


@dataclass(frozen=True)
class WorkloadConfig:
    """One workload. Frozen and picklable (it travels to spawned clients); ``as_dict``/``from_dict`` give its
    JSON form. The layer count a stream gets is decided by :func:`mpskern.workloads.plan`."""

    model: str = "Qwen2.5-0.5B"  # preset name (mpskern.models.get_model); ignored when `shape` is given
    phase: str = "decode"  # "decode" | "prefill"
    kernel: str = "attn"  # "attn" | "mlp" | "layer"
    batch: int = 64  # decode: sequences; prefill: sequences of `context` tokens each
    context: int = 512  # decode: KV length per sequence (the new token included); prefill: prompt length
    backend: str = "torch"  # "cuda" | "triton" | "torch": preferred backend for every op
    fusion: str = "fused"  # "unfused" (torch small ops) | "fused" (mpskern fused small kernels)
    dtype: str = "bfloat16"
    page_size: int = 16
    layers: int | None = None  # None: the model's layer count, adjusted for L2 and memory_budget_gb
    memory_budget_gb: float = 20.0  # GiB of tensor memory one stream may allocate
    shape: ModelShape | None = None  # custom shape overriding the preset

    def model_shape(self) -> ModelShape:
        return self.shape if self.shape is not None else get_model(self.model)

    @property
    def dtype_name(self) -> str:
        return _DTYPE_ALIASES.get(self.dtype, self.dtype)

    @property
    def tokens_per_step(self) -> int:
        return self.batch if self.phase == "decode" else self.batch * self.context

    def as_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model_shape().name if self.shape is not None else self.model
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadConfig":
        """Inverse of :meth:`as_dict` (unknown keys are an error, so a typo never goes unnoticed)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown workload config keys: {sorted(unknown)}")
        kw = dict(d)
        if isinstance(kw.get("shape"), dict):
            kw["shape"] = ModelShape(**kw["shape"])
        return cls(**kw)


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _one_of(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def check_fields(config: WorkloadConfig) -> ModelShape:
    """Field-by-field checks (no sizing); returns the model shape."""
    if not isinstance(config, WorkloadConfig):
        raise TypeError(f"config must be a WorkloadConfig; got {type(config).__name__}")
    if config.shape is not None and not isinstance(config.shape, ModelShape):
        raise ValueError(f"shape must be a ModelShape; got {type(config.shape).__name__}")
    shape = config.model_shape()  # ValueError naming the presets for an unknown model
    _one_of("phase", config.phase, PHASES)
    _one_of("kernel", config.kernel, KERNELS)
    _one_of("backend", config.backend, BACKENDS)
    _one_of("fusion", config.fusion, FUSIONS)
    _one_of("dtype", config.dtype_name, DTYPES)
    _positive_int("batch", config.batch)
    _positive_int("context", config.context)
    _positive_int("page_size", config.page_size)
    checks.page_size(config.page_size)
    if config.layers is not None:
        _positive_int("layers", config.layers)
    budget = config.memory_budget_gb
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not budget > 0:
        raise ValueError(f"memory_budget_gb must be a positive number; got {budget!r}")
    checks.head_dim(shape.head_dim)  # what the attention kernels support
    return shape
