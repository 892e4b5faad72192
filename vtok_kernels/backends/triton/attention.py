"""Triton kernels of attention pooling, forward and backward (launched by encode.py).

A program owns one video, one head and a set of patch blocks, as the mean kernels do (see
encode.py for the split and the partials). The head is split into two power-of-two channel
blocks, the largest power of two in the head and a block for the rest: 72 channels (SigLIP
with 16 heads) are 64 + 8, 144 are 128 + 16, 64 and 128 are one block. Against a single block
of the next power of two (128 for 72, 256 for 144) no lane holds padding, so a program keeps
twice the patches in the same registers; and with the head size a compile-time constant the
compiler knows every block starts at a multiple of 8 or 16 channels and loads 16 bytes at a
time (a run-time head size of 72 left it 2-byte loads).

The softmax runs online over a group's frames and patch blocks: a running max and weight sum
per (program, group) and a weighted sum of residuals; partials of the programs are merged in
a fixed order by encode.py's combine kernel. The backward recomputes each residual tile and
the probabilities from the saved log-sum-exp.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vtok_kernels.backends.triton.tiles import key_token_grad, load_x, program_layout


def head_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_HI, BLOCK_LO): the largest power of two in the head, and a power-of-two block
    that holds the rest (0 when the head is a power of two)."""
    hi = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - hi
    return hi, (triton.next_power_of_2(rest) if rest else 0)


