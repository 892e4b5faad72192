"""Helpers shared by the test files: tolerances, random inputs, backend/device selection."""
from __future__ import annotations

import copy
from typing import Callable

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


def assert_one_patch_query_grad_vanishes(grad_query: torch.Tensor, x: torch.Tensor, grad_residual: torch.Tensor,
                                          num_heads: int, what: str) -> None:
    """With one patch (x [B, T, 1, C]) the softmax is constant and grad_query exactly zero: a sum
    of terms p <grad r, d> d minus <grad r, r> r that cancel. Its error is measured against the
    size of those terms, |grad r| |d|^2 / sqrt(c) per token (a relative error against a zero
    reference would be an absolute one). Rounding r to 16 bits before <grad r, r> leaves ~1e-4
    of that size; float32 arithmetic leaves ~1e-8."""
    x = x.detach().double().flatten(2)
    d_max = (x[:, :, None] - x[:, None, :]).norm(dim=-1).max().item()
    head_dim = x.shape[-1] // num_heads
    scale = grad_residual.double().norm(dim=-1).sum().item() * d_max ** 2 / head_dim ** 0.5
    err = grad_query.double().norm().item()
    assert err <= 1e-6 * scale, f"{what}: |grad_query| {err:.3g} > 1e-6 x {scale:.3g}, the size of its terms"


def fresh_copies(build: Callable):
    """``fresh(key)``: a deep copy of ``build(key)``, which runs once per key and session (the
    integration tests' tiny models take seconds to build, and each test may change its copy)."""
    built: dict = {}

    def fresh(key):
        if key not in built:
            built[key] = build(key)
        return copy.deepcopy(built[key])

    return fresh


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


def check_expand(backend: str, device, batch: int, num_patches: int, channels: int, key_index,
                 num_frames: int, frames_per_token: int, what: str) -> tuple:
    """vk.expand forward and backward in float32 against the float64 reference; returns
    (frames, grad of the key tokens, grad of the residual tokens)."""
    import vtok_kernels as vk
    from vtok_kernels import reference

    groups = reference.num_groups(num_frames, frames_per_token)
    key_tokens = features((batch, num_patches, channels), torch.float32, device).requires_grad_(True)
    residual = features((batch, groups, channels), torch.float32, device).requires_grad_(True)
    frames = vk.expand(key_tokens, residual, key_index, num_frames, frames_per_token, backend=backend)
    grad = torch.randn_like(frames)
    frames.backward(grad)
    k64 = key_tokens.detach().double().requires_grad_(True)
    r64 = residual.detach().double().requires_grad_(True)
    ref = reference.expand(k64, r64, key_index, num_frames, frames_per_token)
    ref.backward(grad.double())
    assert_close(frames, ref.detach(), torch.float32, f"{what}: expand")
    assert_close(key_tokens.grad, k64.grad, torch.float32, f"{what}: expand grad key")
    assert_close(residual.grad, r64.grad, torch.float32, f"{what}: expand grad residual")
    return frames, key_tokens.grad, residual.grad
