"""Triton kernels of attention pooling, forward and backward (launched by encode.py).

Programs are laid out as the mean forward's (encode.py): one warp, its lanes along the head's
channels, so a tile's sums over its rows and over its channels are registers and shuffles. The
forward's program owns (video x chunk of groups, split of patch rows, head) and keeps the
chunk's online-softmax states (running max, sum of weights, weighted sum of residuals) in
registers; the programs' partial states are merged in split order, head by head, by
attn_combine_kernel. The backward's program owns (video, split of patch rows, head) and walks
every frame: it recomputes each residual tile and its probabilities from the saved
log-sum-exp, and reads <grad r, r> from attn_delta_kernel, which takes r from the forward's
float32 residual tokens.

The head is split into two power-of-two channel blocks, the largest power of two in the head
and a block for the rest: 72 channels (SigLIP with 16 heads) are 64 + 8, 144 are 128 + 16, 64
and 128 are one block. Against a single block of the next power of two (128 for 72, 256 for
144) no lane holds padding; and with the head size a compile-time constant the compiler knows
every block starts at a multiple of 8 or 16 channels and loads 16 bytes at a time (a run-time
head size of 72 left it 2-byte loads). The two blocks' tiles are laid out differently, so a
row's score, summed over both, passes through shared memory once per frame there.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vtok_kernels.backends.triton.tiles import (
    chunk_layout, key_token_grad, load_rows, load_x, program_layout, split_rows, video_layout,
    widen)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def head_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_HI, BLOCK_LO): the largest power of two in the head, and a power-of-two block
    that holds the rest (0 when the head is a power of two)."""
    hi = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - hi
    return hi, (triton.next_power_of_2(rest) if rest else 0)


