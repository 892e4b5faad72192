"""Triton kernels of ``expand``, the adjoint of encode on the generation side.

Forward: frame k_b is the key tokens, frame t of group g the key tokens plus r_g. A program
owns a (video, patch block, channel block) tile, loads the key tokens' tile once and writes it,
shifted by each group's residual, to every frame.

Backward: the key tokens' gradient is the sum over all frames, the residual token's gradient
the sum over its group's frames and patches. The same tile ownership sums over frames in
registers; the per-group sums over patch blocks go through partials merged in a fixed order by
encode's combine kernel, so the result is reproducible bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtok_kernels.backends import empty_output
from vtok_kernels.backends.triton.encode import (
    _combine_block, _combine_channel_blocks, _num_groups, _num_splits, _target_programs,
    check_frame_elements, check_grid, combine_kernel, combine_warps, config_pool,
    on_input_device)
from vtok_kernels.backends.triton.launch import autotuned, axis_chunks, launch


@triton.jit
def expand_fwd_kernel(
    key_tokens_ptr, residual_ptr, key_ptr, frames_ptr,
    stride_kb, stride_kn, stride_rb, stride_rg,
    T, N, C, FRAMES_PER_TOKEN, NUM_HEADS,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Axis 0 is (video, patch block), patch blocks fastest: on axis 1 they would pass its 65535
    # programs past half a million patches. A loop over patch blocks would do too, but takes up
    # to 13 more registers at the wider configs on sm_90 (compile-check), the division none.
    num_blocks = tl.cdiv(N, BLOCK_N)
    video = (tl.program_id(0) // num_blocks).to(tl.int64)
    pid_n = tl.program_id(0) % num_blocks
    pid_c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < C
    mask = mask_n[:, None] & mask_d[None, :]
    key = tl.load(key_ptr + video).to(tl.int64)
    # Rows 64-bit: the key tokens may be a view with any token stride (loaded once: free).
    key_rows = offs_n.to(tl.int64)[:, None] * stride_kn
    key_tile = tl.load(key_tokens_ptr + video * stride_kb + key_rows + offs_d[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    # 32-bit: frames is contiguous, so a tile stays within one frame's N * C elements.
    out_tile = offs_n[:, None] * C + offs_d[None, :]
    frames_video = frames_ptr + video * T * N * C
    for t in range(0, T):
        # 64-bit products (the division stays 32-bit: a 64-bit one is a subroutine): group *
        # stride_rg (residual tokens strided as any view) and frame * N * C (a video of more
        # than 2**31 elements) pass 2**31.
        frame = tl.cast(t, tl.int64)
        group = (tl.where(t < key, t, t - 1) // FRAMES_PER_TOKEN).to(tl.int64)
        # The key frame has no residual; its lanes are masked off (a scalar-and-vector mask
        # is spelled as a vector so the interpreter accepts it).
        residual = tl.load(residual_ptr + video * stride_rb + group * stride_rg + offs_d,
                           mask=mask_d & (offs_d * 0 + frame != key), other=0.0).to(tl.float32)
        tl.store(frames_video + frame * N * C + out_tile,
                 (key_tile + residual[None, :]).to(frames_ptr.dtype.element_ty), mask=mask)


@triton.jit
def expand_bwd_kernel(
    grad_frames_ptr, key_ptr, grad_key_tokens_ptr, part_acc_ptr,
    T, N, C, G, NUM_ROWS, FRAMES_PER_TOKEN, NUM_HEADS,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    video = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    pid_c = tl.program_id(2)
    offs_d = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < C
    key = tl.load(key_ptr + video).to(tl.int64)
    grad_video = grad_frames_ptr + video * T * N * C
    # Patch blocks split, split + num_splits, ...; the per-group sums of a program's blocks are
    # merged in place, as in encode's forward.
    for block in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_n < N)[:, None] & mask_d[None, :]
        # 32-bit: grad_frames is contiguous, so a tile stays within one frame's N * C elements.
        tile = offs_n[:, None] * C + offs_d[None, :]
        merge = (offs_d * 0 + block) > split
        grad_key = tl.load(grad_video + key * N * C + tile, mask=mask, other=0.0).to(tl.float32)
        for g in range(0, G):
            first = g * FRAMES_PER_TOKEN
            last = tl.minimum(first + FRAMES_PER_TOKEN, T - 1)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for rank in range(first, last):
                # 64-bit: frame * N * C passes 2**31 in a video of more than 2**31 elements.
                frame = tl.where(rank < key, rank, rank + 1).to(tl.int64)
                grad_tile = tl.load(grad_video + frame * N * C + tile, mask=mask,
                                    other=0.0).to(tl.float32)
                grad_key += grad_tile
                acc += tl.sum(grad_tile, axis=0)
            part_ptrs = part_acc_ptr + (split.to(tl.int64) * NUM_ROWS + video * G + g) * C + offs_d
            # Another thread of this program may have stored the partial being merged.
            tl.debug_barrier()
            acc += tl.load(part_ptrs, mask=mask_d & merge, other=0.0)
            tl.debug_barrier()
            tl.store(part_ptrs, acc, mask=mask_d)
        tl.store(grad_key_tokens_ptr + video * N * C + tile,
                 grad_key.to(grad_key_tokens_ptr.dtype.element_ty), mask=mask)


_expand_fwd = autotuned(expand_fwd_kernel, "stream")
_expand_bwd = autotuned(expand_bwd_kernel, "stream")


def _grid(batch: int, N: int, C: int):
    return lambda meta: (batch * triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(C, meta["BLOCK_D"]),
                         1)


@on_input_device
def expand_fwd(key_tokens, residual_tokens, key_index, num_frames, frames_per_token):
    """key_tokens [B, N, C], residual_tokens [B, G, C] -> frames [B, T, N, C] contiguous."""
    B, N, C = key_tokens.shape
    check_frame_elements(N, C)
    block_n = min(c.kwargs["BLOCK_N"] for c in config_pool("stream"))
    tiles = B * triton.cdiv(N, block_n)
    check_grid(tiles, C, 1, False, "stream", "key_tokens",
               f"key_tokens: {B} videos x {triton.cdiv(N, block_n)} patch blocks of {block_n}")
    frames = empty_output((B, num_frames, N, C), key_tokens.dtype, key_tokens.device)
    launch(expand_fwd_kernel, _expand_fwd, "stream", _grid(B, N, C),
           key_tokens, residual_tokens, key_index, frames,
           key_tokens.stride(0), key_tokens.stride(1),
           residual_tokens.stride(0), residual_tokens.stride(1),
           num_frames, N, C, frames_per_token, 1)
    return frames


@on_input_device
def expand_bwd(grad_frames, key_index, num_residual, frames_per_token):
    """grad_frames [B, T, N, C] -> (grad_key_tokens [B, N, C], grad_residual_tokens [B, G, C])."""
    grad_frames = grad_frames.contiguous()
    B, T, N, C = grad_frames.shape
    check_frame_elements(N, C)
    G = num_residual
    if G != _num_groups(T, frames_per_token):
        raise ValueError(f"num_residual: expected {_num_groups(T, frames_per_token)} groups "
                         f"for {T} frames, got {G}")
    check_grid(B, C, 1, False, "stream", "grad_frames")
    block_c = _combine_block(C)
    # Checked before the first launch, so that a grid too large fails with nothing written.
    channel_blocks = _combine_channel_blocks(C, block_c, "grad_frames")
    grad_key_tokens = empty_output((B, N, C), grad_frames.dtype, grad_frames.device)
    grad_residual = empty_output((B, G, C), grad_frames.dtype, grad_frames.device)
    pool = config_pool("stream")
    target = _target_programs(grad_frames.device)

    def grid(meta):
        channel_blocks = triton.cdiv(C, meta["BLOCK_D"])
        return (B, _num_splits(N, meta["BLOCK_N"], B, channel_blocks, target), channel_blocks)

    num_parts_max = max(grid(c.kwargs)[1] for c in pool)
    part_acc = empty_output((num_parts_max, B * G, C), torch.float32, grad_frames.device)
    meta = launch(expand_bwd_kernel, _expand_bwd, "stream", grid,
                  grad_frames, key_index, grad_key_tokens, part_acc,
                  T, N, C, G, B * G, frames_per_token, 1)
    # S = 0 and G rows per video: combine writes the plain [B, G, C] layout.
    for first, count in axis_chunks(G if B > 0 else 0):
        combine_kernel[(B, count, channel_blocks)](
            part_acc, key_index, key_index, key_index, grad_residual,
            T, N, C, 0, G, B * G, grid(meta)[1], frames_per_token, first,
            IS_VARLEN=False, DIVIDE=False, BLOCK_C=block_c, num_warps=combine_warps(block_c),
        )
    return grad_key_tokens, grad_residual
