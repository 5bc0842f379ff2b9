"""Benchmark fixtures: the device ceilings measured once per session, in the same run as every kernel."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ceilings() -> dict:
    from mpskern.device_info import torch_device_properties
    from mpskern.timing import copy_bandwidth_gbs, read_bandwidth_gbs

    return {"copy_gbs": copy_bandwidth_gbs(), "read_gbs": read_bandwidth_gbs(), "device": torch_device_properties()}


@pytest.fixture(scope="session")
def baseline_cache() -> dict:
    """SDPA flash / cuDNN times keyed by shape, so each is measured once per session."""
    return {}
