"""The contract in code: VTok encode, encode_varlen and expand in plain PyTorch.

Every backend is held to these functions. They favour reading over speed: one video at a time,
the residual tensor materialised, float32 accumulation (float64 when x is float64), autograd for
the gradients. The math is ../DESIGN.md section 2:

* frame ``k = key_index[b]`` is the key frame; its tokens are kept (or adaptively pooled to an
  ``h x w`` grid when ``spatial=(h, w)``);
* the other frames, in increasing t, are cut into groups of ``frames_per_token``;
* each group becomes one token: the residual ``x[t] - x[k]`` pooled over (t in group, n) by a
  mean, or by multi-head attention pooling with a learned query.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

KeyIndex = Union[int, torch.Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_groups(num_frames: int, frames_per_token: int) -> int:
    """G = ceil((T - 1) / frames_per_token): one residual token per group of non-key frames."""
    # Ceil as a negated floor division: no branch, so a symbolic T under torch.compile adds no
    # guard on its remainder (a recompile per remainder otherwise).
    return -(-max(num_frames - 1, 0) // frames_per_token)


def normalize_keys(key_index: KeyIndex, num_frames: Sequence[int]) -> list[int]:
    """Per-video key frame in [0, T_b); negative indices count from the end, as in Python."""
    if isinstance(key_index, torch.Tensor):
        raw = [int(k) for k in key_index.reshape(-1).tolist()]
        if len(raw) == 1 and len(num_frames) != 1:
            raw = raw * len(num_frames)
    else:
        raw = [int(key_index)] * len(num_frames)
    keys = []
    for k, t in zip(raw, num_frames):
        if not -t <= k < t:
            raise ValueError(f"key_index {k} is out of range for a video of {t} frames")
        keys.append(k + t if k < 0 else k)
    return keys


def key_tokens(key_frame: torch.Tensor, spatial: Optional[tuple], grid: Optional[tuple]) -> torch.Tensor:
    """key_frame: [N, C] -> [S, C]; S = N, or h*w adaptive-average-pooled bins of the H x W grid."""
    if spatial is None:
        return key_frame
    (H, W), (h, w) = grid, spatial
    C = key_frame.shape[-1]
    pooled = F.adaptive_avg_pool2d(key_frame.T.reshape(1, C, H, W), (h, w))  # [1, C, h, w]
    return pooled.reshape(C, h * w).T


def pool_group(
    residual: torch.Tensor, pool: str, query: Optional[torch.Tensor], num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual: [f, N, C] for the f frames of one group -> (token [C], lse [num_heads]).

    lse is the log-sum-exp of the attention scores of each head (empty for mean): what the fused
    backward keeps instead of the residual tensor.
    """
    f, n, C = residual.shape
    if pool == "mean":
        return residual.mean(dim=(0, 1)), residual.new_empty(0)
    head_dim = C // num_heads
    d = residual.reshape(f * n, num_heads, head_dim)
    q = query.to(residual.dtype).reshape(num_heads, head_dim)
    scores = torch.einsum("mhc,hc->mh", d, q) / math.sqrt(head_dim)
    weights = torch.softmax(scores, dim=0)
    token = torch.einsum("mh,mhc->hc", weights, d).reshape(C)
    return token, torch.logsumexp(scores, dim=0)


def encode_video(
    frames: torch.Tensor,
    key: int,
    pool: str,
    query: Optional[torch.Tensor],
    num_heads: int,
    frames_per_token: int,
    spatial: Optional[tuple],
    grid: Optional[tuple],
) -> tuple[torch.Tensor, torch.Tensor]:
    """frames: [T, N, C] of one video -> (tokens [S + G, C], lse [G, num_heads or 0])."""
    key_frame = frames[key]
    others = torch.cat([frames[:key], frames[key + 1 :]])  # the non-key frames, in order of t
    residual = others - key_frame  # [T-1, N, C]: the tensor the fused kernels never write
    tokens, lses = [key_tokens(key_frame, spatial, grid)], []
    groups = residual.split(frames_per_token) if len(residual) else ()  # T = 1: no group
    for group in groups:
        token, lse = pool_group(group, pool, query, num_heads)
        tokens.append(token[None])
        lses.append(lse[None])
    heads = num_heads if pool == "attn" else 0
    lse = torch.cat(lses) if lses else frames.new_empty(0, heads)
    return torch.cat(tokens), lse


