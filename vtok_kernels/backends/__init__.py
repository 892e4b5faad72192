"""Backend registry: every backend implements the same six functions on normalised arguments.

The public API (``vtok_kernels.api``) validates and normalises user input, then calls the
``torch.library`` ops of ``vtok_kernels.ops``, which look the backend up here. Adding a backend
adds a module that calls :func:`register`; neither ``api.py`` nor ``ops.py`` changes.

Normalised arguments (the API guarantees them before any backend runs):

* ``x``: ``[B, T, N, C]`` (batched) or ``[F, N, C]`` (varlen, frames packed), float16 /
  bfloat16 / float32 (float64 where the backend says so), channel stride 1, any other strides.
* ``key_index``: int64 ``[B]`` on x's device, already in ``[0, T_b)``.
* ``query``: float32 ``[C]`` contiguous (float64 when x is float64; a backend may compute in
  float32 and return a float32 gradient), or ``None`` when ``pool == "mean"``.
* ``pool``: ``"mean"`` or ``"attn"``; ``num_heads`` >= 1 divides C (1 for mean).
* ``spatial``: ``()`` for no spatial pooling (S = N key tokens) or ``(h, w)``; then ``grid`` is
  ``(H, W)`` with H*W = N, h <= H, w <= W, and S = h*w. ``grid`` is ``()`` otherwise.
* varlen: ``cu_frames`` / ``cu_tokens`` int64 ``[B+1]`` on x's device, ``max_frames`` and
  ``total_tokens`` host ints (``cu_tokens[-1]``). Video b owns frames
  ``cu_frames[b]:cu_frames[b+1]`` and output rows ``cu_tokens[b]:cu_tokens[b+1]``; its groups
  are rows ``cu_tokens[b] - b*S`` onwards of the varlen ``lse``.

Returned tensors: ``sequence`` contiguous ``[B, S+G, C]`` (varlen ``[L, C]``) of x's dtype;
``lse`` float32 ``[B, G, num_heads]`` (varlen ``[sum_b G_b, num_heads]``) holding the
log-sum-exp of the attention scores per group and head, or an empty float32 tensor for mean.
Gradients come back contiguous in the dtype of the tensor they belong to; ``grad_query`` is
float32 ``[C]`` or ``None`` for mean.

A backend whose backward needs the residual tokens as they were before rounding to x's dtype
says so with ``Backend.keeps_residual32(dtype, pool, channels, num_heads)``: where that is true
its forward returns a third tensor, ``residual32`` float32 ``[B, G, C]`` (varlen
``[sum_b G_b, C]``), and its backward takes it back as the keyword ``residual32``.

Signatures (keyword names are part of the contract)::

    encode_fwd(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid)
        -> (sequence, lse)
    encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
               frames_per_token, spatial, grid) -> (grad_x, grad_query)
    encode_varlen_fwd(x, cu_frames, cu_tokens, key_index, query, pool, num_heads,
                      frames_per_token, spatial, grid, max_frames, total_tokens)
        -> (sequence, lse)
    encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse,
                      pool, num_heads, frames_per_token, spatial, grid, max_frames)
        -> (grad_x, grad_query)
    expand_fwd(key_tokens, residual_tokens, key_index, num_frames, frames_per_token) -> frames
    expand_bwd(grad_frames, key_index, num_residual, frames_per_token)
        -> (grad_key_tokens, grad_residual_tokens)

For ``expand``: ``key_tokens`` ``[B, N, C]``, ``residual_tokens`` ``[B, G, C]`` (channel stride
1, same dtype), ``frames`` contiguous ``[B, T, N, C]``; ``grad_frames`` contiguous.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

OPS = (
    "encode_fwd",
    "encode_bwd",
    "encode_varlen_fwd",
    "encode_varlen_bwd",
    "expand_fwd",
    "expand_bwd",
)


@dataclass
class Backend:
    """One backend: its name, the devices it serves, and its implementation of every op.

    ``availability(device_type)`` returns ``None`` when the backend can run there, else the reason
    it cannot and how to get it (shown by ``vtok_kernels.info()`` and in the RuntimeError).
    """

    name: str
    availability: Callable[[str], Optional[str]]
    impls: dict = field(default_factory=dict)
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32)
    loader: str = ""  # how the kernels were obtained (e.g. "extension", "cupy-nvrtc")
    keeps_residual32: Optional[Callable[[torch.dtype, str, int, int], bool]] = None

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        return self.availability(device_type)

    def __getattr__(self, op: str):
        impls = self.__dict__.get("impls", {})
        if op in impls:
            return impls[op]
        raise AttributeError(f"backend {self.__dict__.get('name')!r} has no op {op!r}")


def impls_of(namespace: dict) -> dict:
    """The six ops of a backend module that defines them under their own names:
    ``impls=impls_of(globals())``."""
    return {op: namespace[op] for op in OPS}


_REGISTRY: dict[str, Backend] = {}
_LOAD_ERRORS: dict[str, str] = {}

# Backends in order of preference when no benchmark record decides, and the module of each.
KNOWN_BACKENDS = ("cuda", "triton", "cpu", "torch")
_MODULES = {
    "cuda": "vtok_kernels.backends.cuda",
    "triton": "vtok_kernels.backends.triton",
    "cpu": "vtok_kernels.backends.cpu",
    "torch": "vtok_kernels.backends.eager",
}


def register(backend: Backend) -> Backend:
    missing = [op for op in OPS if op not in backend.impls]
    if missing:
        raise RuntimeError(f"backend {backend.name!r} does not implement {missing}")
    _REGISTRY[backend.name] = backend
    return backend


_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in KNOWN_BACKENDS:
        module = _MODULES[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                _LOAD_ERRORS[name] = f"import of {module} failed: {exc}"
            else:
                _LOAD_ERRORS[name] = "not part of this build"
        except Exception as exc:  # an import must never fail: report it instead
            _LOAD_ERRORS[name] = f"import of {module} failed: {type(exc).__name__}: {exc}"


def get(name: str) -> Backend:
    """The registered backend ``name``; ValueError if unknown, RuntimeError if not loaded."""
    _load_all()
    if name not in KNOWN_BACKENDS:
        raise ValueError(
            f"backend: unknown backend {name!r}; expected one of {('auto',) + KNOWN_BACKENDS}"
        )
    if name not in _REGISTRY:
        raise RuntimeError(f"backend {name!r} is not available: {_LOAD_ERRORS.get(name, 'not loaded')}")
    return _REGISTRY[name]


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None if backend ``name`` runs on ``device_type``, else why not."""
    _load_all()
    if name not in _REGISTRY:
        return _LOAD_ERRORS.get(name, "not loaded")
    return _REGISTRY[name].unavailable_reason(device_type)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest first by default preference."""
    device_type = torch.device(device).type
    return [n for n in KNOWN_BACKENDS if unavailable_reason(n, device_type) is None]


# Tests set this so that every output a backend allocates starts as NaN (integers as -1): an
# element a kernel forgot to write shows up instead of passing as stale memory.
POISON_OUTPUTS = False


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocates a kernel output (sequence, lse, gradients, workspace). Every backend allocates
    through this, never torch.empty directly, so the tests can poison what kernels must write."""
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
