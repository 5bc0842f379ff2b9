"""Public kernel API: one module per op family, all backends behind ``backend=``."""
from .decode_attention import DecodeShape, check_decode_inputs, decode_attention
from .dispatch import BACKENDS, has_backend, implementation, register
from .layer import gate_up_act, linear, mlp, rmsnorm, rope_cos_sin_cache, rope_kv_append

__all__ = ["BACKENDS", "DecodeShape", "check_decode_inputs", "decode_attention", "has_backend",
           "implementation", "register", "gate_up_act", "linear", "mlp", "rmsnorm", "rope_cos_sin_cache",
           "rope_kv_append"]
