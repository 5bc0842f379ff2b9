"""Shared test set-up: GPU tests (marker ``gpu``) skip cleanly where no CUDA device is visible."""
from __future__ import annotations

import os

import pytest
import torch

# One Triton mode per process: @triton.jit picks the CPU interpreter when a kernel (or Triton's own library)
# is defined, and interpreted and compiled kernels cannot call each other. Without a GPU the whole suite
# runs the Triton kernels on the interpreter (the CPU tests of them, fp16/fp32 only: it computes bf16
# wrongly); with a GPU everything is compiled and the interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETING:
    from triton.runtime import interpreter as _interp

    _patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor_numpy24(tensor, scope):
        """Triton 3.6's interpreter converts scalars with int() of a 1-element array, which NumPy >= 2.4
        refuses, breaking every loop with a runtime bound (triton-lang/triton#9171, fixed after 3.6)."""
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor_numpy24


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA device visible (or TRITON_INTERPRET=1)")
    no_interp = pytest.mark.skip(reason="Triton CPU-interpreter test: runs where no GPU is visible")
    for item in items:
        if "gpu" in item.keywords and (INTERPRETING or not torch.cuda.is_available()):
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(no_interp)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf, so it never passes."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    """A fake ``nvidia-cuda-mps-control`` first on PATH (CPU tests of the daemon lifecycle); fails the test
    if a daemon is left behind."""
    from mpskern import mps
    from mpskern.driver_fakes import leftover_daemons, write_fake_control_binary

    write_fake_control_binary(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    yield
    assert not leftover_daemons(), "a test left an MPS daemon behind"
