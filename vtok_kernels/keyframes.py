"""Choosing the key frame of each video: ``select_key_frames(x, method)`` -> int64 ``[B]``.

The result is a ``key_index`` for :func:`vtok_kernels.encode` (or ``encode_varlen``).

``"medoid"`` picks the frame with the least residual energy to the others,
``E(t) = sum over t' of ||x[t] - x[t']||^2`` (over patches and channels): the key frame that
makes the residuals, and so the information the residual tokens must carry, smallest. By the
parallel-axis identity ``E(t) = T * ||x[t] - mean||^2 + sum over t' of ||x[t'] - mean||^2``,
where the last sum does not depend on t, so the medoid is the frame nearest the mean frame. That
costs one pass over x in float32 with O(B * T) state, with no [B, T, T] pairwise table and no
cancellation between large Gram terms (video frames are close to one another, so
``||a||^2 + ||b||^2 - 2<a, b>`` would lose most of its digits in float32).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

METHODS = ("first", "middle", "medoid")

# Frames per chunk are chosen so an eager chunk of centred features stays under this many bytes.
_CHUNK_BYTES = 1 << 28


def _check(x, method, cu_frames) -> None:
    if not isinstance(method, str):
        raise TypeError(f"method: expected a str, one of {METHODS}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    ranks, what = ((4, 5), "[B, T, N, C] or [B, T, H, W, C]") if cu_frames is None else (
        (3, 4), "[F, N, C] or [F, H, W, C]")
    if x.dim() not in ranks:
        raise ValueError(f"x: expected {what}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x: every dimension must be non-empty, got shape {tuple(x.shape)}")
    if cu_frames is not None:
        if not isinstance(cu_frames, Tensor) or cu_frames.dtype not in (torch.int32, torch.int64):
            raise TypeError("cu_frames: expected an int32 or int64 tensor of shape [B+1]")
        if cu_frames.dim() != 1 or cu_frames.shape[0] < 2:
            raise ValueError(f"cu_frames: expected shape [B+1] with B >= 1, got {tuple(cu_frames.shape)}")
        if cu_frames.device != x.device:
            raise ValueError(f"cu_frames: expected device {x.device} (x's), got {cu_frames.device}")
        if not torch.compiler.is_compiling():
            host = cu_frames.tolist()  # a few integers, read once as encode_varlen does
            if host[0] != 0 or host[-1] != x.shape[0]:
                raise ValueError(f"cu_frames: must run from 0 to the number of packed frames F = "
                                 f"{x.shape[0]}, got {host[0]} .. {host[-1]}")
            if any(b <= a for a, b in zip(host[:-1], host[1:])):
                raise ValueError("cu_frames: must be strictly increasing (every video needs a frame)")


def _frame_chunks(num_frames: int, frame_numel: int) -> list[tuple[int, int]]:
    """Frame ranges whose float32 copy stays under _CHUNK_BYTES (eager); one range when compiling,
    where inductor fuses the whole expression into one reduction without a buffer."""
    if torch.compiler.is_compiling():
        return [(0, num_frames)]
    chunk = max(1, _CHUNK_BYTES // max(frame_numel * 4, 1))
    return [(start, min(start + chunk, num_frames)) for start in range(0, num_frames, chunk)]


@torch.no_grad()
def select_key_frames(x: Tensor, method: str = "medoid", cu_frames: Optional[Tensor] = None) -> Tensor:
    """The key frame of every video, as an int64 tensor [B] on x's device: a ``key_index``.

    x: [B, T, N, C] or [B, T, H, W, C] frame features; or packed frames [F, N, C] /
    [F, H, W, C] with ``cu_frames`` [B+1] offsets (then indices are relative to each video).
    method:
      * ``"first"``: frame 0.
      * ``"middle"``: frame T // 2 (for even T, the later of the two central frames).
      * ``"medoid"``: the frame with the least total squared residual to all frames,
        ``sum_t' ||x[t] - x[t']||^2``, computed in float32 as the frame nearest the mean frame
        (see the module docstring). Ties go to the earlier frame; with T = 2 both frames tie
        exactly and rounding decides.

    No gradient flows through the choice. Non-finite features never give an index out of range.
    The batched path never synchronises with the host (CUDA-graph safe, traced by torch.compile
    without a break); the packed path reads cu_frames once to check it, as encode_varlen does.
    """
    _check(x, method, cu_frames)
    if cu_frames is not None:
        return _select_varlen(x, method, cu_frames)
    B, T = x.shape[0], x.shape[1]
    if method == "first":
        return torch.zeros(B, dtype=torch.int64, device=x.device)
    if method == "middle":
        return torch.full((B,), T // 2, dtype=torch.int64, device=x.device)
    patch_dims = tuple(range(2, x.dim()))  # x is read in place, whatever its strides
    mean = x.sum(dim=1, dtype=torch.float32, keepdim=True) / T  # [B, 1, ...]
    distance = torch.cat([
        (x[:, start:stop].float() - mean).square().sum(patch_dims)
        for start, stop in _frame_chunks(T, x[0, 0].numel() * B)
    ], dim=1)  # [B, T]
    return _finite(distance).argmin(dim=1)


def _finite(distance: Tensor) -> Tensor:
    # A NaN distance (NaN features) must neither win the argmin nor, in the varlen path, make
    # every frame of its video lose: it counts as infinitely far, so the index stays in range.
    return torch.nan_to_num(distance, nan=float("inf"))


def _select_varlen(x: Tensor, method: str, cu_frames: Tensor) -> Tensor:
    offsets = cu_frames.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    if method == "first":
        return torch.zeros_like(lengths)
    if method == "middle":
        return torch.div(lengths, 2, rounding_mode="floor")
    F, B = x.shape[0], lengths.shape[0]
    patch_dims = tuple(range(1, x.dim()))
    video = torch.repeat_interleave(torch.arange(B, device=x.device), lengths, output_size=F)
    chunks = _frame_chunks(F, x[0].numel())
    sums = torch.zeros((B, *x.shape[1:]), dtype=torch.float32, device=x.device)
    for start, stop in chunks:
        sums.index_add_(0, video[start:stop], x[start:stop].float())
    means = sums / lengths.to(torch.float32).reshape(B, *([1] * len(patch_dims)))
    distance = torch.cat([
        (x[start:stop].float() - means[video[start:stop]]).square().sum(patch_dims)
        for start, stop in chunks
    ])  # [F]
    distance = _finite(distance)
    # Per-video argmin without a host round trip: the least distance of each video, then the
    # earliest of its frames that reaches it.
    least = torch.full((B,), float("inf"), device=x.device).scatter_reduce(
        0, video, distance, reduce="amin", include_self=True)
    rank = torch.arange(F, device=x.device) - offsets[video]
    candidate = torch.where(distance == least[video], rank, torch.full_like(rank, F))
    return torch.full((B,), F, dtype=torch.int64, device=x.device).scatter_reduce(
        0, video, candidate, reduce="amin", include_self=True)
