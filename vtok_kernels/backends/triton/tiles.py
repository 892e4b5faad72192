"""Device functions shared by the encode kernels (encode.py's and attention.py's): where a video's
frames and tokens are, a tile of x, and the key tokens' gradient spread over the key frame."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def video_layout(video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN,
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
def program_layout(key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN,
                   IS_VARLEN: tl.constexpr):
    """The program's (video, split, number of splits, channel block) from its grid position,
    then its video's layout (video_layout): the encode kernels' common prologue."""
    video = tl.program_id(0)
    frame0, num_frames, token0, group0, key, num_groups = video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    return (video, tl.program_id(1), tl.num_programs(1), tl.program_id(2),
            frame0, num_frames, token0, group0, key, num_groups)


@triton.jit
def split_rows(N):
    """The patch rows of the program's split (grid axis 1): [begin, end), contiguous, sizes within
    one row of each other, so the programs of a launch move the same bytes."""
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    return (split * N) // num_splits, ((split + 1) * N) // num_splits


@triton.jit
def chunk_layout(key_ptr, cu_frames_ptr, cu_tokens_ptr, T, N, S, G, FRAMES_PER_TOKEN, MAX_GROUPS,
                 CHUNK_G: tl.constexpr, IS_VARLEN: tl.constexpr):
    """A forward program's place (the encode forwards' common prologue): grid axis 0 holds, per
    video, the chunks of CHUNK_G groups of the longest video (one chunk where it has none: the
    key tokens), axis 1 the splits of the patch rows (split_rows). Returns (video, chunk, first
    frame, first output row, first lse row, key frame, group count, the chunk's first group,
    its ranks [rank_begin, rank_end), the split's rows [row_begin, row_end), and row_stop: where
    the row loop stops, row_begin for a chunk past a short video's last group, which has nothing
    to pool)."""
    num_chunks = tl.maximum(tl.cdiv(MAX_GROUPS, CHUNK_G), 1)
    video = tl.program_id(0) // num_chunks
    chunk = tl.program_id(0) % num_chunks
    frame0, num_frames, token0, group0, key, num_groups = video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    group_begin = chunk * CHUNK_G
    rank_begin = group_begin * FRAMES_PER_TOKEN
    rank_end = tl.minimum((group_begin + CHUNK_G) * FRAMES_PER_TOKEN, num_frames - 1)
    row_begin, row_end = split_rows(N)
    row_stop = tl.where((chunk > 0) & (group_begin >= num_groups), row_begin, row_end)
    return (video, chunk, frame0, token0, group0, key, num_groups, group_begin, rank_begin,
            rank_end, row_begin, row_end, row_stop)


@triton.jit
def x_tile(x_frame, rows, chans, ROW_POINTERS: tl.constexpr):
    """Pointers of a tile of x: its frame's base pointer, plus the 64-bit offsets of its patch
    rows, plus the 32-bit offsets of its channels (within a row, so small). Both forms give the
    same addresses; ptxas allocates them differently (compile-check). Channels added to row
    pointers keep the attention forward at wide heads at or below its registers with 32-bit
    tiles; per-element 64-bit offsets keep the mean forward (float32, sm_90) and the attention
    backward from spilling."""
    if ROW_POINTERS:
        return (x_frame + rows)[:, None] + chans[None, :]
    else:
        return x_frame + (rows[:, None] + chans[None, :])


@triton.jit
def load_x(x_frame, rows, mask_n, c0, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
           ROW_POINTERS: tl.constexpr):
    """Channels c0 .. c0 + WIDTH of a patch block of one frame, as a float32 [rows, BLOCK] tile
    (zero past WIDTH and past the last patch). WIDTH is a compile-time constant, so when c0 is
    a multiple of a head size the compiler sees the alignment and loads 16 bytes at a time."""
    offs = tl.arange(0, BLOCK)
    mask = mask_n[:, None] & (offs < WIDTH)[None, :]
    return tl.load(x_tile(x_frame, rows, c0 + offs, ROW_POINTERS), mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def load_rows(x_frame, rows, c0, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Channels c0 .. c0 + WIDTH of a tile whose rows all lie in the frame, in x's dtype (zero
    past WIDTH): load_x for a block whose rows past its end are clamped to its last, their
    results masked by the caller. The load needs no predicate nor zeroed registers, and a
    block of the head's full width no mask at all."""
    offs = tl.arange(0, BLOCK)
    if WIDTH == BLOCK:
        return tl.load(x_tile(x_frame, rows, c0 + offs, False))
    else:
        return tl.load(x_tile(x_frame, rows, c0 + offs, False), mask=(offs < WIDTH)[None, :],
                       other=0.0)


@triton.jit
def widen(x, INLINE_PTX: tl.constexpr):
    """x in float32. A bfloat16 is the high half of its float32, so a pair of them widens in two
    instructions (a shift, a mask), where Triton's conversion takes three (ptxas extracts the
    high half with a PRMT before shifting it)."""
    if INLINE_PTX and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
            dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def key_token_grad(grad_seq_ptr, token0, C, offs_n, mask_n, chans, mask_d,
                   GRID_H, GRID_W, OUT_H, OUT_W, SPATIAL: tl.constexpr,
                   BINS_PER_ROW: tl.constexpr, BINS_PER_COL: tl.constexpr):
    """The key tokens' gradient at the key frame's patches offs_n, channels chans: the token's
    own gradient, or with spatial key tokens each token's gradient spread uniformly over its
    adaptive bin. A patch lies in at most BINS_PER_ROW x BINS_PER_COL bins (bins overlap when
    the grid does not divide), the first of them being floor(row * OUT_H / GRID_H)."""
    mask = mask_n[:, None] & mask_d[None, :]
    if SPATIAL:
        grad = tl.zeros(mask.shape, dtype=tl.float32)
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
                grad += grad_bin.to(tl.float32) / area[:, None]
        return grad
    else:
        return tl.load(grad_seq_ptr + token0 * C + offs_n[:, None] * C + chans[None, :],
                       mask=mask, other=0.0).to(tl.float32)
