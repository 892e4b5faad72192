"""The "cpu" backend: C++/OpenMP kernels of the compiled extension (csrc/cpu/).

One pass over x per forward (online softmax for attn), the backward from the saved sequence and
lse only, deterministic for any thread count. Threads: ``torch.get_num_threads()``. x-sized
outputs get a transparent-huge-page hint unless ``VTOK_CPU_HUGE_PAGES=0``.
"""
from __future__ import annotations

from typing import Optional

import torch

from vtok_kernels import _extension
from vtok_kernels.backends import Backend, empty_output, impls_of, register
from vtok_kernels.backends import _params


def _availability(device_type: str) -> Optional[str]:
    reason = _extension.unavailable_reason()
    if reason is not None:
        return f"the cpu backend needs the compiled extension: {reason}"
    if device_type != "cpu":
        return f"the cpu backend runs on CPU tensors only, not {device_type}"
    return None


def _threads() -> int:
    return torch.get_num_threads()


def _lse(shape, pool: str, device) -> torch.Tensor:
    if pool != "attn":
        return torch.empty(0, dtype=torch.float32, device=device)
    return empty_output(shape, torch.float32, device)


def encode_fwd(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid):
    B, T, N, C = x.shape
    S = _params.num_key_tokens(N, spatial)
    G = _params.num_groups(T, frames_per_token)
    sequence = empty_output((B, S + G, C), x.dtype, x.device)
    lse = _lse((B, G, num_heads), pool, x.device)
    p = _params.encode_params(x, key_index, query, pool, num_heads, frames_per_token, spatial,
                              grid, sequence, lse)
    _extension.get().cpu_encode_fwd(p, _threads())
    return sequence, lse


def _encode_bwd(fwd, grad_sequence, x, query, pool):
    grad_x = empty_output(x.shape, x.dtype, x.device)
    grad_query = empty_output(query.shape, torch.float32, x.device) if pool == "attn" else None
    bp = _params.encode_bwd_params(fwd, grad_sequence.contiguous(), grad_x, grad_query)
    _extension.get().cpu_encode_bwd(bp, _threads())
    return grad_x, grad_query


def encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
               frames_per_token, spatial, grid):
    fwd = _params.encode_params(x, key_index, query, pool, num_heads, frames_per_token, spatial,
                                grid, sequence.contiguous(), lse.contiguous())
    return _encode_bwd(fwd, grad_sequence, x, query, pool)


def encode_varlen_fwd(x, cu_frames, cu_tokens, key_index, query, pool, num_heads,
                      frames_per_token, spatial, grid, max_frames, total_tokens):
    F, N, C = x.shape
    B = cu_frames.numel() - 1
    S = _params.num_key_tokens(N, spatial)
    sequence = empty_output((total_tokens, C), x.dtype, x.device)
    lse = _lse((total_tokens - B * S, num_heads), pool, x.device)
    p = _params.encode_params(x, key_index, query, pool, num_heads, frames_per_token, spatial,
                              grid, sequence, lse, cu_frames=cu_frames, cu_tokens=cu_tokens,
                              max_frames=max_frames)
    _extension.get().cpu_encode_fwd(p, _threads())
    return sequence, lse


def encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse,
                      pool, num_heads, frames_per_token, spatial, grid, max_frames):
    fwd = _params.encode_params(x, key_index, query, pool, num_heads, frames_per_token, spatial,
                                grid, sequence.contiguous(), lse.contiguous(),
                                cu_frames=cu_frames, cu_tokens=cu_tokens, max_frames=max_frames)
    return _encode_bwd(fwd, grad_sequence, x, query, pool)


def expand_fwd(key_tokens, residual_tokens, key_index, num_frames, frames_per_token):
    B, N, C = key_tokens.shape
    frames = empty_output((B, num_frames, N, C), key_tokens.dtype, key_tokens.device)
    p = _params.expand_params(key_tokens, residual_tokens, key_index, num_frames,
                              frames_per_token, frames)
    _extension.get().cpu_expand_fwd(p, _threads())
    return frames


def expand_bwd(grad_frames, key_index, num_residual, frames_per_token):
    B, T, N, C = grad_frames.shape
    grad_key = empty_output((B, N, C), grad_frames.dtype, grad_frames.device)
    grad_res = empty_output((B, num_residual, C), grad_frames.dtype, grad_frames.device)
    p = _params.expand_bwd_params(grad_frames, key_index, num_residual, frames_per_token,
                                  grad_key, grad_res)
    _extension.get().cpu_expand_bwd(p, _threads())
    return grad_key, grad_res


register(
    Backend(
        name="cpu",
        availability=_availability,
        impls=impls_of(globals()),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        loader="extension",
    )
)