def _as_patches(x: torch.Tensor, grid: Optional[tuple], patch_dim: int) -> tuple[torch.Tensor, Optional[tuple]]:
    """Folds a [.., H, W, C] grid into [.., N, C] and returns the grid it came from."""
    if x.dim() == patch_dim + 3:
        grid = (x.shape[patch_dim], x.shape[patch_dim + 1])
        x = x.flatten(patch_dim, patch_dim + 1)
    return x, (tuple(grid) if grid is not None else None)


def encode(
    x: torch.Tensor,
    key_index: KeyIndex = 0,
    pool: str = "mean",
    query: Optional[torch.Tensor] = None,
    num_heads: int = 1,
    frames_per_token: int = 1,
    spatial: Optional[tuple] = None,
    grid: Optional[tuple] = None,
    return_lse: bool = False,
):
    """x: [B, T, N, C] or [B, T, H, W, C] -> sequence [B, S + G, C] in x's dtype.

    With ``return_lse`` also returns the attention log-sum-exp [B, G, num_heads] (float32).
    """
    x, grid = _as_patches(x, grid, 2)
    B, T = x.shape[:2]
    acc = accumulation_dtype(x.dtype)
    keys = normalize_keys(key_index, [T] * B)
    sequences, lses = [], []
    for b in range(B):
        seq, lse = encode_video(
            x[b].to(acc), keys[b], pool, query, num_heads, frames_per_token, spatial, grid
        )
        sequences.append(seq)
        lses.append(lse)
    sequence = torch.stack(sequences).to(x.dtype)
    if return_lse:
        return sequence, torch.stack(lses).float()
    return sequence


def encode_varlen(
    x: torch.Tensor,
    cu_frames: torch.Tensor,
    key_index: KeyIndex = 0,
    pool: str = "mean",
    query: Optional[torch.Tensor] = None,
    num_heads: int = 1,
    frames_per_token: int = 1,
    spatial: Optional[tuple] = None,
    grid: Optional[tuple] = None,
    return_lse: bool = False,
):
    """x: [F, N, C] or [F, H, W, C] packed frames, cu_frames: [B+1] offsets.

    Returns (sequence [sum_b S + G_b, C], cu_tokens [B+1] int64), and with ``return_lse`` the
    packed log-sum-exp [sum_b G_b, num_heads] as well.
    """
    x, grid = _as_patches(x, grid, 1)
    offsets = [int(v) for v in cu_frames.tolist()]
    lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    keys = normalize_keys(key_index, lengths)
    acc = accumulation_dtype(x.dtype)
    sequences, lses, cu_tokens = [], [], [0]
    for b, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        seq, lse = encode_video(
            x[start:end].to(acc), keys[b], pool, query, num_heads, frames_per_token, spatial, grid
        )
        sequences.append(seq)
        lses.append(lse)
        cu_tokens.append(cu_tokens[-1] + seq.shape[0])
    sequence = torch.cat(sequences).to(x.dtype)
    cu = torch.tensor(cu_tokens, dtype=torch.int64, device=x.device)
    if return_lse:
        return sequence, cu, torch.cat(lses).float()
    return sequence, cu


def expand(
    key_tokens: torch.Tensor,
    residual_tokens: torch.Tensor,
    key_index: KeyIndex,
    num_frames: int,
    frames_per_token: int = 1,
) -> torch.Tensor:
    """The adjoint of mean encoding: [B, N, C] and [B, G, C] -> per-frame features [B, T, N, C].

    Frame k_b is the key tokens; frame t of group g is the key tokens plus r_g on every patch.
    """
    B, N, C = key_tokens.shape
    acc = accumulation_dtype(key_tokens.dtype)
    keys = normalize_keys(key_index, [num_frames] * B)
    videos = []
    for b in range(B):
        key = key_tokens[b].to(acc)
        frames = []
        for t in range(num_frames):
            if t == keys[b]:
                frames.append(key)
            else:
                rank = t if t < keys[b] else t - 1
                frames.append(key + residual_tokens[b, rank // frames_per_token].to(acc))
        videos.append(torch.stack(frames))
    return torch.stack(videos).to(key_tokens.dtype)
