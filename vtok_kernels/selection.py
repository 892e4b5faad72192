"""``backend="auto"``: the fastest backend for a device kind and op according to the recorded
benchmarks.

The records live in ``benchmarks/results/``; ``python -m benchmarks.records`` turns them into
``vtok_kernels/_measured_order.py``: per device kind ("cpu", "cuda") and op, the backends that
were measured, fastest first (by the geometric mean over every measured shape and GPU of the time
over the fastest backend's time). Backends that no record ranks follow in the default order,
which prefers compiled kernels; a backend is picked only where it is available and takes the
dtype, and ``torch`` (the reference) is the last resort.

``pick`` also runs inside ``torch.compile(fullgraph=True)`` traces of ``vk.encode``, where its
answer is a constant of the trace.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from vtok_kernels import backends

try:
    from vtok_kernels._measured_order import BY_KIND as MEASURED_ORDER
except ImportError:  # no record generated yet: the default order decides
    MEASURED_ORDER: Mapping = {}

OPS = ("encode", "encode_varlen", "expand")
DEFAULT_ORDER = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
# Backends "auto" never picks on a device kind, whatever a record says: Triton on the CPU is its
# interpreter, meant for tests.
NEVER = {"cpu": ("triton",)}


def order(device_type: str, op: str = "encode", measured: Optional[Mapping] = None) -> list[str]:
    """Backends to try for ``op`` on a device kind, best first: as measured (``measured``, by
    default the generated table), then the default order, then ``torch``."""
    measured = MEASURED_ORDER if measured is None else measured
    candidates: list[str] = []
    for names in (measured.get(device_type, {}).get(op, ()), DEFAULT_ORDER.get(device_type, ()), ("torch",)):
        for name in names:
            if name not in candidates and name in backends.KNOWN_BACKENDS and name not in NEVER.get(device_type, ()):
                candidates.append(name)
    return candidates


# The answer depends on constants only (tables, the registry, what this machine has): a traced
# call runs it once at trace time instead of tracing the registry's imports.
@torch.compiler.assume_constant_result
def _pick(device_type: str, dtype: torch.dtype, op: str) -> str:
    for name in order(device_type, op):
        if backends.unavailable_reason(name, device_type) is None and dtype in backends.get(name).dtypes:
            return name
    return "torch"


def pick(device: torch.device, dtype: torch.dtype, op: str = "encode") -> str:
    """The backend ``"auto"`` runs for ``op`` ("encode", "encode_varlen" or "expand") on
    ``device`` with features of ``dtype``."""
    return _pick(device.type, dtype, op)
