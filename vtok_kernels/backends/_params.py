"""Fills the core's params structs (csrc/include/vtok/params.h) from torch tensors.

Shared by the backends that call the compiled extension (cpu, cuda). Arguments are the
normalised ones of the backend interface (see ``vtok_kernels.backends``); pointers go to the
extension as integers, and every tensor a struct points into is kept on the struct
(``_keepalive``) so it lives as long as the struct.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vtok_kernels import _extension


def _module():
    module = _extension.get()
    if module is None:
        raise RuntimeError(_extension.unavailable_reason())
    return module


def dtype_code(dtype: torch.dtype):
    """The core's DType for a torch dtype; TypeError for any other."""
    C = _module()
    codes = {
        torch.float32: C.DType.float32,
        torch.float16: C.DType.float16,
        torch.bfloat16: C.DType.bfloat16,
        torch.float64: C.DType.float64,
    }
    if dtype not in codes:
        raise TypeError(f"x: expected float16, bfloat16, float32 or float64, got {dtype}")
    return codes[dtype]


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def num_groups(num_frames: int, frames_per_token: int) -> int:
    """G = ceil((T - 1) / frames_per_token); 0 for a single frame."""
    return 0 if num_frames <= 1 else (num_frames - 1 + frames_per_token - 1) // frames_per_token


def num_key_tokens(num_patches: int, spatial: Sequence[int]) -> int:
    """S: N without spatial pooling, else h * w."""
    return spatial[0] * spatial[1] if len(spatial) else num_patches


def encode_params(
    x: torch.Tensor,
    key_index: torch.Tensor,
    query: Optional[torch.Tensor],
    pool: str,
    num_heads: int,
    frames_per_token: int,
    spatial: Sequence[int],
    grid: Sequence[int],
    sequence: torch.Tensor,
    lse: torch.Tensor,
    cu_frames: Optional[torch.Tensor] = None,
    cu_tokens: Optional[torch.Tensor] = None,
    max_frames: int = 0,
):
    """EncodeParams for x: [B, T, N, C] (batched) or [F, N, C] with cu_frames/cu_tokens [B+1].

    ``sequence`` [B, S+G, C] / [L, C] and ``lse`` float32 [B, G, heads] / [sum G_b, heads] (empty
    for mean) are the outputs the kernel writes.
    """
    C = _module()
    if x.stride(-1) != 1:
        raise ValueError("x: the channel dimension must have stride 1")
    key_index = key_index.to(torch.int64).contiguous()
    p = C.EncodeParams()
    p.x = _ptr(x)
    if cu_frames is None:
        B, T, N, channels = x.shape
        p.x_stride_b, p.x_stride_t, p.x_stride_n = x.stride(0), x.stride(1), x.stride(2)
        p.num_frames = T
        p.num_groups = num_groups(T, frames_per_token)
    else:
        cu_frames = cu_frames.to(torch.int64).contiguous()
        cu_tokens = cu_tokens.to(torch.int64).contiguous()
        _, N, channels = x.shape
        B = cu_frames.numel() - 1
        p.x_stride_b, p.x_stride_t, p.x_stride_n = 0, x.stride(0), x.stride(1)
        p.num_frames = int(max_frames)
        p.cu_frames = _ptr(cu_frames)
        p.cu_tokens = _ptr(cu_tokens)
    p.batch = B
    p.num_patches = N
    p.channels = channels
    p.dtype = dtype_code(x.dtype)
    p.key_index = _ptr(key_index)
    p.pool = C.Pool.attn if pool == "attn" else C.Pool.mean
    if pool == "attn":
        if query is None:
            raise ValueError("query: required for pool='attn'")
        query = query.to(torch.float32).contiguous()
        p.query = _ptr(query)
        p.lse = _ptr(lse)
    p.num_heads = int(num_heads) if pool == "attn" else 1
    p.frames_per_token = int(frames_per_token)
    p.spatial = len(spatial) > 0
    if p.spatial:
        p.grid_h, p.grid_w = int(grid[0]), int(grid[1])
        p.out_h, p.out_w = int(spatial[0]), int(spatial[1])
    p.num_key_tokens = num_key_tokens(N, spatial)
    p.sequence = _ptr(sequence)
    p._keepalive = (x, key_index, query, cu_frames, cu_tokens, sequence, lse)
    return p


def encode_bwd_params(fwd, grad_sequence: torch.Tensor, grad_x: torch.Tensor,
                      grad_query: Optional[torch.Tensor]):
    """EncodeBwdParams around the forward's params (whose sequence and lse are the saved ones)."""
    C = _module()
    bp = C.EncodeBwdParams()
    bp.fwd = fwd
    bp.grad_sequence = _ptr(grad_sequence)
    bp.grad_x = _ptr(grad_x)
    bp.grad_query = _ptr(grad_query)
    bp._keepalive = (fwd._keepalive, grad_sequence, grad_x, grad_query)
    return bp


def expand_params(key_tokens: torch.Tensor, residual_tokens: torch.Tensor, key_index: torch.Tensor,
                  num_frames: int, frames_per_token: int, frames: torch.Tensor):
    """ExpandParams: key_tokens [B, N, C], residual_tokens [B, G, C] -> frames [B, T, N, C]."""
    C = _module()
    if key_tokens.stride(-1) != 1 or residual_tokens.stride(-1) != 1:
        raise ValueError("key_tokens, residual_tokens: the channel dimension must have stride 1")
    key_index = key_index.to(torch.int64).contiguous()
    B, N, channels = key_tokens.shape
    p = C.ExpandParams()
    p.key_tokens = _ptr(key_tokens)
    p.key_stride_b, p.key_stride_n = key_tokens.stride(0), key_tokens.stride(1)
    p.residual_tokens = _ptr(residual_tokens)
    p.res_stride_b, p.res_stride_g = residual_tokens.stride(0), residual_tokens.stride(1)
    p.batch, p.num_frames, p.num_patches, p.channels = B, int(num_frames), N, channels
    p.num_groups = residual_tokens.shape[1]
    p.frames_per_token = int(frames_per_token)
    p.key_index = _ptr(key_index)
    p.dtype = dtype_code(key_tokens.dtype)
    p.frames = _ptr(frames)
    p._keepalive = (key_tokens, residual_tokens, key_index, frames)
    return p


def expand_bwd_params(grad_frames: torch.Tensor, key_index: torch.Tensor, num_residual: int,
                      frames_per_token: int, grad_key_tokens: torch.Tensor,
                      grad_residual_tokens: torch.Tensor):
    """ExpandBwdParams: grad_frames [B, T, N, C] -> [B, N, C] and [B, G, C] (all contiguous)."""
    C = _module()
    grad_frames = grad_frames.contiguous()
    key_index = key_index.to(torch.int64).contiguous()
    B, T, N, channels = grad_frames.shape
    p = C.ExpandBwdParams()
    p.grad_frames = _ptr(grad_frames)
    p.batch, p.num_frames, p.num_patches, p.channels = B, T, N, channels
    p.num_groups = int(num_residual)
    p.frames_per_token = int(frames_per_token)
    p.key_index = _ptr(key_index)
    p.dtype = dtype_code(grad_frames.dtype)
    p.grad_key_tokens = _ptr(grad_key_tokens)
    p.grad_residual_tokens = _ptr(grad_residual_tokens)
    p._keepalive = (grad_frames, key_index, grad_key_tokens, grad_residual_tokens)
    return p