@triton.jit
def attn_fwd_kernel(
    x_ptr, key_ptr, query_ptr, cu_frames_ptr, cu_tokens_ptr,
    seq_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_xb, stride_xt, stride_xn,
    T, N, C, S, G, NUM_ROWS, NUM_HEADS, FRAMES_PER_TOKEN, MAX_GROUPS, scale,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, WRITE_KEY: tl.constexpr,
    INLINE_PTX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_LO: tl.constexpr,
    CHUNK_G: tl.constexpr,
):
    """Attention pooling, forward: program (video x chunk, split, head) pools the split's patch
    rows of one head for each of the chunk's CHUNK_G groups, as the mean forward does
    (encode.mean_fwd_kernel: one warp, lanes along the channels, the chunk's state in
    registers, stored once). The state of a group is an online softmax over its frames' rows:
    running max, sum of weights, weighted sum of residuals; each frame's tile is merged into
    its group's slot.

    Scores are taken in base 2 (the query carries log2(e)), so that each weight is one
    ex2.approx.ftz (tl.exp2; tl.exp adds a multiply, a range test and two predicated
    multiplies to keep denormal results); the partial maxima are stored so,
    attn_combine_kernel's lse in natural units.
    A tile's rows past the split's end load the split's last row again (clamped, not masked):
    no predicated loads nor zeroed registers per frame; their scores are -inf, their weights 0."""
    (video, chunk, frame0, token0, group0, key, num_groups, group_begin, rank_begin, rank_end,
     row_begin, row_end, row_stop) = chunk_layout(key_ptr, cu_frames_ptr, cu_tokens_ptr, T, N, S,
                                                  G, FRAMES_PER_TOKEN, MAX_GROUPS, CHUNK_G,
                                                  IS_VARLEN)
    head = tl.program_id(2)
    HAS_LO: tl.constexpr = BLOCK_LO > 0
    LO_WIDTH: tl.constexpr = HEAD_DIM - BLOCK_HI
    c_hi = head * HEAD_DIM
    c_lo = c_hi + BLOCK_HI
    offs_hi = tl.arange(0, BLOCK_HI)
    x_video = x_ptr + video.to(tl.int64) * stride_xb + frame0 * stride_xt
    # 1/sqrt(head size) and log2(e) are folded into the query once instead of into every score.
    q_scale = scale * LOG2E
    q_hi = tl.load(query_ptr + c_hi + offs_hi).to(tl.float32) * q_scale
    if HAS_LO:
        offs_lo = tl.arange(0, BLOCK_LO)
        q_lo = tl.load(query_ptr + c_lo + offs_lo, mask=offs_lo < LO_WIDTH,
                       other=0.0).to(tl.float32) * q_scale
    offs_g = tl.arange(0, CHUNK_G)
    run_max = tl.full([CHUNK_G], float("-inf"), tl.float32)
    run_sum = tl.zeros([CHUNK_G], dtype=tl.float32)
    acc_hi = tl.zeros([CHUNK_G, BLOCK_HI], dtype=tl.float32)
    if HAS_LO:
        acc_lo = tl.zeros([CHUNK_G, BLOCK_LO], dtype=tl.float32)

    for n0 in range(row_begin, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < row_end
        # 64-bit: a view's patch stride is unbounded (in a patch-major buffer, N * stride_xn
        # passes 2**31).
        rows = tl.minimum(offs_n, row_end - 1).to(tl.int64) * stride_xn
        key_frame = x_video + key * stride_xt
        key_hi_x = load_rows(key_frame, rows, c_hi, BLOCK_HI, BLOCK_HI)
        if HAS_LO:
            key_lo_x = load_rows(key_frame, rows, c_lo, LO_WIDTH, BLOCK_LO)
        if WRITE_KEY:
            # The key tokens once per video: by the programs of its first chunk, from the
            # tile as loaded (widened, it would be narrowed again).
            first_chunk = mask_n & ((offs_n * 0 + chunk) == 0)
            seq_rows = seq_ptr + token0 * C + offs_n[:, None] * C
            tl.store(seq_rows + (c_hi + offs_hi)[None, :],
                     key_hi_x.to(seq_ptr.dtype.element_ty), mask=first_chunk[:, None])
            if HAS_LO:
                tl.store(seq_rows + (c_lo + offs_lo)[None, :],
                         key_lo_x.to(seq_ptr.dtype.element_ty),
                         mask=first_chunk[:, None] & (offs_lo < LO_WIDTH)[None, :])
        key_hi = widen(key_hi_x, INLINE_PTX)
        if HAS_LO:
            key_lo = widen(key_lo_x, INLINE_PTX)
        # Each frame's tile is loaded one frame ahead of its use: two tiles of x in flight per
        # thread. The next rank is clamped to the chunk's last (re-read, from L1); a chunk
        # without frames loads the key frame again, and uses nothing of it. 64-bit: frame *
        # stride_xt passes 2**31 in a time-major buffer of a few frames.
        first = tl.where(rank_begin < key, rank_begin, rank_begin + 1)
        first = tl.where(rank_end > rank_begin, first, key)
        ahead_ptr = x_video + first.to(tl.int64) * stride_xt
        next_hi = widen(load_rows(ahead_ptr, rows, c_hi, BLOCK_HI, BLOCK_HI), INLINE_PTX)
        if HAS_LO:
            next_lo = widen(load_rows(ahead_ptr, rows, c_lo, LO_WIDTH, BLOCK_LO), INLINE_PTX)
        # The frame's group within the chunk, counted rather than divided.
        slot = rank_begin * 0
        frames_left = FRAMES_PER_TOKEN
        for rank in range(rank_begin, rank_end):
            res_hi = next_hi - key_hi
            if HAS_LO:
                res_lo = next_lo - key_lo
            following = tl.minimum(rank + 1, rank_end - 1)
            ahead_ptr = x_video + tl.where(following < key, following, following + 1).to(
                tl.int64) * stride_xt
            next_hi = widen(load_rows(ahead_ptr, rows, c_hi, BLOCK_HI, BLOCK_HI), INLINE_PTX)
            if HAS_LO:
                next_lo = widen(load_rows(ahead_ptr, rows, c_lo, LO_WIDTH, BLOCK_LO), INLINE_PTX)
            score = tl.sum(res_hi * q_hi[None, :], axis=1)
            if HAS_LO:
                score += tl.sum(res_lo * q_lo[None, :], axis=1)
            score = tl.where(mask_n, score, float("-inf"))
            in_slot = offs_g == slot
            old_max = tl.max(tl.where(in_slot, run_max, float("-inf")), axis=0)
            new_max = tl.maximum(old_max, tl.max(score, axis=0))
            rescale = tl.exp2(old_max - new_max)
            weight = tl.exp2(score - new_max)
            run_sum = tl.where(in_slot, run_sum * rescale + tl.sum(weight, axis=0), run_sum)
            run_max = tl.where(in_slot, new_max, run_max)
            acc_hi = tl.where(in_slot[:, None],
                              acc_hi * rescale + tl.sum(weight[:, None] * res_hi, axis=0)[None, :],
                              acc_hi)
            if HAS_LO:
                acc_lo = tl.where(
                    in_slot[:, None],
                    acc_lo * rescale + tl.sum(weight[:, None] * res_lo, axis=0)[None, :],
                    acc_lo)
            frames_left -= 1
            slot = tl.where(frames_left == 0, slot + 1, slot)
            frames_left = tl.where(frames_left == 0, FRAMES_PER_TOKEN, frames_left)
    # The split's partial states of the chunk's groups (those the video has), stored once.
    stored = (group_begin + offs_g) < num_groups
    part = tl.program_id(1).to(tl.int64) * NUM_ROWS + group0 + group_begin + offs_g
    acc_rows = part_acc_ptr + part[:, None] * C
    tl.store(acc_rows + (c_hi + offs_hi)[None, :], acc_hi, mask=stored[:, None])
    if HAS_LO:
        tl.store(acc_rows + (c_lo + offs_lo)[None, :], acc_lo,
                 mask=stored[:, None] & (offs_lo < LO_WIDTH)[None, :])
    tl.store(part_max_ptr + part * NUM_HEADS + head, run_max, mask=stored)
    tl.store(part_sum_ptr + part * NUM_HEADS + head, run_sum, mask=stored)


@triton.jit
def attn_combine_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, key_ptr, cu_frames_ptr, cu_tokens_ptr,
    out_ptr, lse_ptr, residual32_ptr,
    T, S, G, NUM_ROWS, NUM_PARTS, NUM_HEADS, FRAMES_PER_TOKEN, FIRST_GROUP,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, KEEP_RESIDUAL32: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the forward's partial states of one group (attn_fwd_kernel's, one per split of
    the patch rows, maxima in base 2), in split order, into its residual token, its
    log-sum-exp per head (natural units, as the backward takes it) and, with KEEP_RESIDUAL32,
    the token in float32 at its lse row for the backward.

    Program (video, group, block of BLOCK_HEADS heads): a [heads, channels] tile, so that each
    split's max and sum are loaded, and its weight taken, once per head rather than once per
    channel. Output row of group g: token0 + S + g; groups from FIRST_GROUP on (a video with
    more groups than grid axis 1 holds takes several launches)."""
    video = tl.program_id(0)
    g = FIRST_GROUP + tl.program_id(1)
    frame0, num_frames, token0, group0, key, num_groups = video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    C = NUM_HEADS * HEAD_DIM
    heads = tl.program_id(2) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    live = (heads < NUM_HEADS) & ((heads * 0 + g) < num_groups)
    mask = live[:, None] & (offs_d < HEAD_DIM)[None, :]
    chans = heads[:, None] * HEAD_DIM + offs_d[None, :]
    # row is 64-bit (group0 is); p * NUM_ROWS stays 32-bit, below the partials' row count.
    row = group0 + g
    best = tl.full([BLOCK_HEADS], float("-inf"), tl.float32)
    for p in range(0, NUM_PARTS):
        best = tl.maximum(best, tl.load(part_max_ptr + (p * NUM_ROWS + row) * NUM_HEADS + heads,
                                        mask=live, other=float("-inf")))
    # Heads past the last, or a group past a short video's last: a finite reference, so that
    # nothing computes exp(-inf - -inf).
    best = tl.where(live, best, 0.0)
    total = tl.zeros([BLOCK_HEADS], dtype=tl.float32)
    acc = tl.zeros([BLOCK_HEADS, BLOCK_D], dtype=tl.float32)
    for p in range(0, NUM_PARTS):
        part = p * NUM_ROWS + row
        part_max = tl.load(part_max_ptr + part * NUM_HEADS + heads, mask=live,
                           other=float("-inf"))
        factor = tl.exp2(part_max - best)
        total += factor * tl.load(part_sum_ptr + part * NUM_HEADS + heads, mask=live, other=0.0)
        acc += factor[:, None] * tl.load(part_acc_ptr + part * C + chans, mask=mask, other=0.0)
    total = tl.where(live, total, 1.0)
    result = acc / total[:, None]
    tl.store(lse_ptr + row * NUM_HEADS + heads, best * LN2 + tl.log(total), mask=live)
    tl.store(out_ptr + (token0 + S + g) * C + chans, result.to(out_ptr.dtype.element_ty),
             mask=mask)
    if KEEP_RESIDUAL32:
        tl.store(residual32_ptr + row * C + chans, result, mask=mask)


def combine_heads(num_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_HEADS, BLOCK_D) of attn_combine_kernel: the head padded to a power of two, and
    the most heads per program that divide num_heads as a power of two, up to 1024 lanes of
    channels (SigLIP's 18 heads of 64: 2 per program, 9 programs; CLIP-L's 16 of 64: all 16)."""
    block_d = triton.next_power_of_2(head_dim)
    heads = 1
    while num_heads % (2 * heads) == 0 and 2 * heads * block_d <= 1024:
        heads *= 2
    return heads, block_d


