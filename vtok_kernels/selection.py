"""``backend="auto"``: the fastest backend for a device and op according to the recorded benchmarks.

The records live in ``benchmarks/results/``; ``python -m benchmarks.records`` turns them into
``vtok_kernels/_measured_order.py``: per GPU name and per device kind, per op, the backends that
were measured, fastest first (by the geometric mean over every measured shape of the time over
the fastest backend's time). A GPU's own name is preferred over its kind. Backends that no record
ranks follow in the default order, which prefers compiled kernels; a backend is picked only where
it is available and takes the dtype, and ``torch`` (the reference) is the last resort.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import torch

from vtok_kernels import backends

OPS = ("encode", "encode_varlen", "expand")
DEFAULT_ORDER = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),  # interpreted Triton is for tests, never picked by "auto"
}
# Backends "auto" never picks on a device kind, whatever a record says.
NEVER = {"cpu": ("triton",)}


def _measured_tables() -> tuple[Mapping, Mapping]:
    try:
        from vtok_kernels import _measured_order
    except ImportError:  # no record generated yet
        return {}, {}
    return getattr(_measured_order, "BY_DEVICE", {}), getattr(_measured_order, "BY_KIND", {})


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> Optional[str]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def order(device_type: str, op: str = "encode", device_name: Optional[str] = None,
          by_device: Optional[Mapping] = None, by_kind: Optional[Mapping] = None) -> list[str]:
    """Backends to try for ``op`` on a device, best first: measured on this GPU model, then on
    this device kind, then the default order, then ``torch``. Tables default to the generated
    ``_measured_order`` module."""
    if by_device is None or by_kind is None:
        measured_device, measured_kind = _measured_tables()
        by_device = measured_device if by_device is None else by_device
        by_kind = measured_kind if by_kind is None else by_kind
    candidates: list[str] = []
    sources: Sequence = (
        (by_device.get(device_name, {}) if device_name else {}).get(op, ()),
        by_kind.get(device_type, {}).get(op, ()),
        DEFAULT_ORDER.get(device_type, ()),
        ("torch",),
    )
    for names in sources:
        for name in names:
            if name not in candidates and name in backends.KNOWN_BACKENDS and name not in NEVER.get(device_type, ()):
                candidates.append(name)
    return candidates


def pick(device: torch.device, dtype: torch.dtype, op: str = "encode") -> str:
    """The backend ``"auto"`` runs for ``op`` ("encode", "encode_varlen" or "expand") on
    ``device`` with features of ``dtype``."""
    device = torch.device(device)
    for name in order(device.type, op, _device_name(device)):
        if backends.unavailable_reason(name, device.type) is None and dtype in backends.get(name).dtypes:
            return name
    return "torch"
