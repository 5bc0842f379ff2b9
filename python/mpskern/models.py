"""Model presets: the real shapes of the decoders the production study used (config.json values)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    act: str = "silu"  # MLP activation: SwiGLU ("silu") or GeGLU ("gelu_tanh")
    vocab: int = 0  # informational; streams stop before the LM head

    def __post_init__(self) -> None:
        for field in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "layers"):
            if getattr(self, field) <= 0:
                raise ValueError(f"model {self.name!r}: {field} must be positive, got {getattr(self, field)}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"model {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(f"model {self.name!r}: act must be one of {ACTIVATIONS}, got {self.act!r}")

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def params_per_layer(self) -> int:
        attn = self.hidden * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return attn + mlp + 2 * self.hidden

    def kv_bytes_per_token_per_layer(self, elem_bytes: int = 2) -> int:
        return 2 * self.kv_size * elem_bytes

    def as_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **kw) -> "ModelShape":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


PRESETS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("Qwen2.5-0.5B", 896, 4864, 14, 2, 64, 24, vocab=151936),
        ModelShape("Qwen2.5-1.5B", 1536, 8960, 12, 2, 128, 28, vocab=151936),
        ModelShape("Qwen2.5-3B", 2048, 11008, 16, 2, 128, 36, vocab=151936),
        ModelShape("Qwen2.5-7B", 3584, 18944, 28, 4, 128, 28, vocab=152064),
        ModelShape("Qwen2.5-14B", 5120, 13824, 40, 8, 128, 48, vocab=152064),
        ModelShape("Llama-3.2-1B", 2048, 8192, 32, 8, 64, 16, vocab=128256),
        ModelShape("Llama-3.2-3B", 3072, 8192, 24, 8, 128, 28, vocab=128256),
        ModelShape("Gemma-3-4B", 2560, 10240, 8, 4, 256, 34, act="gelu_tanh", vocab=262208),
    )
}

_ALIASES = {name.lower(): name for name in PRESETS}


def get_model(name: str) -> ModelShape:
    """Look a preset up by name (case-insensitive)."""
    key = name.strip().lower()
    if key in _ALIASES:
        return PRESETS[_ALIASES[key]]
    raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)} (or give a custom shape)")


def custom_model(
    *,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    layers: int,
    act: str = "silu",
    name: str = "custom",
) -> ModelShape:
    """A model shape from explicit numbers (validated like the presets)."""
    return ModelShape(name, hidden, intermediate, heads, kv_heads, head_dim, layers, act=act)
