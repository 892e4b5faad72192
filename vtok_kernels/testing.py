"""What "right" means for a kernel of this package, shared by the test suite and the GPU proof.

DESIGN section 5: the relative error ``||out - ref|| / ||ref||`` against the float64 reference,
within a bound per dtype of the kernel's input.
"""
from __future__ import annotations

import torch

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (the absolute error where ref is all zeros)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err
