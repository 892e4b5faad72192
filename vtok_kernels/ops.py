"""torch.library ops (namespace ``vtok``): one fused op forward and one backward per call.

A pybind11 call is opaque to torch.compile; these ops give it a fake (meta) implementation and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through ``encode``
without a graph break. The ``backend`` argument names the registry entry that runs the kernel;
arguments arrive normalised by ``vtok_kernels.api`` (see ``vtok_kernels.backends``).

The API calls ``encode_sequence``, ``encode_varlen_sequence`` and ``expand_frames``: the ops
when anything traces or intercepts the call, else the same bodies without the ops' dispatch
(the eager path at the end of this module; ``VTOK_EAGER_FUNCTIONS=0`` always takes the ops).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.profiler import record_function
from torch.utils import _python_dispatch

from vtok_kernels import backends
from vtok_kernels.reference import num_groups

_EMPTY = (0,)


def _num_key_tokens(num_patches: int, spatial: list[int]) -> int:
    return spatial[0] * spatial[1] if spatial else num_patches


def _lse_like(x: Tensor, rows_shape: tuple, pool: str, num_heads: int) -> Tensor:
    if pool != "attn":
        return x.new_empty(_EMPTY, dtype=torch.float32)
    return x.new_empty((*rows_shape, num_heads), dtype=torch.float32)


def _residual32_like(x: Tensor, rows_shape: tuple, pool: str, num_heads: int, backend: str) -> Tensor:
    """The float32 residual tokens a backend keeps for its backward, or an empty tensor."""
    keeps = backends.get(backend).keeps_residual32
    C = x.shape[-1]
    if keeps is None or not keeps(x.dtype, pool, C, num_heads):
        return x.new_empty(_EMPTY, dtype=torch.float32)
    return x.new_empty((*rows_shape, C), dtype=torch.float32)


def _forward_outputs(outputs: tuple, x: Tensor, pool: str, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sequence, lse, residual32) from a backend's (sequence, lse[, residual32])."""
    sequence, lse, *kept = outputs
    lse = lse if pool == "attn" else _lse_like(x, (), pool, num_heads)
    return sequence, lse, kept[0] if kept else x.new_empty(_EMPTY, dtype=torch.float32)


def _kept(residual32: Tensor) -> dict:
    # only a backend that kept the tokens takes them back
    return {"residual32": residual32} if residual32.numel() else {}


def _grad_query_or_empty(grad_query: Optional[Tensor], like: Tensor) -> Tensor:
    # custom ops cannot return None; mean pooling has no query and returns an empty tensor.
    return grad_query if grad_query is not None else like.new_empty(_EMPTY, dtype=torch.float32)


def _like_query(grad_query: Optional[Tensor], query: Optional[Tensor]) -> Optional[Tensor]:
    # Backends return a float32 grad_query; a float64 query (gradcheck) gets its own dtype back.
    if grad_query is None or query is None or grad_query.dtype == query.dtype:
        return grad_query
    return grad_query.to(query.dtype)


