"""The ``triton`` backend: fused Triton kernels for every op (see ``encode.py``, ``expand.py``).

Runs on CUDA devices, and on the CPU only under ``TRITON_INTERPRET=1`` (the interpreter, for
CI). Importing this module never imports the kernels: they load on the first call, so a missing
or broken Triton is reported by ``availability`` instead of failing ``import vtok_kernels``.

CUDA graphs. The first call of a kernel for a new autotune key (N, C, the number of heads and
the tensors' dtypes; not the batch or the frame count) benchmarks its configs, which
synchronises the device and so cannot run under ``torch.cuda.graph`` capture. Capture works
either after one eager call with each shape to be captured (the warm-up torch's CUDA-graph docs
ask for anyway, which also compiles the kernels for those shapes;
``torch.cuda.make_graphed_callables`` and ``torch.compile(mode="reduce-overhead")`` make such
calls themselves), or with ``VTOK_TRITON_AUTOTUNE=0``, which launches each kernel's default
config without benchmarking (``configs.py``). A key first met during capture raises a
``RuntimeError`` that says this, before the autotuner runs (``launch.py``).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from vtok_kernels.backends import Backend, register, triton_interpreted

_KERNEL_MODULES = {
    "encode_fwd": "encode",
    "encode_bwd": "encode",
    "encode_varlen_fwd": "encode",
    "encode_varlen_bwd": "encode",
    "expand_fwd": "expand",
    "expand_bwd": "expand",
}


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # any failure means: not usable here
        return f"triton cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
    return None


def availability(device_type: str) -> Optional[str]:
    error = _triton_import_error()
    if error is not None:
        return error
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        if triton_interpreted():
            return "TRITON_INTERPRET=1 is set: Triton runs its CPU interpreter, not the GPU"
        return None
    if device_type == "cpu":
        if triton_interpreted():
            return None
        return ("Triton runs on the CPU only under its interpreter: set TRITON_INTERPRET=1 "
                "before Python starts (slow; meant for tests)")
    return f"Triton kernels run on cuda devices, not {device_type!r}"


def _lazy(op: str):
    def call(*args, **kwargs):
        module = importlib.import_module(f"{__name__}.{_KERNEL_MODULES[op]}")
        return getattr(module, op)(*args, **kwargs)

    call.__name__ = op
    call.__qualname__ = f"triton.{op}"
    return call


def keeps_residual32(dtype: torch.dtype, pool: str, channels: int, num_heads: int) -> bool:
    """Attention pooling's forward keeps its residual tokens in float32, in every dtype: the
    backward reads them (encode.keeps_residual32)."""
    return pool == "attn"


BACKEND = register(Backend(
    name="triton",
    availability=availability,
    impls={op: _lazy(op) for op in _KERNEL_MODULES},
    keeps_residual32=keeps_residual32,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    loader="triton-interpreter" if triton_interpreted() else "triton-jit",
))
