"""Triton kernels of ``encode`` and ``encode_varlen``: fused residual + mean/attention pooling.

Forward. A program owns one video, one channel block (for attention pooling: exactly one head)
and a set of patch blocks (every num_splits-th block of BLOCK_N patches). For each patch block
it loads the key frame's tile once, keeps it in registers and streams the video's non-key
frames through it, so x is read once and the residual tensor never exists. Per group, the
program keeps one partial result (a sum, or an online-softmax state: running max, sum of
weights, weighted sum) and merges each further patch block into it in place; a small combine
kernel merges the programs' partials in a fixed order and writes the residual tokens and the
log-sum-exp. num_splits is just large enough to fill the device, so the partials are a few
percent of x. No atomics: for a given config the result is bitwise reproducible; the config
itself is fixed by a rule instead of timings under ``torch.use_deterministic_algorithms(True)``
(configs.autotuning).

Backward. The same decomposition: a program recomputes its residual tile per frame, writes the
frame's gradient and accumulates the key frame's gradient (minus the sum over its residuals)
in registers, so every element of grad_x has exactly one writer. grad_query is reduced from
per-program partials in a fixed order.

Batched and varlen share the kernels: IS_VARLEN switches how a video finds its frames
(``cu_frames``) and its output rows (``cu_tokens``).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from vtok_kernels.backends import empty_output
from vtok_kernels.backends.triton import configs
from vtok_kernels.backends.triton.launch import (
    MAX_GRID_X, MAX_GRID_YZ, autotuned, axis_chunks, check_grid_axis, grid_slots, launch)


def on_input_device(op):
    """Runs a backend op with its tensors' CUDA device current (the API puts them all on one).
    Triton launches on the current device whatever the tensors' device, and a tensor on another
    GPU is an illegal address there; the cuda backend guards its launches the same way."""

    @functools.wraps(op)
    def guarded(*args, **kwargs):
        device = next((a.device for a in (*args, *kwargs.values())
                       if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return op(*args, **kwargs)
        with torch.cuda.device(device):
            return op(*args, **kwargs)

    return guarded


@triton.jit
def _video_layout(video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN,
                  IS_VARLEN: tl.constexpr):
    """(first frame, frame count, first output row, first lse row, key frame, group count)."""
    if IS_VARLEN:
        frame0 = tl.load(cu_frames_ptr + video).to(tl.int64)
        num_frames = tl.load(cu_frames_ptr + video + 1) - frame0
        # 64-bit whatever cu_tokens' dtype: token0 * C passes 2**31 in a long packed sequence.
        token0 = tl.load(cu_tokens_ptr + video).to(tl.int64)
        group0 = token0 - video * S
    else:
        frame0 = video.to(tl.int64) * 0
        num_frames = T + video * 0
        token0 = video.to(tl.int64) * (S + G)
        group0 = video.to(tl.int64) * G
    key = tl.load(key_ptr + video).to(tl.int64)
    num_groups = (num_frames - 1 + FRAMES_PER_TOKEN - 1) // FRAMES_PER_TOKEN
    return frame0, num_frames, token0, group0, key, num_groups


@triton.jit
def _channel_block(pid_c, C, HEAD_DIM, POOL_ATTN: tl.constexpr, BLOCK_D: tl.constexpr):
    """First channel and lane mask of a channel block; for attention the block is one head."""
    offs_d = tl.arange(0, BLOCK_D)
    if POOL_ATTN:
        c0 = pid_c * HEAD_DIM
        mask_d = offs_d < HEAD_DIM
    else:
        c0 = pid_c * BLOCK_D
        mask_d = offs_d < C - c0
    return c0, offs_d, mask_d


@triton.jit
def _x_tile(x_frame, rows, chans, ROW_POINTERS: tl.constexpr):
    """Pointers of a tile of x: its frame's base pointer, plus the 64-bit offsets of its patch
    rows, plus the 32-bit offsets of its channels (within a row, so small). Both forms give the
    same addresses; ptxas allocates them differently (compile-check). Channels added to row
    pointers keep the attention forward at head blocks >= 128 at or below its registers with
    32-bit tiles (per-element 64-bit offsets take 35 more at 256 channels on sm_90);
    per-element 64-bit offsets keep the mean forward (float32, sm_90), the attention forward at
    64 channels (sm_80) and the attention backward (sm_80) from spilling."""
    if ROW_POINTERS:
        return (x_frame + rows)[:, None] + chans[None, :]
    else:
        return x_frame + (rows[:, None] + chans[None, :])


@triton.jit
def encode_fwd_kernel(
    x_ptr, key_ptr, query_ptr, cu_frames_ptr, cu_tokens_ptr,
    seq_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_xb, stride_xt, stride_xn,
    T, N, C, S, G, NUM_ROWS, HEAD_DIM, NUM_HEADS, FRAMES_PER_TOKEN, scale,
    POOL_ATTN: tl.constexpr, IS_VARLEN: tl.constexpr, WRITE_KEY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    video = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    pid_c = tl.program_id(2)
    frame0, num_frames, token0, group0, key, num_groups = _video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    c0, offs_d, mask_d = _channel_block(pid_c, C, HEAD_DIM, POOL_ATTN, BLOCK_D)
    x_video = x_ptr + video.to(tl.int64) * stride_xb + frame0 * stride_xt
    if POOL_ATTN:
        # The 1/sqrt(head size) is folded into the query once instead of into every score.
        q = tl.load(query_ptr + c0 + offs_d, mask=mask_d, other=0.0).to(tl.float32) * scale
    lane0 = offs_d == 0
    # The form of x's tile pointers that ptxas allocates best here (see _x_tile).
    ROW_POINTERS: tl.constexpr = POOL_ATTN and BLOCK_D >= 128

    # A program walks patch blocks split, split + num_splits, ...: few enough programs that
    # the per-group partials (one row per program, merged in place) stay small next to x.
    for block in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_n[:, None] & mask_d[None, :]
        # 64-bit: a view's patch stride is unbounded (in a patch-major buffer, N * stride_xn
        # passes 2**31).
        rows = offs_n.to(tl.int64) * stride_xn
        key_tile = tl.load(_x_tile(x_video + key * stride_xt, rows, c0 + offs_d, ROW_POINTERS),
                           mask=mask, other=0.0).to(tl.float32)
        if WRITE_KEY:
            tl.store(seq_ptr + token0 * C + offs_n[:, None] * C + (c0 + offs_d)[None, :],
                     key_tile.to(seq_ptr.dtype.element_ty), mask=mask)
        # Earlier blocks of this program left partials to merge into (a vector-shaped flag:
        # the interpreter takes no scalar-and-vector masks).
        merge = (offs_d * 0 + block) > split
        for g in range(0, num_groups):
            first = g * FRAMES_PER_TOKEN
            last = tl.minimum(first + FRAMES_PER_TOKEN, num_frames - 1)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            # Running max and weight sum kept as vectors (all lanes equal) so the loop carries
            # tensors of one shape.
            run_max = tl.full([BLOCK_D], float("-inf"), tl.float32)
            run_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
            for rank in range(first, last):
                # 64-bit: frame * stride_xt passes 2**31 in a time-major buffer of a few frames.
                frame = tl.where(rank < key, rank, rank + 1).to(tl.int64)
                x_ptrs = _x_tile(x_video + frame * stride_xt, rows, c0 + offs_d, ROW_POINTERS)
                x_tile = tl.load(x_ptrs, mask=mask, other=0.0)
                residual = x_tile.to(tl.float32) - key_tile
                if POOL_ATTN:
                    score = tl.sum(residual * q[None, :], axis=1)
                    score = tl.where(mask_n, score, float("-inf"))
                    new_max = tl.maximum(run_max, tl.max(score, axis=0))
                    rescale = tl.exp(run_max - new_max)
                    weight = tl.exp(score - tl.max(new_max, axis=0))
                    run_sum = run_sum * rescale + tl.sum(weight, axis=0)
                    acc = acc * rescale + tl.sum(weight[:, None] * residual, axis=0)
                    run_max = new_max
                else:
                    acc += tl.sum(residual, axis=0)
            part = split.to(tl.int64) * NUM_ROWS + group0 + g
            # Another thread of this program may have stored the partial: the barrier makes
            # its store visible before the merge reads it.
            tl.debug_barrier()
            acc_ptrs = part_acc_ptr + part * C + c0 + offs_d
            previous = tl.load(acc_ptrs, mask=mask_d & merge, other=0.0)
            if POOL_ATTN:
                stat = part * NUM_HEADS + pid_c + offs_d * 0
                prev_max = tl.load(part_max_ptr + stat, mask=merge, other=float("-inf"))
                prev_sum = tl.load(part_sum_ptr + stat, mask=merge, other=0.0)
                new_max = tl.maximum(prev_max, run_max)
                # exp(-inf - m) = 0 drops the empty side; a finite reference avoids -inf - -inf.
                ref_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                prev_scale = tl.exp(prev_max - ref_max)
                run_scale = tl.exp(run_max - ref_max)
                acc = previous * prev_scale + acc * run_scale
                run_sum = prev_sum * prev_scale + run_sum * run_scale
                run_max = new_max
            else:
                acc += previous
            tl.debug_barrier()
            tl.store(acc_ptrs, acc, mask=mask_d)
            if POOL_ATTN:
                tl.store(part_max_ptr + part * NUM_HEADS + pid_c + offs_d, run_max, mask=lane0)
                tl.store(part_sum_ptr + part * NUM_HEADS + pid_c + offs_d, run_sum, mask=lane0)


@triton.jit
def combine_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, key_ptr, cu_frames_ptr, cu_tokens_ptr,
    out_ptr, lse_ptr,
    T, N, C, S, G, NUM_ROWS, NUM_PARTS, HEAD_DIM, NUM_HEADS, FRAMES_PER_TOKEN, FIRST_GROUP,
    POOL_ATTN: tl.constexpr, IS_VARLEN: tl.constexpr, DIVIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merges the per-patch-block partials of one group, in patch-block order, into its token.

    Output row of group g of video b: token0 + S + g (S = 0 and G rows per video gives the
    plain [B, G, C] layout that expand's backward uses). Groups from FIRST_GROUP on: a video
    with more groups than grid axis 1 holds takes several launches.
    """
    video = tl.program_id(0)
    g = FIRST_GROUP + tl.program_id(1)
    pid_c = tl.program_id(2)
    frame0, num_frames, token0, group0, key, num_groups = _video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = (offs_c < C) & ((offs_c * 0 + g) < num_groups)
    # row is 64-bit (group0 is). p * NUM_ROWS stays 32-bit: it is below the partials' row
    # count, splits x B x G with splits <= cdiv(N, BLOCK_N), far fewer than x's B x T x N rows.
    row = group0 + g
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if POOL_ATTN:
        head = offs_c // HEAD_DIM
        best = tl.full([BLOCK_C], float("-inf"), tl.float32)
        for p in range(0, NUM_PARTS):
            part = p * NUM_ROWS + row
            best = tl.maximum(best, tl.load(part_max_ptr + part * NUM_HEADS + head, mask=mask_c,
                                            other=float("-inf")))
        # Masked lanes would compute exp(-inf - -inf); give them a finite reference instead.
        best = tl.where(mask_c, best, 0.0)
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p in range(0, NUM_PARTS):
            part = p * NUM_ROWS + row
            factor = tl.exp(tl.load(part_max_ptr + part * NUM_HEADS + head, mask=mask_c,
                                    other=float("-inf")) - best)
            total += factor * tl.load(part_sum_ptr + part * NUM_HEADS + head, mask=mask_c,
                                      other=0.0)
            acc += factor * tl.load(part_acc_ptr + part * C + offs_c, mask=mask_c, other=0.0)
        total = tl.where(mask_c, total, 1.0)
        result = acc / total
        tl.store(lse_ptr + row * NUM_HEADS + head, best + tl.log(total),
                 mask=mask_c & (offs_c % HEAD_DIM == 0))
    else:
        for p in range(0, NUM_PARTS):
            acc += tl.load(part_acc_ptr + (p * NUM_ROWS + row) * C + offs_c, mask=mask_c,
                           other=0.0)
        if DIVIDE:
            first = g * FRAMES_PER_TOKEN
            count = (tl.minimum(first + FRAMES_PER_TOKEN, num_frames - 1) - first) * N
            # Programs past a short video's last group store nothing; keep them finite anyway.
            result = acc / tl.maximum(count, 1).to(tl.float32)
        else:
            result = acc
    out_row = token0 + S + g
    tl.store(out_ptr + out_row * C + offs_c, result.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def spatial_key_fwd_kernel(
    x_ptr, key_ptr, cu_frames_ptr, cu_tokens_ptr, seq_ptr,
    stride_xb, stride_xt, stride_xn,
    T, C, S, G, FRAMES_PER_TOKEN, GRID_H, GRID_W, OUT_H, OUT_W, FIRST_TOKEN,
    IS_VARLEN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Key tokens by adaptive average pooling of the key frame's grid (torch's bins), from
    FIRST_TOKEN on: more tokens than grid axis 1 holds take several launches."""
    video = tl.program_id(0)
    token = FIRST_TOKEN + tl.program_id(1)
    pid_c = tl.program_id(2)
    frame0, num_frames, token0, group0, key, num_groups = _video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    bin_i = token // OUT_W
    bin_j = token % OUT_W
    row_start = (bin_i * GRID_H) // OUT_H
    row_end = ((bin_i + 1) * GRID_H + OUT_H - 1) // OUT_H
    col_start = (bin_j * GRID_W) // OUT_W
    col_end = ((bin_j + 1) * GRID_W + OUT_W - 1) // OUT_W
    key_frame = (x_ptr + video.to(tl.int64) * stride_xb + (frame0 + key) * stride_xt)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for row in range(row_start, row_end):
        for col in range(col_start, col_end):
            patch = (row * GRID_W + col).to(tl.int64)
            acc += tl.load(key_frame + patch * stride_xn + offs_c, mask=mask_c,
                           other=0.0).to(tl.float32)
    area = ((row_end - row_start) * (col_end - col_start)).to(tl.float32)
    tl.store(seq_ptr + (token0 + token) * C + offs_c, (acc / area).to(seq_ptr.dtype.element_ty),
             mask=mask_c)


@triton.jit
def encode_bwd_kernel(
    grad_seq_ptr, x_ptr, key_ptr, query_ptr, seq_ptr, lse_ptr, cu_frames_ptr, cu_tokens_ptr,
    grad_x_ptr, part_dq_ptr, part_r_ptr, part_delta_ptr,
    stride_xb, stride_xt, stride_xn,
    T, N, C, S, G, NUM_ROWS, HEAD_DIM, NUM_HEADS, FRAMES_PER_TOKEN, DQ_PARTS, scale,
    GRID_H, GRID_W, OUT_H, OUT_W,
    POOL_ATTN: tl.constexpr, IS_VARLEN: tl.constexpr, SPATIAL: tl.constexpr,
    BINS_PER_ROW: tl.constexpr, BINS_PER_COL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    video = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    pid_c = tl.program_id(2)
    frame0, num_frames, token0, group0, key, num_groups = _video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    c0, offs_d, mask_d = _channel_block(pid_c, C, HEAD_DIM, POOL_ATTN, BLOCK_D)
    chans = c0 + offs_d
    # grad_x is contiguous [frames, N, C]; batched videos are T frames apart.
    if IS_VARLEN:
        grad_video = grad_x_ptr + frame0 * N * C
    else:
        grad_video = grad_x_ptr + video.to(tl.int64) * T * N * C
    x_video = x_ptr + video.to(tl.int64) * stride_xb + frame0 * stride_xt
    if POOL_ATTN:
        q = tl.load(query_ptr + chans, mask=mask_d, other=0.0).to(tl.float32) * scale
        grad_q = tl.zeros([BLOCK_D], dtype=tl.float32)

    # Patch blocks split, split + num_splits, ... as in the forward.
    for block in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_n[:, None] & mask_d[None, :]
        # 32-bit: grad_x is contiguous, so a tile stays within one frame's N * C elements.
        grad_tile = offs_n[:, None] * C + chans[None, :]
        # 64-bit: x's patch stride is unbounded (see the forward).
        rows = offs_n.to(tl.int64) * stride_xn
        merge = (offs_d * 0 + block) > split
        grad_key = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if POOL_ATTN:
            key_tile = tl.load(_x_tile(x_video + key * stride_xt, rows, chans, False), mask=mask,
                               other=0.0).to(tl.float32)

        for g in range(0, num_groups):
            first = g * FRAMES_PER_TOKEN
            last = tl.minimum(first + FRAMES_PER_TOKEN, num_frames - 1)
            token_row = (token0 + S + g) * C
            grad_r = tl.load(grad_seq_ptr + token_row + chans, mask=mask_d,
                             other=0.0).to(tl.float32)
            if POOL_ATTN:
                r = tl.load(seq_ptr + token_row + chans, mask=mask_d, other=0.0).to(tl.float32)
                grad_r_dot_r = tl.sum(grad_r * r, axis=0)
                lse = tl.load(lse_ptr + (group0 + g) * NUM_HEADS + pid_c)
                # This group's share, over this patch block, of r = sum p d and of
                # <grad_r, r> = sum p <grad_r, d>, both exact in float32: grad_query is
                # sum p <grad_r, d> d - <grad_r, r> r, a difference of near-equal terms that the
                # rounded r of the sequence would swamp.
                r_part = tl.zeros([BLOCK_D], dtype=tl.float32)
                delta_part = tl.zeros([BLOCK_D], dtype=tl.float32)
                for rank in range(first, last):
                    # 64-bit: frame * stride_xt (strided x) and frame * N * C (a long video's
                    # grad_x) pass 2**31. Not spelled with tl.where as in the forward: that takes
                    # 31 more registers at 256 channels on sm_90 and spills at 64 on sm_80.
                    frame = rank + (rank >= key).to(tl.int64)
                    x_tile = tl.load(_x_tile(x_video + frame * stride_xt, rows, chans, False),
                                     mask=mask, other=0.0)
                    residual = x_tile.to(tl.float32) - key_tile
                    prob = tl.exp(tl.sum(residual * q[None, :], axis=1) - lse)
                    prob = tl.where(mask_n, prob, 0.0)
                    prob_grad = prob * tl.sum(residual * grad_r[None, :], axis=1)
                    # d score = p * (<grad_r, d> - <grad_r, r>); q already carries 1/sqrt(c).
                    grad_score = prob_grad - prob * grad_r_dot_r
                    grad_residual = (prob[:, None] * grad_r[None, :]
                                     + grad_score[:, None] * q[None, :])
                    tl.store(grad_video + frame * N * C + grad_tile,
                             grad_residual.to(grad_x_ptr.dtype.element_ty), mask=mask)
                    grad_key -= grad_residual
                    grad_q += tl.sum(prob_grad[:, None] * residual, axis=0)
                    r_part += tl.sum(prob[:, None] * residual, axis=0)
                    delta_part += tl.sum(prob_grad, axis=0)
                part = split.to(tl.int64) * NUM_ROWS + group0 + g
                r_ptrs = part_r_ptr + part * C + chans
                delta_ptrs = part_delta_ptr + part * NUM_HEADS + pid_c + offs_d * 0
                # Merge into what earlier blocks of this program stored (barrier: another
                # thread may have stored it).
                tl.debug_barrier()
                r_part += tl.load(r_ptrs, mask=mask_d & merge, other=0.0)
                delta_part += tl.load(delta_ptrs, mask=merge, other=0.0)
                tl.debug_barrier()
                tl.store(r_ptrs, r_part, mask=mask_d)
                tl.store(delta_ptrs, delta_part, mask=offs_d == 0)
            else:
                count = last - first
                grad_residual = grad_r / (count * N).to(tl.float32)
                grad_tile_value = (tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                                   + grad_residual[None, :])
                for rank in range(first, last):
                    # 64-bit: frame * N * C passes 2**31 in a video of more than 2**31 elements.
                    frame = tl.where(rank < key, rank, rank + 1).to(tl.int64)
                    tl.store(grad_video + frame * N * C + grad_tile,
                             grad_tile_value.to(grad_x_ptr.dtype.element_ty), mask=mask)
                grad_key -= grad_tile_value * count.to(tl.float32)

        if SPATIAL:
            # Spread each key token's gradient uniformly over its adaptive bin. A patch lies in at
            # most BINS_PER_ROW x BINS_PER_COL bins (bins overlap when the grid does not divide),
            # the first of them being floor(row * OUT_H / GRID_H).
            patch_row = offs_n // GRID_W
            patch_col = offs_n % GRID_W
            # Runtime loops, not unrolled: unrolled, the compiler hoists every bin's gather and
            # its 64-bit addresses at once and the attention backward spills.
            for di in range(0, BINS_PER_ROW):
                bin_i = (patch_row * OUT_H) // GRID_H + di
                row_start = (bin_i * GRID_H) // OUT_H
                row_end = ((bin_i + 1) * GRID_H + OUT_H - 1) // OUT_H
                in_row = (bin_i < OUT_H) & (row_start <= patch_row)
                for dj in range(0, BINS_PER_COL):
                    bin_j = (patch_col * OUT_W) // GRID_W + dj
                    col_start = (bin_j * GRID_W) // OUT_W
                    col_end = ((bin_j + 1) * GRID_W + OUT_W - 1) // OUT_W
                    inside = in_row & (bin_j < OUT_W) & (col_start <= patch_col) & mask_n
                    area = ((row_end - row_start) * (col_end - col_start)).to(tl.float32)
                    area = tl.where(inside, area, 1.0)
                    bin_rows = bin_i * OUT_W + bin_j
                    grad_bin = tl.load(grad_seq_ptr + token0 * C + bin_rows[:, None] * C
                                       + chans[None, :],
                                       mask=inside[:, None] & mask_d[None, :], other=0.0)
                    grad_key += grad_bin.to(tl.float32) / area[:, None]
        else:
            grad_key += tl.load(grad_seq_ptr + token0 * C + offs_n[:, None] * C + chans[None, :],
                                mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_video + key * N * C + grad_tile, grad_key.to(grad_x_ptr.dtype.element_ty),
                 mask=mask)
    if POOL_ATTN:
        part = video.to(tl.int64) * DQ_PARTS + split
        tl.store(part_dq_ptr + part * C + chans, grad_q, mask=mask_d)


_fwd_stream = autotuned(encode_fwd_kernel, "stream")
_fwd_attn = autotuned(encode_fwd_kernel, "attn_fwd")
_bwd_stream = autotuned(encode_bwd_kernel, "stream")
_bwd_attn = autotuned(encode_bwd_kernel, "attn_bwd")


def _num_groups(num_frames: int, frames_per_token: int) -> int:
    return 0 if num_frames <= 1 else (num_frames - 1 + frames_per_token - 1) // frames_per_token


# Channel blocks of the combine and spatial-key kernels, widest first. Both sum each element
# over its own inputs in a fixed order, so the block only decides how channels are dealt out.
COMBINE_BLOCKS = (1024, 512, 256, 128)


def combine_block(channels: int) -> int:
    """The widest block whose padding past C is at most C/32: a power of two cannot hold
    C = 1152 (SigLIP) in one block, and min(1024, next power of two) would leave 896 of its
    2048 lanes idle, where 9 blocks of 128 use all. Presets: 1024 -> 1024, 1152 -> 128,
    768 -> 256, 256 -> 256. Not below 128, the threads of the 4 warps a plain launch has; a C
    that no block fits within C/32 takes the one with least padding."""
    if channels <= COMBINE_BLOCKS[-1]:
        return triton.next_power_of_2(channels)
    padding = {block: triton.cdiv(channels, block) * block - channels for block in COMBINE_BLOCKS}
    fitting = [block for block in COMBINE_BLOCKS if 32 * padding[block] <= channels]
    if fitting:
        return fitting[0]
    return min(COMBINE_BLOCKS, key=lambda block: (padding[block], -block))


def _combine_block(channels: int) -> int:
    # Interpreter: a block below the test widths (C = 12..48), so several blocks and a masked
    # tail run.
    return 32 if configs.triton_interpreted() else combine_block(channels)


def _combine_channel_blocks(channels: int, block_c: int, tensor: str) -> int:
    """Grid axis 2 of the combine and spatial-key launches (``tensor`` names the features)."""
    blocks = triton.cdiv(channels, block_c)
    check_grid_axis(blocks, MAX_GRID_YZ,
                    f"{tensor}: C = {channels} channels in blocks of {block_c}")
    return blocks


def bins_per_cell(in_size: int, out_size: int) -> int:
    """Most adaptive-pool bins (torch's) that one input cell lies in."""
    most = 0
    for cell in range(in_size):
        inside = sum(1 for i in range(out_size)
                     if (i * in_size) // out_size <= cell < -((-(i + 1) * in_size) // out_size))
        most = max(most, inside)
    return most


def check_frame_elements(num_patches: int, channels: int) -> None:
    """Tile offsets within one frame's N * C elements are 32-bit in every kernel."""
    if num_patches * channels >= 2**31:
        raise ValueError(f"x: one frame holds N*C = {num_patches}*{channels} elements; the "
                         f"triton backend's 32-bit tile offsets need fewer than 2**31")


class _Layout:
    """Sizes shared by a forward or backward launch, batched or varlen."""

    def __init__(self, x: torch.Tensor, varlen: bool, num_heads: int, pool: str,
                 spatial: tuple, grid: tuple, frames_per_token: int, max_frames: int,
                 num_rows: Optional[int], batch: Optional[int]):
        self.varlen = varlen
        if varlen:
            self.batch = batch
            self.T = max_frames
            self.N, self.C = x.shape[1], x.shape[2]
            self.strides = (0, x.stride(0), x.stride(1))
        else:
            self.batch, self.T, self.N, self.C = x.shape
            self.strides = (x.stride(0), x.stride(1), x.stride(2))
        check_frame_elements(self.N, self.C)
        self.attn = pool == "attn"
        self.num_heads = num_heads if self.attn else 1
        self.head_dim = self.C // self.num_heads
        self.spatial = tuple(spatial)
        self.grid = tuple(grid)
        self.S = spatial[0] * spatial[1] if spatial else self.N
        self.G = 0 if varlen else _num_groups(self.T, frames_per_token)
        self.max_groups = _num_groups(self.T, frames_per_token)
        self.num_rows = num_rows if varlen else self.batch * self.G
        self.frames_per_token = frames_per_token
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.head_block = triton.next_power_of_2(self.head_dim)

    def channel_blocks(self, meta: dict) -> int:
        return self.num_heads if self.attn else triton.cdiv(self.C, meta["BLOCK_D"])

    def check_grid(self, kind: str) -> None:
        check_grid(self.batch, self.C, self.num_heads, self.attn, kind, "x",
                   "cu_frames: videos" if self.varlen else None)

    def spatial_args(self) -> tuple:
        if not self.spatial:
            return (1, 1, 1, 1)
        return (self.grid[0], self.grid[1], self.spatial[0], self.spatial[1])


# Programs per launch the patch-block splits aim for under the interpreter, where there is no
# device to fill: small, so that tests see programs that merge several patch blocks.
INTERPRET_TARGET_PROGRAMS = 6


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Enough programs to fill every SM several times over: the frame loop hides its load
    latency only with several programs per SM. More splits cost little (the partials grow by
    G x C floats per split and video, a few percent of x at 8 programs per SM)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 8 * _multiprocessors(index)
    return INTERPRET_TARGET_PROGRAMS


def _num_splits(num_patches: int, block_n: int, batch: int, channel_blocks: int,
                target: int) -> int:
    """Programs per (video, channel block): each owns every num_splits-th patch block. Grid
    axis 1, so at most MAX_GRID_YZ, which only the mean backward's one block per program (a
    frame of more than half a million patches) would pass."""
    return grid_slots(min(triton.cdiv(num_patches, block_n),
                          triton.cdiv(target, max(1, batch * channel_blocks))))


def config_pool(kind: str) -> list:
    """The configs a launch of ``kind`` may run: the pinned one, or those it is tuned over."""
    pinned = configs.pinned(kind)
    return [pinned] if pinned is not None else configs.active(kind)


def check_grid(batch: int, channels: int, num_heads: int, attn: bool, kind: str, tensor: str,
               videos: Optional[str] = None) -> None:
    """What bounds a launch's grid once long videos, many key tokens and large frames are
    folded: the videos on axis 0 (2**31 - 1), the channel blocks, one per head for attention,
    on axis 2 (65535). ``tensor`` names the features argument, ``videos`` the one that sets
    the batch when it is not the features' first dimension."""
    check_grid_axis(batch, MAX_GRID_X, videos or f"{tensor}: batch")
    if attn:
        check_grid_axis(num_heads, MAX_GRID_YZ, "num_heads")
    else:
        narrowest = min(c.kwargs["BLOCK_D"] for c in config_pool(kind))
        check_grid_axis(triton.cdiv(channels, narrowest), MAX_GRID_YZ,
                        f"{tensor}: C = {channels} channels in blocks of {narrowest}")


def _max_splits(layout: "_Layout", kind: str, target: int) -> int:
    """The most splits any config of ``kind`` can use: the partial buffers' leading size."""
    pool = config_pool(kind)
    fewest_channel_blocks = min(layout.channel_blocks(c.kwargs) for c in pool)
    return max(_num_splits(layout.N, c.kwargs["BLOCK_N"], layout.batch, fewest_channel_blocks,
                           target) for c in pool)


def _forward(x, key_index, query, cu_frames, cu_tokens, layout: _Layout, sequence, lse):
    kind = "attn_fwd" if layout.attn else "stream"
    layout.check_grid(kind)
    block_c = _combine_block(layout.C)
    # Checked before the first launch, so that a grid too large fails with nothing written.
    channel_blocks = _combine_channel_blocks(layout.C, block_c, "x")
    target = _target_programs(x.device)
    num_parts_max = _max_splits(layout, kind, target)
    part_acc = empty_output((num_parts_max, layout.num_rows, layout.C), torch.float32, x.device)
    if layout.attn:
        part_max = empty_output((num_parts_max, layout.num_rows, layout.num_heads),
                                torch.float32, x.device)
        part_sum = empty_output(part_max.shape, torch.float32, x.device)
    else:
        part_max = part_sum = part_acc
    query_arg = query if query is not None else part_acc
    cu_frames_arg = cu_frames if cu_frames is not None else key_index
    cu_tokens_arg = cu_tokens if cu_tokens is not None else key_index
    extra = {"BLOCK_D": layout.head_block} if layout.attn else {}

    def grid(meta):
        channel_blocks = layout.channel_blocks(meta)
        splits = _num_splits(layout.N, meta["BLOCK_N"], layout.batch, channel_blocks, target)
        return (layout.batch, splits, channel_blocks)

    meta = launch(
        encode_fwd_kernel, _fwd_attn if layout.attn else _fwd_stream, kind, grid,
        x, key_index, query_arg, cu_frames_arg, cu_tokens_arg,
        sequence, part_acc, part_max, part_sum,
        *layout.strides,
        layout.T, layout.N, layout.C, layout.S, layout.G, layout.num_rows, layout.head_dim,
        layout.num_heads, layout.frames_per_token, layout.scale,
        POOL_ATTN=layout.attn, IS_VARLEN=layout.varlen, WRITE_KEY=not layout.spatial, **extra,
    )
    for first, count in axis_chunks(layout.S if layout.spatial else 0):
        spatial_key_fwd_kernel[(layout.batch, count, channel_blocks)](
            x, key_index, cu_frames_arg, cu_tokens_arg, sequence, *layout.strides,
            layout.T, layout.C, layout.S, layout.G, layout.frames_per_token,
            *layout.spatial_args(), first, IS_VARLEN=layout.varlen, BLOCK_C=block_c,
        )
    for first, count in axis_chunks(layout.max_groups if layout.num_rows > 0 else 0):
        combine_kernel[(layout.batch, count, channel_blocks)](
            part_acc, part_max, part_sum, key_index, cu_frames_arg, cu_tokens_arg,
            sequence, lse if layout.attn else part_acc,
            layout.T, layout.N, layout.C, layout.S, layout.G, layout.num_rows,
            grid(meta)[1], layout.head_dim, layout.num_heads, layout.frames_per_token, first,
            POOL_ATTN=layout.attn, IS_VARLEN=layout.varlen, DIVIDE=True, BLOCK_C=block_c,
        )


def _backward(grad_sequence, x, key_index, query, sequence, lse, cu_frames, cu_tokens,
              layout: _Layout, grad_x):
    kind = "attn_bwd" if layout.attn else "stream"
    layout.check_grid(kind)
    # The mean backward leaves no partials: one patch block per program, the most parallelism.
    target = _target_programs(x.device) if layout.attn else 1 << 62
    num_parts_max = _max_splits(layout, kind, target)
    grad_sequence = grad_sequence.contiguous()
    if layout.attn:
        part_dq = empty_output((layout.batch, num_parts_max, layout.C), torch.float32, x.device)
        part_r = empty_output((num_parts_max, layout.num_rows, layout.C), torch.float32,
                              x.device)
        part_delta = empty_output((num_parts_max, layout.num_rows, layout.num_heads),
                                  torch.float32, x.device)
    else:
        part_dq = part_r = part_delta = grad_x
    cu_frames_arg = cu_frames if cu_frames is not None else key_index
    cu_tokens_arg = cu_tokens if cu_tokens is not None else key_index
    bins = ((bins_per_cell(layout.grid[0], layout.spatial[0]),
             bins_per_cell(layout.grid[1], layout.spatial[1])) if layout.spatial else (1, 1))
    extra = {"BLOCK_D": layout.head_block} if layout.attn else {}

    def grid(meta):
        channel_blocks = layout.channel_blocks(meta)
        splits = _num_splits(layout.N, meta["BLOCK_N"], layout.batch, channel_blocks, target)
        return (layout.batch, splits, channel_blocks)

    meta = launch(
        encode_bwd_kernel, _bwd_attn if layout.attn else _bwd_stream, kind, grid,
        grad_sequence, x, key_index, query if query is not None else grad_sequence,
        sequence, lse if layout.attn else grad_sequence, cu_frames_arg, cu_tokens_arg,
        grad_x, part_dq, part_r, part_delta,
        *layout.strides,
        layout.T, layout.N, layout.C, layout.S, layout.G, layout.num_rows, layout.head_dim,
        layout.num_heads,
        layout.frames_per_token, num_parts_max, layout.scale, *layout.spatial_args(),
        POOL_ATTN=layout.attn, IS_VARLEN=layout.varlen, SPATIAL=bool(layout.spatial),
        BINS_PER_ROW=bins[0], BINS_PER_COL=bins[1], **extra,
    )
    if not layout.attn:
        return None
    num_parts = grid(meta)[1]
    # grad_query = scale * (sum_i p_i <grad_r, d_i> d_i - sum_groups <grad_r, r> r), every sum
    # over (video, patch block) in a fixed order: the same bits on every run.
    weighted = part_dq[:, :num_parts].sum(dim=(0, 1))
    r = part_r[:num_parts].sum(dim=0)
    delta = part_delta[:num_parts].sum(dim=0).repeat_interleave(layout.head_dim, dim=1)
    return (weighted - (delta * r).sum(dim=0)) * layout.scale


@on_input_device
def encode_fwd(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid):
    """x: [B, T, N, C] -> (sequence [B, S+G, C], lse [B, G, heads] float32 or empty)."""
    layout = _Layout(x, False, num_heads, pool, spatial, grid, frames_per_token, 0, None, None)
    sequence = empty_output((layout.batch, layout.S + layout.G, layout.C), x.dtype, x.device)
    if layout.attn:
        lse = empty_output((layout.batch, layout.G, layout.num_heads), torch.float32, x.device)
    else:
        lse = empty_output((0,), torch.float32, x.device)
    _forward(x, key_index, query, None, None, layout, sequence, lse)
    return sequence, lse


@on_input_device
def encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
               frames_per_token, spatial, grid):
    """-> (grad_x [B, T, N, C] contiguous in x's dtype, grad_query float32 [C] or None)."""
    layout = _Layout(x, False, num_heads, pool, spatial, grid, frames_per_token, 0, None, None)
    grad_x = empty_output(x.shape, x.dtype, x.device)
    grad_query = _backward(grad_sequence, x, key_index, query, sequence, lse, None, None,
                           layout, grad_x)
    return grad_x, grad_query


@on_input_device
def encode_varlen_fwd(x, cu_frames, cu_tokens, key_index, query, pool, num_heads,
                      frames_per_token, spatial, grid, max_frames, total_tokens):
    """x: [F, N, C] packed -> (sequence [L, C], lse [sum_b G_b, heads] float32 or empty)."""
    batch = cu_frames.numel() - 1
    S = spatial[0] * spatial[1] if spatial else x.shape[1]
    num_rows = total_tokens - batch * S
    layout = _Layout(x, True, num_heads, pool, spatial, grid, frames_per_token, max_frames,
                     num_rows, batch)
    sequence = empty_output((total_tokens, layout.C), x.dtype, x.device)
    if layout.attn:
        lse = empty_output((num_rows, layout.num_heads), torch.float32, x.device)
    else:
        lse = empty_output((0,), torch.float32, x.device)
    if batch > 0:
        _forward(x, key_index, query, cu_frames, cu_tokens, layout, sequence, lse)
    return sequence, lse


@on_input_device
def encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse,
                      pool, num_heads, frames_per_token, spatial, grid, max_frames):
    """-> (grad_x [F, N, C] contiguous in x's dtype, grad_query float32 [C] or None)."""
    batch = cu_frames.numel() - 1
    S = spatial[0] * spatial[1] if spatial else x.shape[1]
    num_rows = sequence.shape[0] - batch * S
    layout = _Layout(x, True, num_heads, pool, spatial, grid, frames_per_token, max_frames,
                     num_rows, batch)
    grad_x = empty_output(x.shape, x.dtype, x.device)
    if batch == 0:
        grad_query = torch.zeros_like(query) if layout.attn else None
        return grad_x, grad_query
    grad_query = _backward(grad_sequence, x, key_index, query, sequence, lse, cu_frames,
                           cu_tokens, layout, grad_x)
    return grad_x, grad_query
