"""Triton kernels of ``encode`` and ``encode_varlen``: fused residual + mean/attention pooling.

The mean kernels are here; attention pooling's, which share the decomposition, in
attention.py; the device functions both use in tiles.py.

Forward, attention pooling. A program owns one video, one head and a set of patch blocks
(every num_splits-th block of BLOCK_N patches). For each patch block it loads the key frame's
tile once, keeps it in registers and streams the video's non-key frames through it, so x is
read once and the residual tensor never exists. Per group, the program keeps one partial result
(an online-softmax state: running max, sum of weights, weighted sum) and merges each further
patch block into it in place; a small combine kernel merges the programs' partials in a fixed
order and writes the residual tokens and the log-sum-exp.

Forward, mean pooling. A program owns one video, a chunk of CHUNK_G consecutive groups, one
channel block and a contiguous range of patch rows (a split). It is one warp with its lanes
along the channels, so summing a tile over its rows takes no shared memory and no barrier; the
chunk's group sums stay in registers across the split's patch blocks (the key tile reused by
the chunk's frames) and are stored once. The splits fill whole waves of the programs the GPU
holds (the configs pin their registers), within PARTIAL_SHARE of x for the partial rows, which
the combine kernel sums in split order.

No atomics: for a given config the result is bitwise reproducible; the config itself is fixed
by a rule instead of timings under ``torch.use_deterministic_algorithms(True)``
(configs.autotuning).

Backward. The attention forward's decomposition: a program recomputes its residual tile per frame, writes the
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
from vtok_kernels.backends.triton.attention import (
    attn_bwd_kernel, attn_combine_kernel, attn_delta_kernel, attn_fwd_kernel, combine_heads,
    head_blocks)
from vtok_kernels.backends.triton.launch import (
    MAX_GRID_X, MAX_GRID_YZ, autotuned, axis_chunks, check_grid_axis, grid_slots, launch)
from vtok_kernels.backends.triton.tiles import (
    chunk_layout, key_token_grad, program_layout, video_layout, x_tile)


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
def mean_fwd_kernel(
    x_ptr, key_ptr, cu_frames_ptr, cu_tokens_ptr, seq_ptr, part_acc_ptr,
    stride_xb, stride_xt, stride_xn,
    T, N, C, S, G, NUM_ROWS, FRAMES_PER_TOKEN, MAX_GROUPS,
    IS_VARLEN: tl.constexpr, WRITE_KEY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_G: tl.constexpr,
):
    """Mean pooling, forward: program (video x chunk, split, channel block) sums x - key over
    the split's patch rows for each of the chunk's CHUNK_G groups.

    A warp's lanes lie along the channels (the configs are one warp, BLOCK_D a multiple of its
    32 x 16-byte vectors' width or half of it), so the sum over a tile's rows is taken in
    registers and at most one shuffle: no shared memory, no barrier per frame. The chunk's
    group sums stay in registers ([CHUNK_G, BLOCK_D]) across the split's patch blocks and are
    stored once, as the split's partial rows: nothing is read back."""
    (video, chunk, frame0, token0, group0, key, num_groups, group_begin, rank_begin, rank_end,
     row_begin, row_end, row_stop) = chunk_layout(key_ptr, cu_frames_ptr, cu_tokens_ptr, T, N, S,
                                                  G, FRAMES_PER_TOKEN, MAX_GROUPS, CHUNK_G,
                                                  IS_VARLEN)
    c0 = tl.program_id(2) * BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < C - c0
    x_video = x_ptr + video.to(tl.int64) * stride_xb + frame0 * stride_xt
    offs_g = tl.arange(0, CHUNK_G)
    acc = tl.zeros([CHUNK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(row_begin, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < row_end
        mask = mask_n[:, None] & mask_d[None, :]
        # 64-bit: a view's patch stride is unbounded (in a patch-major buffer, N * stride_xn
        # passes 2**31).
        rows = offs_n.to(tl.int64) * stride_xn
        key_tile = tl.load(x_tile(x_video + key * stride_xt, rows, c0 + offs_d, False),
                           mask=mask, other=0.0).to(tl.float32)
        if WRITE_KEY:
            # The key tokens once per video: by the programs of its first chunk.
            tl.store(seq_ptr + token0 * C + offs_n[:, None] * C + (c0 + offs_d)[None, :],
                     key_tile.to(seq_ptr.dtype.element_ty),
                     mask=mask & ((offs_n * 0 + chunk) == 0)[:, None])
        # Each frame's tile is loaded one frame ahead of its use: two tiles of x in flight per
        # thread. The next rank is clamped to the chunk's last (re-read, from L1); a chunk
        # without frames loads nothing. 64-bit: frame * stride_xt passes 2**31 in a
        # time-major buffer of a few frames.
        first = tl.where(rank_begin < key, rank_begin, rank_begin + 1).to(tl.int64)
        next_tile = tl.load(x_tile(x_video + first * stride_xt, rows, c0 + offs_d, False),
                            mask=mask & ((offs_n * 0 + rank_end) > rank_begin)[:, None],
                            other=0.0)
        # The frame's group within the chunk, counted rather than divided (an integer
        # division per frame costs as many instructions as its sum).
        slot = rank_begin * 0
        frames_left = FRAMES_PER_TOKEN
        for rank in range(rank_begin, rank_end):
            x_tile_ = next_tile
            following = tl.minimum(rank + 1, rank_end - 1)
            ahead = tl.where(following < key, following, following + 1).to(tl.int64)
            next_tile = tl.load(x_tile(x_video + ahead * stride_xt, rows, c0 + offs_d, False),
                                mask=mask, other=0.0)
            frame_sum = tl.sum(x_tile_.to(tl.float32) - key_tile, axis=0)
            acc += tl.where(offs_g[:, None] == slot, frame_sum[None, :], 0.0)
            frames_left -= 1
            slot = tl.where(frames_left == 0, slot + 1, slot)
            frames_left = tl.where(frames_left == 0, FRAMES_PER_TOKEN, frames_left)
    # Rows past the video's last group (a short chunk, a short varlen video) are not stored:
    # the combine kernel reads only its video's groups.
    part = tl.program_id(1).to(tl.int64) * NUM_ROWS + group0 + group_begin + offs_g
    tl.store(part_acc_ptr + part[:, None] * C + (c0 + offs_d)[None, :], acc,
             mask=((group_begin + offs_g) < num_groups)[:, None] & mask_d[None, :])


@triton.jit
def combine_kernel(
    part_acc_ptr, key_ptr, cu_frames_ptr, cu_tokens_ptr, out_ptr,
    T, N, C, S, G, NUM_ROWS, NUM_PARTS, FRAMES_PER_TOKEN, FIRST_GROUP,
    IS_VARLEN: tl.constexpr, DIVIDE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sums the per-split partial sums of one group, in split order, into its token (mean
    pooling's; attention's partial states merge in attention.attn_combine_kernel).

    Output row of group g of video b: token0 + S + g (S = 0 and G rows per video gives the
    plain [B, G, C] layout that expand's backward uses). Groups from FIRST_GROUP on: a video
    with more groups than grid axis 1 holds takes several launches.
    """
    video = tl.program_id(0)
    g = FIRST_GROUP + tl.program_id(1)
    pid_c = tl.program_id(2)
    frame0, num_frames, token0, group0, key, num_groups = video_layout(
        video, key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G, FRAMES_PER_TOKEN, IS_VARLEN)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = (offs_c < C) & ((offs_c * 0 + g) < num_groups)
    # row is 64-bit (group0 is). p * NUM_ROWS stays 32-bit: it is below the partials' row
    # count, splits x B x G with splits <= cdiv(N, BLOCK_N), far fewer than x's B x T x N rows.
    row = group0 + g
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p in range(0, NUM_PARTS):
        acc += tl.load(part_acc_ptr + (p * NUM_ROWS + row) * C + offs_c, mask=mask_c, other=0.0)
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
    frame0, num_frames, token0, group0, key, num_groups = video_layout(
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
def mean_bwd_kernel(
    grad_seq_ptr, key_ptr, cu_frames_ptr, cu_tokens_ptr, grad_x_ptr,
    T, N, C, S, G, FRAMES_PER_TOKEN, GRID_H, GRID_W, OUT_H, OUT_W,
    IS_VARLEN: tl.constexpr, SPATIAL: tl.constexpr,
    BINS_PER_ROW: tl.constexpr, BINS_PER_COL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Every frame of a group gets its token's gradient / (frames x patches); the key frame
    minus the sum of those, plus its own tokens' gradient."""
    (video, split, num_splits, block_c, frame0, num_frames, token0, group0, key,
     num_groups) = program_layout(key_ptr, cu_frames_ptr, cu_tokens_ptr, T, S, G,
                                  FRAMES_PER_TOKEN, IS_VARLEN)
    c0 = block_c * BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < C - c0
    chans = c0 + offs_d
    # grad_x is contiguous [frames, N, C]; batched videos are T frames apart.
    if IS_VARLEN:
        grad_video = grad_x_ptr + frame0 * N * C
    else:
        grad_video = grad_x_ptr + video.to(tl.int64) * T * N * C

    for block in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_n[:, None] & mask_d[None, :]
        # 32-bit: grad_x is contiguous, so a tile stays within one frame's N * C elements.
        grad_tile = offs_n[:, None] * C + chans[None, :]
        grad_key = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, num_groups):
            first = g * FRAMES_PER_TOKEN
            last = tl.minimum(first + FRAMES_PER_TOKEN, num_frames - 1)
            grad_r = tl.load(grad_seq_ptr + (token0 + S + g) * C + chans, mask=mask_d,
                             other=0.0).to(tl.float32)
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
        grad_key += key_token_grad(grad_seq_ptr, token0, C, offs_n, mask_n, chans, mask_d,
                                   GRID_H, GRID_W, OUT_H, OUT_W, SPATIAL, BINS_PER_ROW,
                                   BINS_PER_COL)
        tl.store(grad_video + key * N * C + grad_tile, grad_key.to(grad_x_ptr.dtype.element_ty),
                 mask=mask)


_fwd_mean = autotuned(mean_fwd_kernel, "mean_fwd")
_fwd_attn = autotuned(attn_fwd_kernel, "attn_fwd")
_bwd_stream = autotuned(mean_bwd_kernel, "stream")
_bwd_attn = autotuned(attn_bwd_kernel, "attn_bwd")


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


def combine_warps(block_c: int) -> int:
    """Warps of a combine program (mean or attention): 8 channels per thread (two 16-byte float32
    vectors), 4 per thread at the 128-channel block (one warp). Four warps at every block left
    SigLIP's 9 blocks of 128 one channel per thread, the program's prologue (where its video's
    rows are) issued by 4 warps for 128 channels."""
    return max(1, min(4, block_c // 256))


def _combine_block(channels: int) -> int:
    # Interpreter: a block below the test widths (C = 12..48), so several blocks and a masked
    # tail run.
    return 32 if configs.triton_interpreted() else combine_block(channels)


def _combine_heads(num_heads: int, head_dim: int) -> tuple[int, int]:
    # Interpreter: 2 heads per program (and a head block of at least 8 channels), so that the
    # test shapes run several head blocks, a masked last head where the count is odd, and
    # masked channels past the head.
    if configs.triton_interpreted():
        return 2, max(8, triton.next_power_of_2(head_dim))
    return combine_heads(num_heads, head_dim)


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
        self.element_size = x.element_size()
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

    def head_meta(self) -> dict:
        """The compile-time head size and its two channel blocks (attention.head_blocks)."""
        hi, lo = head_blocks(self.head_dim)
        return {"HEAD_DIM": self.head_dim, "BLOCK_HI": hi, "BLOCK_LO": lo}

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


def _target_programs(device: torch.device) -> int:
    """Programs expand's backward splits aim for (the encode kernels size theirs to whole
    waves, _fwd_splits): enough to fill every SM several times over, its frame loop hiding its
    load latency only with several programs per SM; its partials grow by G x C floats per split
    and video, a few percent of x at 8 programs per SM."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 8 * _device_capacity(index)[0]
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


# A forward's partial rows (splits x groups x C floats) at most this share of x's bytes:
# with the combine's read of them, 2/32 of x's traffic on top of it.
PARTIAL_SHARE = 1 / 32
# Programs a forward's splits fill under the interpreter: more than a test's videos, chunks and
# channel blocks or heads, so that the tests see several splits.
INTERPRET_CAPACITY = 64


def _chunks(layout: "_Layout", meta: dict) -> int:
    """Chunks of CHUNK_G groups per video in a forward's grid (one for a video of no group:
    its key tokens)."""
    return max(1, triton.cdiv(layout.max_groups, meta["CHUNK_G"]))


@functools.lru_cache(maxsize=None)
def _device_capacity(index: int) -> tuple:
    properties = torch.cuda.get_device_properties(index)
    return properties.multi_processor_count, (properties.major, properties.minor)


def _fwd_splits(layout: "_Layout", config: triton.Config, device: torch.device) -> int:
    """Splits of each (video, chunk, channel block or head)'s patch rows in a forward, sized
    to whole waves of the programs the GPU holds at once (configs.resident_programs), at most
    what keeps the partial rows within PARTIAL_SHARE of x."""
    meta = config.kwargs
    items = layout.batch * _chunks(layout, meta) * layout.channel_blocks(meta)
    most = min(triton.cdiv(layout.N, meta["BLOCK_N"]), MAX_GRID_YZ)
    capacity = _resident_capacity(device, config)
    if capacity is None:
        return wave_splits(layout.N, items, INTERPRET_CAPACITY, most, meta["BLOCK_N"])
    x_bytes = layout.T * layout.N * layout.element_size
    partial_bytes = max(1, layout.max_groups) * 4
    most = min(most, max(1, int(PARTIAL_SHARE * x_bytes) // partial_bytes))
    return wave_splits(layout.N, items, capacity, most, meta["BLOCK_N"])


def _resident_capacity(device: torch.device, config: triton.Config) -> Optional[int]:
    """Programs of ``config`` the GPU holds at once (None off a GPU: the interpreter)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms, capability = _device_capacity(index)
    return sms * configs.resident_programs(config, capability)


@functools.lru_cache(maxsize=4096)
def wave_splits(rows: int, items: int, capacity: int, most: int, block: int = 1) -> int:
    """How many programs share each of ``items`` work items of ``rows`` rows (1 to ``most``):
    the count that takes the fewest waves x blocks of ``block`` rows per program on a GPU that
    holds ``capacity`` programs at once, ties to fewer (fewer partial rows). Programs get the
    same rows to within one, so a wave lasts as long as one program; a program's last block,
    however few of its rows are real, costs the instructions of a whole one."""
    best, best_cost = 1, None
    for splits in range(1, most + 1):
        cost = -(-items * splits // capacity) * -(-rows // (splits * block))
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


def _forward(x, key_index, query, cu_frames, cu_tokens, layout: _Layout, sequence, lse,
             residual32=None):
    kind = "attn_fwd" if layout.attn else "mean_fwd"
    layout.check_grid(kind)
    block_c = _combine_block(layout.C)
    # Checked before the first launch, so that a grid too large fails with nothing written.
    channel_blocks = _combine_channel_blocks(layout.C, block_c, "x")
    # The configs that may run (attention: the one of its head's band).
    pool = configs.survivors(kind, config_pool(kind),
                             configs.head_width(layout.head_meta()) if layout.attn else None)
    for config in pool:
        check_grid_axis(layout.batch * _chunks(layout, config.kwargs), MAX_GRID_X,
                        "cu_frames: videos x chunks of groups" if layout.varlen
                        else "x: batch x chunks of groups")
    num_parts_max = max(_fwd_splits(layout, c, x.device) for c in pool)
    part_acc = empty_output((num_parts_max, layout.num_rows, layout.C), torch.float32, x.device)
    if layout.attn:
        part_max = empty_output((num_parts_max, layout.num_rows, layout.num_heads),
                                torch.float32, x.device)
        part_sum = empty_output(part_max.shape, torch.float32, x.device)
    else:
        part_max = part_sum = part_acc
    cu_frames_arg = cu_frames if cu_frames is not None else key_index
    cu_tokens_arg = cu_tokens if cu_tokens is not None else key_index

    def grid(meta):
        splits = _fwd_splits(layout, configs.holding(pool, meta), x.device)
        return (layout.batch * _chunks(layout, meta), splits, layout.channel_blocks(meta))

    shared = dict(IS_VARLEN=layout.varlen, WRITE_KEY=not layout.spatial)
    if layout.attn:
        meta = launch(
            attn_fwd_kernel, _fwd_attn, kind, grid,
            x, key_index, query, cu_frames_arg, cu_tokens_arg,
            sequence, part_acc, part_max, part_sum, *layout.strides,
            layout.T, layout.N, layout.C, layout.S, layout.G, layout.num_rows,
            layout.num_heads, layout.frames_per_token, layout.max_groups, layout.scale,
            INLINE_PTX=not configs.triton_interpreted(), **shared, **layout.head_meta(),
        )
    else:
        meta = launch(
            mean_fwd_kernel, _fwd_mean, kind, grid,
            x, key_index, cu_frames_arg, cu_tokens_arg, sequence, part_acc, *layout.strides,
            layout.T, layout.N, layout.C, layout.S, layout.G, layout.num_rows,
            layout.frames_per_token, layout.max_groups, **shared,
        )
    for first, count in axis_chunks(layout.S if layout.spatial else 0):
        spatial_key_fwd_kernel[(layout.batch, count, channel_blocks)](
            x, key_index, cu_frames_arg, cu_tokens_arg, sequence, *layout.strides,
            layout.T, layout.C, layout.S, layout.G, layout.frames_per_token,
            *layout.spatial_args(), first, IS_VARLEN=layout.varlen, BLOCK_C=block_c,
        )
    num_parts = grid(meta)[1]
    for first, count in axis_chunks(layout.max_groups if layout.num_rows > 0 else 0):
        if layout.attn:
            block_heads, block_d = _combine_heads(layout.num_heads, layout.head_dim)
            head_groups = triton.cdiv(layout.num_heads, block_heads)
            attn_combine_kernel[(layout.batch, count, head_groups)](
                part_acc, part_max, part_sum, key_index, cu_frames_arg, cu_tokens_arg,
                sequence, lse, residual32 if residual32 is not None else part_acc,
                layout.T, layout.S, layout.G, layout.num_rows, num_parts, layout.num_heads,
                layout.frames_per_token, first, HEAD_DIM=layout.head_dim,
                IS_VARLEN=layout.varlen, KEEP_RESIDUAL32=residual32 is not None,
                BLOCK_HEADS=block_heads, BLOCK_D=block_d,
                num_warps=combine_warps(block_heads * block_d),
            )
        else:
            combine_kernel[(layout.batch, count, channel_blocks)](
                part_acc, key_index, cu_frames_arg, cu_tokens_arg, sequence,
                layout.T, layout.N, layout.C, layout.S, layout.G, layout.num_rows, num_parts,
                layout.frames_per_token, first, IS_VARLEN=layout.varlen, DIVIDE=True,
                BLOCK_C=block_c, num_warps=combine_warps(block_c),
            )


def _backward(grad_sequence, x, key_index, query, sequence, lse, cu_frames, cu_tokens,
              layout: _Layout, grad_x, residual32=None):
    kind = "attn_bwd" if layout.attn else "stream"
    layout.check_grid(kind)
    grad_sequence = grad_sequence.contiguous()
    cu_frames_arg = cu_frames if cu_frames is not None else key_index
    cu_tokens_arg = cu_tokens if cu_tokens is not None else key_index
    bins = ((bins_per_cell(layout.grid[0], layout.spatial[0]),
             bins_per_cell(layout.grid[1], layout.spatial[1])) if layout.spatial else (1, 1))
    shared = dict(IS_VARLEN=layout.varlen, SPATIAL=bool(layout.spatial), BINS_PER_ROW=bins[0],
                  BINS_PER_COL=bins[1])
    if not layout.attn:
        # One patch block per program, the most parallelism: the mean backward leaves no
        # partials.
        def grid(meta):
            channel_blocks = layout.channel_blocks(meta)
            splits = _num_splits(layout.N, meta["BLOCK_N"], layout.batch, channel_blocks,
                                 1 << 62)
            return (layout.batch, splits, channel_blocks)

        launch(
            mean_bwd_kernel, _bwd_stream, kind, grid,
            grad_sequence, key_index, cu_frames_arg, cu_tokens_arg, grad_x,
            layout.T, layout.N, layout.C, layout.S, layout.G, layout.frames_per_token,
            *layout.spatial_args(), **shared,
        )
        return None

    if residual32 is None:
        # The ops layer passes nothing for an empty tensor: videos without residual tokens.
        if layout.num_rows > 0:
            raise ValueError("triton attention backward: residual32, the forward's float32 "
                             "residual tokens, is required")
        residual32 = torch.zeros((0, layout.C), dtype=torch.float32, device=x.device)
    # <grad r, r> per (group, head), the softmax backward's row term, from the float32 tokens.
    delta = empty_output((layout.num_rows, layout.num_heads), torch.float32, x.device)
    for first, count in axis_chunks(layout.max_groups if layout.num_rows > 0 else 0):
        attn_delta_kernel[(layout.batch, count, layout.num_heads)](
            grad_sequence, residual32, key_index, cu_frames_arg, cu_tokens_arg, delta,
            layout.T, layout.S, layout.G, layout.num_heads, layout.frames_per_token, first,
            IS_VARLEN=layout.varlen, **layout.head_meta(),
        )
    # The configs that may run this head (for each, a BLOCK_N of its own: configs.holding).
    pool = configs.survivors(kind, config_pool(kind), configs.head_width(layout.head_meta()))
    num_parts_max = max(_attn_bwd_splits(layout, c, x.device) for c in pool)
    part_dq = empty_output((layout.batch, num_parts_max, layout.C), torch.float32, x.device)

    def grid(meta):
        splits = _attn_bwd_splits(layout, configs.holding(pool, meta), x.device)
        return (layout.batch, splits, layout.num_heads)

    meta = launch(
        attn_bwd_kernel, _bwd_attn, kind, grid,
        grad_sequence, x, key_index, query, lse, delta, cu_frames_arg, cu_tokens_arg,
        grad_x, part_dq, *layout.strides,
        layout.T, layout.N, layout.C, layout.S, layout.G, layout.num_heads,
        layout.frames_per_token, num_parts_max, layout.scale,
        *layout.spatial_args(), **shared, **layout.head_meta(),
    )
    num_parts = grid(meta)[1]
    # grad_query = scale * (sum_i p_i <grad_r, d_i> d_i - sum_groups <grad_r, r> r), every sum
    # over (video, split) or over groups in a fixed order: the same bits on every run.
    weighted = part_dq[:, :num_parts].sum(dim=(0, 1))
    rows_term = (delta.repeat_interleave(layout.head_dim, dim=1) * residual32).sum(dim=0)
    return (weighted - rows_term) * layout.scale


def _attn_bwd_splits(layout: "_Layout", config: triton.Config, device: torch.device) -> int:
    """Splits of each (video, head)'s patch rows in the attention backward, sized to whole
    waves of the programs the GPU holds (its partials are a grad_query row per program)."""
    items = layout.batch * layout.num_heads
    most = min(triton.cdiv(layout.N, config.kwargs["BLOCK_N"]), MAX_GRID_YZ)
    capacity = _resident_capacity(device, config)
    return wave_splits(layout.N, items, INTERPRET_CAPACITY if capacity is None else capacity,
                       most, config.kwargs["BLOCK_N"])


@on_input_device
def encode_fwd(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid):
    """x: [B, T, N, C] -> (sequence [B, S+G, C], lse [B, G, heads] float32 or empty)."""
    layout = _Layout(x, False, num_heads, pool, spatial, grid, frames_per_token, 0, None, None)
    sequence = empty_output((layout.batch, layout.S + layout.G, layout.C), x.dtype, x.device)
    if not layout.attn:
        lse = empty_output((0,), torch.float32, x.device)
        _forward(x, key_index, query, None, None, layout, sequence, lse)
        return sequence, lse
    lse = empty_output((layout.batch, layout.G, layout.num_heads), torch.float32, x.device)
    residual32 = empty_output((layout.batch, layout.G, layout.C), torch.float32, x.device)
    _forward(x, key_index, query, None, None, layout, sequence, lse, residual32)
    return sequence, lse, residual32


@on_input_device
def encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
               frames_per_token, spatial, grid, residual32=None):
    """-> (grad_x [B, T, N, C] contiguous in x's dtype, grad_query float32 [C] or None)."""
    layout = _Layout(x, False, num_heads, pool, spatial, grid, frames_per_token, 0, None, None)
    grad_x = empty_output(x.shape, x.dtype, x.device)
    if residual32 is not None:
        residual32 = residual32.reshape(layout.num_rows, layout.C)
    grad_query = _backward(grad_sequence, x, key_index, query, sequence, lse, None, None,
                           layout, grad_x, residual32)
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
    if not layout.attn:
        lse = empty_output((0,), torch.float32, x.device)
        if batch > 0:
            _forward(x, key_index, query, cu_frames, cu_tokens, layout, sequence, lse)
        return sequence, lse
    lse = empty_output((num_rows, layout.num_heads), torch.float32, x.device)
    residual32 = empty_output((num_rows, layout.C), torch.float32, x.device)
    if batch > 0:
        _forward(x, key_index, query, cu_frames, cu_tokens, layout, sequence, lse, residual32)
    return sequence, lse, residual32


@on_input_device
def encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse,
                      pool, num_heads, frames_per_token, spatial, grid, max_frames,
                      residual32=None):
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
                           cu_tokens, layout, grad_x, residual32)
    return grad_x, grad_query
