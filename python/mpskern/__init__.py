"""mpskern: how much throughput NVIDIA MPS buys when several processes share one GPU for small-LLM
inference, measured at kernel level."""
from __future__ import annotations

__version__ = "0.1.0"