@triton.jit
def _grad_residual(prob, grad_score, grad_r, q):
    """d loss / d residual of one channel block: p grad_r + d score q (grad_r per row)."""
    return prob[:, None] * grad_r + grad_score[:, None] * q[None, :]


@triton.jit
def attn_delta_kernel(
    grad_seq_ptr, residual_ptr, key_ptr, cu_frames_ptr, cu_tokens_ptr, delta_ptr,
    T, S, G, NUM_HEADS, FRAMES_PER_TOKEN, FIRST_GROUP,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_HI: tl.constexpr, BLOCK_LO: tl.constexpr,
):
    """<grad r, r> of one (group, head), r the forward's float32 residual token: the
    softmax backward's row term, in the layout of lse. Groups from FIRST_GROUP on (grid axis
    1 as the combine kernel's)."""
    video = tl.program_id(0)
    g = FIRST_GROUP + tl.program_id(1)
    head = tl.program_id(2)
    frame0, num_frames, token0, group0, key, num_groups = video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    HAS_LO: tl.constexpr = BLOCK_LO > 0
    LO_WIDTH: tl.constexpr = HEAD_DIM - BLOCK_HI
    C = NUM_HEADS * HEAD_DIM
    row = group0 + g
    c_hi = head * HEAD_DIM
    offs_hi = tl.arange(0, BLOCK_HI)
    valid_hi = (offs_hi * 0 + g) < num_groups
    grad_row = grad_seq_ptr + (token0 + S + g) * C
    res_row = residual_ptr + row * C
    dot = tl.sum(tl.load(grad_row + c_hi + offs_hi, mask=valid_hi, other=0.0).to(tl.float32)
                 * tl.load(res_row + c_hi + offs_hi, mask=valid_hi, other=0.0), axis=0)
    if HAS_LO:
        offs_lo = tl.arange(0, BLOCK_LO)
        mask_lo = (offs_lo < LO_WIDTH) & ((offs_lo * 0 + g) < num_groups)
        c_lo = c_hi + BLOCK_HI
        dot += tl.sum(tl.load(grad_row + c_lo + offs_lo, mask=mask_lo, other=0.0).to(tl.float32)
                      * tl.load(res_row + c_lo + offs_lo, mask=mask_lo, other=0.0), axis=0)
    tl.store(delta_ptr + row * NUM_HEADS + head + offs_hi * 0, dot + offs_hi * 0.0,
             mask=valid_hi & (offs_hi == 0))


