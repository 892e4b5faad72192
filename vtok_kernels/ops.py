"""torch.library ops (namespace ``vtok``): one fused op forward and one backward per call.

A pybind11 call is opaque to torch.compile; these ops give it a fake (meta) implementation and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through ``encode``
without a graph break. The ``backend`` argument names the registry entry that runs the kernel;
arguments arrive normalised by ``vtok_kernels.api`` (see ``vtok_kernels.backends``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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
    grad_x, grad_query = backends.get(backend).encode_bwd(
        grad_sequence.contiguous(), x, key_index, query, sequence, lse, pool, num_heads,
        frames_per_token, tuple(spatial), tuple(grid), **_kept(residual32),
    )
    return grad_x, _grad_query_or_empty(_like_query(grad_query, query), x)


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
    grad_x, grad_query = backends.get(backend).encode_varlen_bwd(
        grad_sequence.contiguous(), x, cu_frames, cu_tokens, key_index, query, sequence, lse,
        pool, num_heads, frames_per_token, tuple(spatial), tuple(grid), max_frames, **_kept(residual32),
    )
    return grad_x, _grad_query_or_empty(_like_query(grad_query, query), x)


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
    return backends.get(backend).expand_fwd(
        key_tokens, residual_tokens, key_index, num_frames, frames_per_token
    )


@expand.register_fake
def _(key_tokens, residual_tokens, key_index, num_frames, frames_per_token, backend):
    B, N, C = key_tokens.shape
    return key_tokens.new_empty((B, num_frames, N, C))


@torch.library.custom_op("vtok::expand_backward", mutates_args=())
def expand_backward(
    grad_frames: Tensor, key_index: Tensor, num_residual: int, frames_per_token: int, backend: str
) -> tuple[Tensor, Tensor]:
    return backends.get(backend).expand_bwd(
        grad_frames.contiguous(), key_index, num_residual, frames_per_token
    )


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