# --------------------------------------------------------------------------------------- encode
@torch.library.custom_op("vtok::encode", mutates_args=())
def encode(
    x: Tensor, key_index: Tensor, query: Optional[Tensor], pool: str, num_heads: int,
    frames_per_token: int, spatial: list[int], grid: list[int], backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _encode_forward(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid, backend)


def _encode_forward(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid, backend):
    outputs = backends.get(backend).encode_fwd(
        x, key_index, query, pool, num_heads, frames_per_token, tuple(spatial), tuple(grid)
    )
    return _forward_outputs(outputs, x, pool, num_heads)


@encode.register_fake
def _(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid, backend):
    B, T, N, C = x.shape
    S, G = _num_key_tokens(N, spatial), num_groups(T, frames_per_token)
    return (x.new_empty((B, S + G, C)), _lse_like(x, (B, G), pool, num_heads),
            _residual32_like(x, (B, G), pool, num_heads, backend))


@torch.library.custom_op("vtok::encode_backward", mutates_args=())
def encode_backward(
    grad_sequence: Tensor, x: Tensor, key_index: Tensor, query: Optional[Tensor],
    sequence: Tensor, lse: Tensor, residual32: Tensor, pool: str, num_heads: int,
    frames_per_token: int, spatial: list[int], grid: list[int], backend: str,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_query = _encode_backward(grad_sequence, x, key_index, query, sequence, lse, residual32,
                                          pool, num_heads, frames_per_token, spatial, grid, backend)
    return grad_x, _grad_query_or_empty(grad_query, x)


def _encode_backward(grad_sequence, x, key_index, query, sequence, lse, residual32, pool, num_heads,
                     frames_per_token, spatial, grid, backend):
    """(grad_x, grad_query or None)."""
    grad_x, grad_query = backends.get(backend).encode_bwd(
        grad_sequence.contiguous(), x, key_index, query, sequence, lse, pool, num_heads,
        frames_per_token, tuple(spatial), tuple(grid), **_kept(residual32),
    )
    return grad_x, _like_query(grad_query, query)


@encode_backward.register_fake
def _(grad_sequence, x, key_index, query, sequence, lse, residual32, pool, num_heads,
      frames_per_token, spatial, grid, backend):
    grad_query = query.new_empty(query.shape) if query is not None else None
    return x.new_empty(x.shape), _grad_query_or_empty(grad_query, x)


def _encode_setup(ctx, inputs, output):
    x, key_index, query, pool, num_heads, frames_per_token, spatial, grid, backend = inputs
    sequence, lse, residual32 = output
    ctx.save_for_backward(x, key_index, query, sequence, lse, residual32)
    ctx.options = (pool, num_heads, frames_per_token, spatial, grid, backend)


def _encode_grad(ctx, grad_sequence, grad_lse, grad_residual32):
    x, key_index, query, sequence, lse, residual32 = ctx.saved_tensors
    grad_x, grad_query = encode_backward(grad_sequence, x, key_index, query, sequence, lse,
                                         residual32, *ctx.options)
    return grad_x, None, (grad_query if query is not None else None), None, None, None, None, None, None


encode.register_autograd(_encode_grad, setup_context=_encode_setup)


# -------------------------------------------------------------------------------- encode_varlen
@torch.library.custom_op("vtok::encode_varlen", mutates_args=())
def encode_varlen(
    x: Tensor, cu_frames: Tensor, cu_tokens: Tensor, key_index: Tensor, query: Optional[Tensor],
    pool: str, num_heads: int, frames_per_token: int, spatial: list[int], grid: list[int],
    max_frames: int, total_tokens: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _encode_varlen_forward(x, cu_frames, cu_tokens, key_index, query, pool, num_heads,
                                  frames_per_token, spatial, grid, max_frames, total_tokens, backend)


def _encode_varlen_forward(x, cu_frames, cu_tokens, key_index, query, pool, num_heads, frames_per_token,
                           spatial, grid, max_frames, total_tokens, backend):
    outputs = backends.get(backend).encode_varlen_fwd(
        x, cu_frames, cu_tokens, key_index, query, pool, num_heads, frames_per_token,
        tuple(spatial), tuple(grid), max_frames, total_tokens,
    )
    return _forward_outputs(outputs, x, pool, num_heads)


@encode_varlen.register_fake
def _(x, cu_frames, cu_tokens, key_index, query, pool, num_heads, frames_per_token, spatial, grid,
      max_frames, total_tokens, backend):
    F, N, C = x.shape
    S = _num_key_tokens(N, spatial)
    num_videos = cu_frames.shape[0] - 1
    rows = (total_tokens - num_videos * S,)
    return (x.new_empty((total_tokens, C)), _lse_like(x, rows, pool, num_heads),
            _residual32_like(x, rows, pool, num_heads, backend))


@torch.library.custom_op("vtok::encode_varlen_backward", mutates_args=())
def encode_varlen_backward(
    grad_sequence: Tensor, x: Tensor, cu_frames: Tensor, cu_tokens: Tensor, key_index: Tensor,
    query: Optional[Tensor], sequence: Tensor, lse: Tensor, residual32: Tensor, pool: str,
    num_heads: int, frames_per_token: int, spatial: list[int], grid: list[int], max_frames: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_query = _encode_varlen_backward(
        grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse, residual32, pool,
        num_heads, frames_per_token, spatial, grid, max_frames, backend)
    return grad_x, _grad_query_or_empty(grad_query, x)


def _encode_varlen_backward(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse,
                            residual32, pool, num_heads, frames_per_token, spatial, grid, max_frames,
                            backend):
    """(grad_x, grad_query or None)."""
    grad_x, grad_query = backends.get(backend).encode_varlen_bwd(
        grad_sequence.contiguous(), x, cu_frames, cu_tokens, key_index, query, sequence, lse,
        pool, num_heads, frames_per_token, tuple(spatial), tuple(grid), max_frames, **_kept(residual32),
    )
    return grad_x, _like_query(grad_query, query)


@encode_varlen_backward.register_fake
def _(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse, residual32, pool,
      num_heads, frames_per_token, spatial, grid, max_frames, backend):
    grad_query = query.new_empty(query.shape) if query is not None else None
    return x.new_empty(x.shape), _grad_query_or_empty(grad_query, x)


def _varlen_setup(ctx, inputs, output):
    (x, cu_frames, cu_tokens, key_index, query, pool, num_heads, frames_per_token, spatial, grid,
     max_frames, total_tokens, backend) = inputs
    sequence, lse, residual32 = output
    ctx.save_for_backward(x, cu_frames, cu_tokens, key_index, query, sequence, lse, residual32)
    ctx.options = (pool, num_heads, frames_per_token, spatial, grid, max_frames, backend)


def _varlen_grad(ctx, grad_sequence, grad_lse, grad_residual32):
    x, cu_frames, cu_tokens, key_index, query, sequence, lse, residual32 = ctx.saved_tensors
    grad_x, grad_query = encode_varlen_backward(
        grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse, residual32,
        *ctx.options
    )
    grad_query = grad_query if query is not None else None
    return (grad_x, None, None, None, grad_query) + (None,) * 8


encode_varlen.register_autograd(_varlen_grad, setup_context=_varlen_setup)


# --------------------------------------------------------------------------------------- expand
@torch.library.custom_op("vtok::expand", mutates_args=())
def expand(
    key_tokens: Tensor, residual_tokens: Tensor, key_index: Tensor, num_frames: int,
    frames_per_token: int, backend: str,
) -> Tensor:
    return _expand_forward(key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend)


def _expand_forward(key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend):
    return backends.get(backend).expand_fwd(key_tokens, residual_tokens, key_index, num_frames, frames_per_token)


@expand.register_fake
def _(key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend):
    B, N, C = key_tokens.shape
    return key_tokens.new_empty((B, num_frames, N, C))


@torch.library.custom_op("vtok::expand_backward", mutates_args=())
def expand_backward(
    grad_frames: Tensor, key_index: Tensor, num_residual: int, frames_per_token: int, backend: str
) -> tuple[Tensor, Tensor]:
    return _expand_backward(grad_frames, key_index, num_residual, frames_per_token, backend)


def _expand_backward(grad_frames, key_index, num_residual, frames_per_token, backend):
    return backends.get(backend).expand_bwd(grad_frames.contiguous(), key_index, num_residual, frames_per_token)


@expand_backward.register_fake
def _(grad_frames, key_index, num_residual, frames_per_token, backend):
    B, T, N, C = grad_frames.shape
    return grad_frames.new_empty((B, N, C)), grad_frames.new_empty((B, num_residual, C))


def _expand_setup(ctx, inputs, output):
    key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend = inputs
    ctx.save_for_backward(key_index)
    ctx.options = (residual_tokens.shape[1], frames_per_token, backend)


def _expand_grad(ctx, grad_frames):
    (key_index,) = ctx.saved_tensors
    grad_key, grad_residual = expand_backward(grad_frames, key_index, *ctx.options)
    return grad_key, grad_residual, None, None, None, None


expand.register_autograd(_expand_grad, setup_context=_expand_setup)


# ----------------------------------------------------------------------------------- eager path
# In eager mode on plain tensors, the torch.library dispatch of a custom op with a registered
# autograd formula costs more host time than a small launch takes on the GPU (argument schema
# checks, fill_defaults, the generated autograd node). There the API runs the same bodies under
# one torch.autograd.Function instead: the same backends, the same bits, about 60 % of the
# host time. Tracing (torch.compile, export, torch.jit.trace), torch dispatch modes, tensor
# subclasses, functorch transforms, batched gradients and meta tensors keep the ops, which carry
# the fake implementations and the schema those need; so does a backward under create_graph,
# whose backward op raises where a second derivative reaches it.
def eager_functions_enabled(environ=os.environ) -> bool:
    value = environ.get("VTOK_EAGER_FUNCTIONS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"VTOK_EAGER_FUNCTIONS: expected 0 (always the ops) or 1 (default), got {value!r}")
    return value == "1"


EAGER_FUNCTIONS = eager_functions_enabled()


# The devices whose tensors hold data the backends read (meta tensors take the ops' fakes).
_EAGER_DEVICES = ("cpu", "cuda")


# Plain tensors: a subclass may intercept torch's dispatch (DTensor, FakeTensor, TwoTensor)
# without overriding __torch_function__, which has_torch_function would see; and autograd's
# batched gradients (is_grads_batched, vectorized jacobians) are plain Tensors holding no data.
_PLAIN = (Tensor, torch.nn.Parameter)
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None) or (
    lambda t: "Batched" in str(torch._C._dispatch_keys(t)))


def _plain(t: Optional[Tensor]) -> bool:
    return t is None or (type(t) in _PLAIN and not _legacy_batched(t))


def _eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may bypass the ops: nothing traces or intercepts it (``tensors``: its
    tensor arguments, the features first)."""
    return (EAGER_FUNCTIONS
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not _python_dispatch.is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active()
            and not torch.overrides.has_torch_function(tensors)
            and all(_plain(t) for t in tensors)
            and tensors[0].device.type in _EAGER_DEVICES)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _profiled(name: str):
    """The op's name in torch.profiler traces, at no cost when no profiler runs."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


def _first(outputs: tuple) -> Tensor:
    return outputs[0]


def _whole(output: Tensor) -> Tensor:
    return output


class _Eager(NamedTuple):
    """An op's eager path: its name, the bodies the op runs, the backward op, its
    autograd.Function, and for encode the count of leading tensor arguments (x first, query
    last) and the options its backward takes of the forward's."""

    name: str
    forward: Callable
    backward: Callable
    backward_op: Callable
    function: type
    tensors: int = 0
    backward_options: Callable[[tuple], tuple] = tuple
    result: Callable = _first  # what the API takes of the op's outputs


def _backward_of(eager: _Eager, grad: Tensor, saved: tuple, options: tuple) -> tuple:
    """The backward body on the eager path, else the backward op: under create_graph (grad mode
    on in a backward), whose missing autograd formula raises wherever a second derivative reaches
    it, as on the ops path; or where the backward is intercepted (a batched backward runs it
    under vmap)."""
    if torch.is_grad_enabled() or not _eager(grad, *saved):
        return eager.backward_op(grad, *saved, *options)
    with _profiled(eager.name + "_backward"):
        return eager.backward(grad, *saved, *options)


class _EncodeFunction(torch.autograd.Function):
    """Both encode ops: apply(eager, x, ..., query, *options) -> sequence. The op's other outputs
    (lse, residual32) stay saved for the backward: returning them costs autograd their wrapping."""

    @staticmethod
    def forward(ctx, eager, *args):
        inputs, options = args[:eager.tensors], args[eager.tensors:]
        with _profiled(eager.name):
            sequence, lse, residual32 = eager.forward(*args)
        ctx.save_for_backward(*inputs, sequence, lse, residual32)
        ctx.eager, ctx.options, ctx.trailing = eager, eager.backward_options(options), len(options)
        return sequence

    @staticmethod
    def backward(ctx, grad_sequence):
        eager, saved = ctx.eager, ctx.saved_tensors
        grad_x, grad_query = _backward_of(eager, grad_sequence, saved, ctx.options)
        if saved[eager.tensors - 1] is None:  # mean pooling: the op returns an empty grad_query
            grad_query = None
        between = (None,) * (eager.tensors - 2)
        return (None, grad_x, *between, grad_query) + (None,) * ctx.trailing


class _ExpandFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eager, key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend):
        with _profiled(eager.name):
            frames = eager.forward(key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend)
        ctx.save_for_backward(key_index)
        ctx.eager, ctx.options = eager, (residual_tokens.shape[1], frames_per_token, backend)
        return frames

    @staticmethod
    def backward(ctx, grad_frames):
        grad_key, grad_residual = _backward_of(ctx.eager, grad_frames, ctx.saved_tensors, ctx.options)
        return None, grad_key, grad_residual, None, None, None, None


def _varlen_backward_options(options: tuple) -> tuple:
    pool, num_heads, frames_per_token, spatial, grid, max_frames, _total_tokens, backend = options
    return pool, num_heads, frames_per_token, spatial, grid, max_frames, backend


_ENCODE = _Eager("vtok::encode", _encode_forward, _encode_backward, encode_backward, _EncodeFunction,
                 tensors=3)
_ENCODE_VARLEN = _Eager("vtok::encode_varlen", _encode_varlen_forward, _encode_varlen_backward,
                        encode_varlen_backward, _EncodeFunction, tensors=5,
                        backward_options=_varlen_backward_options)
_EXPAND = _Eager("vtok::expand", _expand_forward, _expand_backward, expand_backward, _ExpandFunction,
                 result=_whole)


def _refuse_tangents(name: str, differentiable: tuple) -> None:
    """Forward-mode AD has no formula here: a tangent would be dropped silently."""
    if forward_ad._current_level < 0:
        return
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in differentiable):
        raise NotImplementedError(f"{name}: forward-mode AD (dual tensors, jvp) is not implemented; "
                                  "use reverse mode (backward, torch.autograd.grad)")


def _call(op, eager: _Eager, args: tuple, inputs: tuple, differentiable: tuple):
    """The first output of ``op(*args)`` (its only one for expand): from the op when anything may
    trace or intercept the call (``inputs``: its tensors), else from the op's body, under the
    eager path's autograd.Function where an input of ``differentiable`` needs a gradient."""
    _refuse_tangents(eager.name, differentiable)
    if not _eager(*inputs):
        return eager.result(op(*args))
    if _needs_grad(*differentiable):
        return eager.function.apply(eager, *args)
    with _profiled(eager.name):
        return eager.result(eager.forward(*args))


def encode_sequence(x: Tensor, key_index: Tensor, query: Optional[Tensor], pool: str, num_heads: int,
                    frames_per_token: int, spatial: list[int], grid: list[int], backend: str) -> Tensor:
    """The sequence of ``vtok::encode``, differentiable in x and query."""
    args = (x, key_index, query, pool, num_heads, frames_per_token, spatial, grid, backend)
    return _call(encode, _ENCODE, args, (x, key_index, query), (x, query))


def encode_varlen_sequence(x: Tensor, cu_frames: Tensor, cu_tokens: Tensor, key_index: Tensor,
                           query: Optional[Tensor], pool: str, num_heads: int, frames_per_token: int,
                           spatial: list[int], grid: list[int], max_frames: int, total_tokens: int,
                           backend: str) -> Tensor:
    """The sequence of ``vtok::encode_varlen``, differentiable in x and query."""
    args = (x, cu_frames, cu_tokens, key_index, query, pool, num_heads, frames_per_token, spatial, grid,
            max_frames, total_tokens, backend)
    return _call(encode_varlen, _ENCODE_VARLEN, args, (x, cu_frames, cu_tokens, key_index, query), (x, query))


def expand_frames(key_tokens: Tensor, residual_tokens: Tensor, key_index: Tensor, num_frames: int,
                  frames_per_token: int, backend: str) -> Tensor:
    """``vtok::expand``, differentiable in both token tensors."""
    args = (key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend)
    return _call(expand, _EXPAND, args, (key_tokens, residual_tokens, key_index), (key_tokens, residual_tokens))