@triton.jit
def attn_bwd_kernel(
    grad_seq_ptr, x_ptr, key_ptr, query_ptr, lse_ptr, delta_ptr, cu_frames_ptr, cu_tokens_ptr,
    grad_x_ptr, part_dq_ptr,
    stride_xb, stride_xt, stride_xn,
    T, N, C, S, G, NUM_HEADS, FRAMES_PER_TOKEN, DQ_PARTS, scale,
    GRID_H, GRID_W, OUT_H, OUT_W,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, SPATIAL: tl.constexpr,
    BINS_PER_ROW: tl.constexpr, BINS_PER_COL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_LO: tl.constexpr,
):
    """Attention pooling, backward: program (video, split, head) owns a contiguous range of
    patch rows (a split) of one head and walks every frame of the video for them: it writes
    their gradient, accumulates the key frame's (minus the sum over its residuals) in
    registers, and its share of sum p <grad r, d> d, grad_query's first term, stored once.
    One warp with its lanes along the head's channels: the sums over channels and over rows
    are shuffles, with no shared memory nor barrier. <grad r, r> per (group, head) comes in
    (attn_delta_kernel), from the forward's float32 residual tokens."""
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
    # grad_query's first term per (row, channel) of the tile: summed over the rows once, at the
    # end, rather than per frame.
    grad_q_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
    if HAS_LO:
        offs_lo = tl.arange(0, BLOCK_LO)
        chans_lo = c_lo + offs_lo
        mask_lo = offs_lo < LO_WIDTH
        q_lo = tl.load(query_ptr + chans_lo, mask=mask_lo, other=0.0).to(tl.float32) * scale
        grad_q_lo = tl.zeros([BLOCK_N, BLOCK_LO], dtype=tl.float32)
    row_begin, row_end = split_rows(N)

    for n0 in range(row_begin, row_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < row_end
        # 32-bit: grad_x is contiguous, so a tile stays within one frame's N * C elements.
        grad_rows = offs_n[:, None] * C
        # 64-bit: x's patch stride is unbounded (see the forward).
        rows = offs_n.to(tl.int64) * stride_xn
        key_frame = x_video + key * stride_xt
        key_hi = load_x(key_frame, rows, mask_n, c_hi, BLOCK_HI, BLOCK_HI, False)
        grad_key_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
        if HAS_LO:
            key_lo = load_x(key_frame, rows, mask_n, c_lo, LO_WIDTH, BLOCK_LO, False)
            grad_key_lo = tl.zeros([BLOCK_N, BLOCK_LO], dtype=tl.float32)

        # The frames in order, each tile loaded one frame ahead of its use: two tiles of x in
        # flight per thread. The next rank is clamped to the last (re-read, from L1), and a
        # video of one frame loads nothing.
        num_ranks = num_frames - 1
        ahead = mask_n & ((offs_n * 0 + num_ranks) > 0)
        ahead_ptr = x_video + (key == 0).to(tl.int64) * stride_xt
        next_hi = load_x(ahead_ptr, rows, ahead, c_hi, BLOCK_HI, BLOCK_HI, False)
        if HAS_LO:
            next_lo = load_x(ahead_ptr, rows, ahead, c_lo, LO_WIDTH, BLOCK_LO, False)
        # The group's gradient, lse and <grad r, r>, loaded at its first frame.
        group = num_ranks * 0
        frames_left = num_ranks * 0
        # Loaded per row of the tile (the same vector in each, from L1): in the tile's own
        # layout, where a vector would be converted to it through shared memory per group.
        grad_r_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
        if HAS_LO:
            grad_r_lo = tl.zeros([BLOCK_N, BLOCK_LO], dtype=tl.float32)
        lse = tl.zeros([], dtype=tl.float32)
        grad_r_dot_r = tl.zeros([], dtype=tl.float32)
        for rank in range(0, num_ranks):
            # 64-bit: frame * stride_xt (strided x) and frame * N * C (a long video's grad_x)
            # pass 2**31.
            frame = rank + (rank >= key).to(tl.int64)
            res_hi = next_hi - key_hi
            if HAS_LO:
                res_lo = next_lo - key_lo
            following = tl.minimum(rank + 1, num_ranks - 1)
            ahead_ptr = x_video + (following + (following >= key).to(tl.int64)) * stride_xt
            next_hi = load_x(ahead_ptr, rows, mask_n, c_hi, BLOCK_HI, BLOCK_HI, False)
            if HAS_LO:
                next_lo = load_x(ahead_ptr, rows, mask_n, c_lo, LO_WIDTH, BLOCK_LO, False)
            if frames_left == 0:
                token_row = grad_seq_ptr + (token0 + S + group) * C + offs_n[:, None] * 0
                grad_r_hi = tl.load(token_row + chans_hi[None, :]).to(tl.float32)
                if HAS_LO:
                    grad_r_lo = tl.load(token_row + chans_lo[None, :], mask=mask_lo[None, :],
                                        other=0.0).to(tl.float32)
                stat = (group0 + group) * NUM_HEADS + head
                lse = tl.load(lse_ptr + stat)
                grad_r_dot_r = tl.load(delta_ptr + stat)
                group += 1
                frames_left = FRAMES_PER_TOKEN
            frames_left -= 1
            score = tl.sum(res_hi * q_hi[None, :], axis=1)
            dot = tl.sum(res_hi * grad_r_hi, axis=1)
            if HAS_LO:
                score += tl.sum(res_lo * q_lo[None, :], axis=1)
                dot += tl.sum(res_lo * grad_r_lo, axis=1)
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
            grad_q_hi += prob_grad[:, None] * res_hi
            if HAS_LO:
                grad_res_lo = _grad_residual(prob, grad_score, grad_r_lo, q_lo)
                tl.store(grad_frame + chans_lo[None, :],
                         grad_res_lo.to(grad_x_ptr.dtype.element_ty),
                         mask=mask_n[:, None] & mask_lo[None, :])
                grad_key_lo -= grad_res_lo
                grad_q_lo += prob_grad[:, None] * res_lo

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
    tl.store(dq_row + chans_hi, tl.sum(grad_q_hi, axis=0))
    if HAS_LO:
        tl.store(dq_row + chans_lo, tl.sum(grad_q_lo, axis=0), mask=mask_lo)
