"""Helpers shared by the test files: tolerances, random inputs, backend/device selection."""
from __future__ import annotations

import pytest
import torch

from vtok_kernels import backends
# DESIGN section 5: relative error ||out - ref|| / ||ref|| against the float64 reference.
from vtok_kernels.testing import TOLERANCE, rel_err  # noqa: F401

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an element left unwritten?)"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:.0e} ({dtype})"


def features(shape, dtype, device="cpu", generator=None) -> torch.Tensor:
    """Random frame features: a shared per-patch signal plus per-frame motion, like an encoder's."""
    base = torch.randn(shape, generator=generator, dtype=torch.float32)
    return base.to(device=device, dtype=dtype)


def backend_device(name: str) -> str:
    """The device a backend is tested on here, or skip the test with the backend's own reason."""
    device = "cuda" if name in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend: needs a CUDA device")
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable on {device}: {reason}")
    return device


def backend_dtypes(name: str) -> tuple:
    return tuple(d for d in backends.get(name).dtypes)
