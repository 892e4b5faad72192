"""``backend="auto"``: the fastest backend for a device according to the recorded benchmarks.

Records live in ``benchmarks/results/``; the table below is what they showed per device kind (and
is regenerated from them). Where no record decides, the default order prefers compiled kernels.
"""
from __future__ import annotations

import torch

from vtok_kernels import backends

# device type -> backends in order of measured speed; missing ones fall back to DEFAULT_ORDER.
MEASURED_ORDER: dict[str, tuple[str, ...]] = {}
DEFAULT_ORDER = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),  # interpreted Triton is for tests, never picked by "auto"
}


def pick(device: torch.device, dtype: torch.dtype) -> str:
    order = MEASURED_ORDER.get(device.type) or DEFAULT_ORDER.get(device.type, ("torch",))
    for name in order:
        if backends.unavailable_reason(name, device.type) is None and dtype in backends.get(name).dtypes:
            return name
    return "torch"