@triton.jit
def _partial(ptr, block, split, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """What earlier patch blocks of this program stored at ptr (zero for its first block). The
    flag is spelled per lane: the interpreter takes no vector-and-scalar masks."""
    offs = tl.arange(0, BLOCK)
    return tl.load(ptr + offs, mask=(offs < WIDTH) & ((offs * 0 + block) > split), other=0.0)


@triton.jit
def _store_chunk(ptr, value, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=offs < WIDTH)


@triton.jit
def attn_fwd_kernel(
    x_ptr, key_ptr, query_ptr, cu_frames_ptr, cu_tokens_ptr,
    seq_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_xb, stride_xt, stride_xn,
    T, N, C, S, G, NUM_ROWS, NUM_HEADS, FRAMES_PER_TOKEN, scale,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, WRITE_KEY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_LO: tl.constexpr,
):
    (video, split, num_splits, head, frame0, num_frames, token0, group0, key,
     num_groups) = program_layout(key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G,
                                  FRAMES_PER_TOKEN, IS_VARLEN)
    HAS_LO: tl.constexpr = BLOCK_LO > 0
    LO_WIDTH: tl.constexpr = HEAD_DIM - BLOCK_HI
    c_hi = head * HEAD_DIM
    c_lo = c_hi + BLOCK_HI
    offs_hi = tl.arange(0, BLOCK_HI)
    x_video = x_ptr + video.to(tl.int64) * stride_xb + frame0 * stride_xt
    # The 1/sqrt(head size) is folded into the query once instead of into every score.
    q_hi = tl.load(query_ptr + c_hi + offs_hi).to(tl.float32) * scale
    if HAS_LO:
        offs_lo = tl.arange(0, BLOCK_LO)
        q_lo = tl.load(query_ptr + c_lo + offs_lo, mask=offs_lo < LO_WIDTH,
                       other=0.0).to(tl.float32) * scale
    # The form of x's tile pointers that ptxas allocates best here (see tiles.x_tile).
    ROW_POINTERS: tl.constexpr = BLOCK_HI >= 128

    # A program walks patch blocks split, split + num_splits, ...: few enough programs that
    # the per-group partials (one row per program, merged in place) stay small next to x.
    for block in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        # 64-bit: a view's patch stride is unbounded (in a patch-major buffer, N * stride_xn
        # passes 2**31).
        rows = offs_n.to(tl.int64) * stride_xn
        key_frame = x_video + key * stride_xt
        key_hi = load_x(key_frame, rows, mask_n, c_hi, BLOCK_HI, BLOCK_HI, ROW_POINTERS)
        if HAS_LO:
            key_lo = load_x(key_frame, rows, mask_n, c_lo, LO_WIDTH, BLOCK_LO, ROW_POINTERS)
        if WRITE_KEY:
            seq_rows = seq_ptr + token0 * C + offs_n[:, None] * C
            tl.store(seq_rows + (c_hi + offs_hi)[None, :],
                     key_hi.to(seq_ptr.dtype.element_ty), mask=mask_n[:, None])
            if HAS_LO:
                tl.store(seq_rows + (c_lo + offs_lo)[None, :],
                         key_lo.to(seq_ptr.dtype.element_ty),
                         mask=mask_n[:, None] & (offs_lo < LO_WIDTH)[None, :])
        # Earlier blocks of this program left partials to merge into.
        merge = block > split
        for g in range(0, num_groups):
            first = g * FRAMES_PER_TOKEN
            last = tl.minimum(first + FRAMES_PER_TOKEN, num_frames - 1)
            run_max = tl.full([], float("-inf"), tl.float32)
            run_sum = tl.zeros([], dtype=tl.float32)
            acc_hi = tl.zeros([BLOCK_HI], dtype=tl.float32)
            if HAS_LO:
                acc_lo = tl.zeros([BLOCK_LO], dtype=tl.float32)
            for rank in range(first, last):
                # 64-bit: frame * stride_xt passes 2**31 in a time-major buffer of a few frames.
                frame = tl.where(rank < key, rank, rank + 1).to(tl.int64)
                frame_ptr = x_video + frame * stride_xt
                res_hi = load_x(frame_ptr, rows, mask_n, c_hi, BLOCK_HI, BLOCK_HI,
                                ROW_POINTERS) - key_hi
                score = tl.sum(res_hi * q_hi[None, :], axis=1)
                if HAS_LO:
                    res_lo = load_x(frame_ptr, rows, mask_n, c_lo, LO_WIDTH, BLOCK_LO,
                                    ROW_POINTERS) - key_lo
                    score += tl.sum(res_lo * q_lo[None, :], axis=1)
                score = tl.where(mask_n, score, float("-inf"))
                new_max = tl.maximum(run_max, tl.max(score, axis=0))
                rescale = tl.exp(run_max - new_max)
                weight = tl.exp(score - new_max)
                run_sum = run_sum * rescale + tl.sum(weight, axis=0)
                acc_hi = acc_hi * rescale + tl.sum(weight[:, None] * res_hi, axis=0)
                if HAS_LO:
                    acc_lo = acc_lo * rescale + tl.sum(weight[:, None] * res_lo, axis=0)
                run_max = new_max
            part = split.to(tl.int64) * NUM_ROWS + group0 + g
            stat = part * NUM_HEADS + head
            acc_row = part_acc_ptr + part * C
            # Another thread of this program may have stored the partial: the barrier makes
            # its store visible before the merge reads it.
            tl.debug_barrier()
            prev_max = tl.load(part_max_ptr + stat, mask=merge, other=float("-inf"))
            prev_sum = tl.load(part_sum_ptr + stat, mask=merge, other=0.0)
            new_max = tl.maximum(prev_max, run_max)
            # exp(-inf - m) = 0 drops the empty side; a finite reference avoids -inf - -inf.
            ref_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            prev_scale = tl.exp(prev_max - ref_max)
            run_scale = tl.exp(run_max - ref_max)
            acc_hi = (_partial(acc_row + c_hi, block, split, BLOCK_HI, BLOCK_HI) * prev_scale
                      + acc_hi * run_scale)
            if HAS_LO:
                acc_lo = (_partial(acc_row + c_lo, block, split, LO_WIDTH, BLOCK_LO) * prev_scale
                          + acc_lo * run_scale)
            run_sum = prev_sum * prev_scale + run_sum * run_scale
            tl.debug_barrier()
            _store_chunk(acc_row + c_hi, acc_hi, BLOCK_HI, BLOCK_HI)
            if HAS_LO:
                _store_chunk(acc_row + c_lo, acc_lo, LO_WIDTH, BLOCK_LO)
            tl.store(part_max_ptr + stat, new_max)
            tl.store(part_sum_ptr + stat, run_sum)


@triton.jit
def _grad_residual(prob, grad_score, grad_r, q):
    """d loss / d residual of one channel block: p grad_r + d score q."""
    return prob[:, None] * grad_r[None, :] + grad_score[:, None] * q[None, :]


@triton.jit
def attn_bwd_kernel(
    grad_seq_ptr, x_ptr, key_ptr, query_ptr, seq_ptr, lse_ptr, cu_frames_ptr, cu_tokens_ptr,
    grad_x_ptr, part_dq_ptr, part_r_ptr, part_delta_ptr,
    stride_xb, stride_xt, stride_xn,
    T, N, C, S, G, NUM_ROWS, NUM_HEADS, FRAMES_PER_TOKEN, DQ_PARTS, scale,
    GRID_H, GRID_W, OUT_H, OUT_W,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, SPATIAL: tl.constexpr,
    BINS_PER_ROW: tl.constexpr, BINS_PER_COL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_LO: tl.constexpr,
):
    (video, split, num_splits, head, frame0, num_frames, token0, group0, key,
     num_groups) = program_layout(key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G,
                                  FRAMES_PER_TOKEN, IS_VARLEN)
    HAS_LO: tl.constexpr = BLOCK_LO > 0
    LO_WIDTH: tl.constexpr = HEAD_DIM - BLOCK_HI
    c_hi = head * HEAD_DIM
    c_lo = c_hi + BLOCK_HI
    offs_hi = tl.arange(0, BLOCK_HI)
    chans_hi = c_hi + offs_hi
    all_hi = offs_hi < BLOCK_HI
    # grad_x is contiguous [frames, N, C]; batched videos are T frames apart.
    if IS_VARLEN:
        grad_video = grad_x_ptr + frame0 * N * C
    else:
        grad_video = grad_x_ptr + video.to(tl.int64) * T * N * C
    x_video = x_ptr + video.to(tl.int64) * stride_xb + frame0 * stride_xt
    q_hi = tl.load(query_ptr + chans_hi).to(tl.float32) * scale
    grad_q_hi = tl.zeros([BLOCK_HI], dtype=tl.float32)
    if HAS_LO:
        offs_lo = tl.arange(0, BLOCK_LO)
        chans_lo = c_lo + offs_lo
        mask_lo = offs_lo < LO_WIDTH
        q_lo = tl.load(query_ptr + chans_lo, mask=mask_lo, other=0.0).to(tl.float32) * scale
        grad_q_lo = tl.zeros([BLOCK_LO], dtype=tl.float32)

    # Patch blocks split, split + num_splits, ... as in the forward.
    for block in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        # 32-bit: grad_x is contiguous, so a tile stays within one frame's N * C elements.
        grad_rows = offs_n[:, None] * C
        # 64-bit: x's patch stride is unbounded (see the forward).
        rows = offs_n.to(tl.int64) * stride_xn
        merge = block > split
        key_frame = x_video + key * stride_xt
        key_hi = load_x(key_frame, rows, mask_n, c_hi, BLOCK_HI, BLOCK_HI, False)
        grad_key_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
        if HAS_LO:
            key_lo = load_x(key_frame, rows, mask_n, c_lo, LO_WIDTH, BLOCK_LO, False)
            grad_key_lo = tl.zeros([BLOCK_N, BLOCK_LO], dtype=tl.float32)

        for g in range(0, num_groups):
            first = g * FRAMES_PER_TOKEN
            last = tl.minimum(first + FRAMES_PER_TOKEN, num_frames - 1)
            token_row = (token0 + S + g) * C
            grad_r_hi = tl.load(grad_seq_ptr + token_row + chans_hi).to(tl.float32)
            r_hi = tl.load(seq_ptr + token_row + chans_hi).to(tl.float32)
            grad_r_dot_r = tl.sum(grad_r_hi * r_hi, axis=0)
            if HAS_LO:
                grad_r_lo = tl.load(grad_seq_ptr + token_row + chans_lo, mask=mask_lo,
                                    other=0.0).to(tl.float32)
                r_lo = tl.load(seq_ptr + token_row + chans_lo, mask=mask_lo,
                               other=0.0).to(tl.float32)
                grad_r_dot_r += tl.sum(grad_r_lo * r_lo, axis=0)
            lse = tl.load(lse_ptr + (group0 + g) * NUM_HEADS + head)
            # This group's share, over this patch block, of r = sum p d and of
            # <grad_r, r> = sum p <grad_r, d>, both exact in float32: grad_query is
            # sum p <grad_r, d> d - <grad_r, r> r, a difference of near-equal terms that the
            # rounded r of the sequence would swamp.
            r_part_hi = tl.zeros([BLOCK_HI], dtype=tl.float32)
            if HAS_LO:
                r_part_lo = tl.zeros([BLOCK_LO], dtype=tl.float32)
            delta_part = tl.zeros([], dtype=tl.float32)
            for rank in range(first, last):
                # 64-bit: frame * stride_xt (strided x) and frame * N * C (a long video's
                # grad_x) pass 2**31. Not spelled with tl.where as in the forward: that took
                # more registers in the backward (compile-check).
                frame = rank + (rank >= key).to(tl.int64)
                frame_ptr = x_video + frame * stride_xt
                res_hi = load_x(frame_ptr, rows, mask_n, c_hi, BLOCK_HI, BLOCK_HI, False) - key_hi
                score = tl.sum(res_hi * q_hi[None, :], axis=1)
                dot = tl.sum(res_hi * grad_r_hi[None, :], axis=1)
                if HAS_LO:
                    res_lo = load_x(frame_ptr, rows, mask_n, c_lo, LO_WIDTH, BLOCK_LO,
                                    False) - key_lo
                    score += tl.sum(res_lo * q_lo[None, :], axis=1)
                    dot += tl.sum(res_lo * grad_r_lo[None, :], axis=1)
                prob = tl.where(mask_n, tl.exp(score - lse), 0.0)
                prob_grad = prob * dot
                # d score = p * (<grad_r, d> - <grad_r, r>); q already carries 1/sqrt(c).
                grad_score = prob_grad - prob * grad_r_dot_r
                grad_frame = grad_video + frame * N * C + grad_rows
                grad_res_hi = _grad_residual(prob, grad_score, grad_r_hi, q_hi)
                tl.store(grad_frame + chans_hi[None, :],
                         grad_res_hi.to(grad_x_ptr.dtype.element_ty),
                         mask=mask_n[:, None] & all_hi[None, :])
                grad_key_hi -= grad_res_hi
                grad_q_hi += tl.sum(prob_grad[:, None] * res_hi, axis=0)
                r_part_hi += tl.sum(prob[:, None] * res_hi, axis=0)
                if HAS_LO:
                    grad_res_lo = _grad_residual(prob, grad_score, grad_r_lo, q_lo)
                    tl.store(grad_frame + chans_lo[None, :],
                             grad_res_lo.to(grad_x_ptr.dtype.element_ty),
                             mask=mask_n[:, None] & mask_lo[None, :])
                    grad_key_lo -= grad_res_lo
                    grad_q_lo += tl.sum(prob_grad[:, None] * res_lo, axis=0)
                    r_part_lo += tl.sum(prob[:, None] * res_lo, axis=0)
                delta_part += tl.sum(prob_grad, axis=0)
            part = split.to(tl.int64) * NUM_ROWS + group0 + g
            r_row = part_r_ptr + part * C
            delta_ptr = part_delta_ptr + part * NUM_HEADS + head
            # Merge into what earlier blocks of this program stored (barrier: another thread
            # may have stored it).
            tl.debug_barrier()
            r_part_hi += _partial(r_row + c_hi, block, split, BLOCK_HI, BLOCK_HI)
            if HAS_LO:
                r_part_lo += _partial(r_row + c_lo, block, split, LO_WIDTH, BLOCK_LO)
            delta_part += tl.load(delta_ptr, mask=merge, other=0.0)
            tl.debug_barrier()
            tl.store(r_row + chans_hi, r_part_hi)
            if HAS_LO:
                tl.store(r_row + chans_lo, r_part_lo, mask=mask_lo)
            tl.store(delta_ptr, delta_part)

        grad_key_hi += key_token_grad(grad_seq_ptr, token0, C, offs_n, mask_n, chans_hi, all_hi,
                                      GRID_H, GRID_W, OUT_H, OUT_W, SPATIAL, BINS_PER_ROW,
                                      BINS_PER_COL)
        key_grad_frame = grad_video + key * N * C + grad_rows
        tl.store(key_grad_frame + chans_hi[None, :], grad_key_hi.to(grad_x_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & all_hi[None, :])
        if HAS_LO:
            grad_key_lo += key_token_grad(grad_seq_ptr, token0, C, offs_n, mask_n, chans_lo,
                                          mask_lo, GRID_H, GRID_W, OUT_H, OUT_W, SPATIAL,
                                          BINS_PER_ROW, BINS_PER_COL)
            tl.store(key_grad_frame + chans_lo[None, :],
                     grad_key_lo.to(grad_x_ptr.dtype.element_ty),
                     mask=mask_n[:, None] & mask_lo[None, :])
    dq_row = part_dq_ptr + (video.to(tl.int64) * DQ_PARTS + split) * C
    tl.store(dq_row + chans_hi, grad_q_hi)
    if HAS_LO:
        tl.store(dq_row + chans_lo, grad_q_lo, mask=mask_lo)
