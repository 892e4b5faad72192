"""The public API: validate, normalise, pick a backend, call one fused op.

Every rule of DESIGN section 3 is checked here, before any kernel runs: TypeError for a wrong type
or dtype, ValueError for a wrong shape or value, each naming the argument and what was expected.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from vtok_kernels import backends, ops
from vtok_kernels.reference import num_groups

KeyIndex = Union[int, Tensor]
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
POOLS = ("mean", "attn")


class EncodeOutput(NamedTuple):
    """``sequence`` [B, S+G, C] is one contiguous tensor; the others are views into it."""

    sequence: Tensor
    key_tokens: Tensor  # sequence[:, :S]
    residual_tokens: Tensor  # sequence[:, S:]


class EncodeVarlenOutput(NamedTuple):
    """Packed tokens of every video: rows cu_tokens[b]:cu_tokens[b+1] belong to video b, its S
    key tokens first, then its G_b residual tokens."""

    sequence: Tensor  # [sum_b S + G_b, C]
    cu_tokens: Tensor  # [B+1] int64 offsets, as FlashAttention's cu_seqlens
    num_key_tokens: int  # S
    max_tokens: int  # max_b S + G_b, as FlashAttention's max_seqlen


# ------------------------------------------------------------------------------------ checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_features(x, name: str, ranks: tuple[int, ...], what: str, may_be_empty: int = -1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(x).__name__}")
    if x.dtype not in FEATURE_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.dim() not in ranks:
        raise ValueError(f"{name}: expected {what}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if any(size == 0 for dim, size in enumerate(x.shape) if dim != may_be_empty):
        raise ValueError(f"{name}: every dimension must be non-empty, got shape {tuple(x.shape)}")


def _check_positive_int(value, name: str) -> None:
    if not _is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")


def _check_pair(value, name: str) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise TypeError(f"{name}: expected a pair of ints (h, w), got {value!r}")
    if value[0] < 1 or value[1] < 1:
        raise ValueError(f"{name}: expected positive sizes, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _check_grid_and_spatial(num_patches: int, grid, spatial, grid_from_shape) -> tuple[list, list]:
    if grid is not None:
        grid = _check_pair(grid, "grid")
        if grid_from_shape is not None and grid != grid_from_shape:
            raise ValueError(f"grid: {grid} does not match the H, W dims of x, {grid_from_shape}")
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"grid: H*W = {grid[0] * grid[1]} must equal N = {num_patches}")
    grid = grid if grid is not None else grid_from_shape
    if spatial is None:
        return [], []
    spatial = _check_pair(spatial, "spatial")
    if grid is None:
        raise ValueError("spatial: needs the patch grid: pass x as [..., H, W, C] or grid=(H, W)")
    if spatial[0] > grid[0] or spatial[1] > grid[1]:
        raise ValueError(f"spatial: {spatial} must not exceed the grid {grid}")
    return list(spatial), list(grid)


def _check_pool(pool, query, num_heads, x: Tensor) -> Optional[Tensor]:
    if not isinstance(pool, str):
        raise TypeError(f"pool: expected a str, one of {POOLS}, got {type(pool).__name__}")
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    _check_positive_int(num_heads, "num_heads")
    C = x.shape[-1]
    if pool == "mean":
        if query is not None:
            raise ValueError("query: only pool='attn' uses a query; pass query=None for pool='mean'")
        if num_heads != 1:
            raise ValueError(f"num_heads: only pool='attn' has heads, got num_heads={num_heads} with pool='mean'")
        return None
    if query is None:
        raise ValueError("query: pool='attn' needs a learned query of shape [C]; got None")
    if not isinstance(query, Tensor):
        raise TypeError(f"query: expected a torch.Tensor of shape [C], got {type(query).__name__}")
    if query.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"query: expected dtype {x.dtype} (x's) or torch.float32, got {query.dtype}")
    if query.shape != (C,):
        raise ValueError(f"query: expected shape [C] = [{C}], got {tuple(query.shape)}")
    if query.device != x.device:
        raise ValueError(f"query: expected device {x.device} (x's), got {query.device}")
    if C % num_heads:
        raise ValueError(f"num_heads: C = {C} must be divisible by num_heads = {num_heads}")
    # The kernels read a float32 query (float64 next to float64 features, for gradcheck); the
    # cast is differentiable, so the gradient flows back in the caller's dtype.
    return query.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


def _key_tensor(key_index, num_frames: Union[int, Sequence[int]], batch: int, device: torch.device) -> Tensor:
    """Checks key_index against every video's frame count; returns int64 [B] in [0, T_b).

    ``num_frames`` is one T for a batch (it may be symbolic under torch.compile: nothing here
    specialises on T or B) or a host list of T_b for varlen. An int key is checked on the host,
    with no device synchronisation; a tensor key has to be read to be checked, except under
    torch.compile or CUDA-graph capture, where the check is a device-side assert instead.
    """
    uniform = not isinstance(num_frames, (list, tuple))
    if _is_int(key_index):
        for b, t in enumerate([num_frames] if uniform else num_frames):
            if not -t <= key_index < t:
                video = "every video" if uniform else f"video {b}"
                raise ValueError(
                    f"key_index: {key_index} is out of range [-{t}, {t}) for {video} of {t} frames"
                )
        if uniform:
            key = key_index + num_frames if key_index < 0 else key_index
            return torch.full((batch,), key, dtype=torch.int64, device=device)
        keys = [key_index + t if key_index < 0 else key_index for t in num_frames]
        return torch.tensor(keys, dtype=torch.int64, device=device)
    if not isinstance(key_index, Tensor):
        raise TypeError(f"key_index: expected an int or an integer tensor, got {type(key_index).__name__}")
    if key_index.dtype.is_floating_point or key_index.dtype.is_complex or key_index.dtype == torch.bool:
        raise TypeError(f"key_index: expected an int or an integer tensor, got dtype {key_index.dtype}")
    if key_index.dim() > 1 or (key_index.dim() == 1 and key_index.shape[0] != batch):
        raise ValueError(f"key_index: expected an int or a tensor of shape [B] = [{batch}], got {tuple(key_index.shape)}")
    if key_index.device != device:
        raise ValueError(f"key_index: expected device {device} (x's), got {key_index.device}")
    keys = key_index.to(torch.int64).expand(batch)
    if uniform:
        lengths = torch.full((batch,), num_frames, dtype=torch.int64, device=device)
    else:
        lengths = torch.tensor(list(num_frames), dtype=torch.int64, device=device)
    out_of_range = (keys < -lengths) | (keys >= lengths)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing:
        torch._assert_async(~out_of_range.any(), "key_index out of range")
    elif bool(out_of_range.any()):
        b = int(out_of_range.nonzero()[0, 0])
        t = int(lengths[b])
        raise ValueError(f"key_index: {int(keys[b])} is out of range [-{t}, {t}) for video {b} of {t} frames")
    return torch.where(keys < 0, keys + lengths, keys).contiguous()


# ----------------------------------------------------------------------------------- backend
def _select_backend(backend, device: torch.device, dtype: torch.dtype, op: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("VTOK_BACKEND", "auto") or "auto"
    if backend == "auto":
        from vtok_kernels import selection

        return selection.pick(device, dtype, op)
    impl = backends.get(backend)  # ValueError for an unknown name
    reason = impl.unavailable_reason(device.type)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available on {device.type}: {reason}")
    if dtype not in impl.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        raise TypeError(f"x: backend {backend!r} supports dtypes {names}, got {dtype}")
    return backend


def _prepare_features(x: Tensor, patch_dim: int) -> tuple[Tensor, Optional[tuple]]:
    """Folds [.., H, W, C] into [.., N, C] (a view when the grid is mergeable) with C unit-stride."""
    grid = None
    if x.dim() == patch_dim + 3:
        grid = (int(x.shape[patch_dim]), int(x.shape[patch_dim + 1]))
        x = x.flatten(patch_dim, patch_dim + 1)
    if x.stride(-1) != 1:
        x = x.contiguous()  # only the channel dim must be unit-stride; the rest is read in place
    return x, grid


# --------------------------------------------------------------------------------------- API
def encode(
    x: Tensor,
    key_index: KeyIndex = 0,
    pool: str = "mean",
    query: Optional[Tensor] = None,
    num_heads: int = 1,
    frames_per_token: int = 1,
    spatial: Optional[tuple[int, int]] = None,
    grid: Optional[tuple[int, int]] = None,
    backend: str = "auto",
) -> EncodeOutput:
    """Tokenize a batch of videos: the key frame's tokens, then one residual token per group.

    x: [B, T, N, C] or [B, T, H, W, C] frame features (float16 / bfloat16 / float32; float64
    where the backend supports it); any strides. key_index: int or int tensor [B], negative
    counts from the end. pool: "mean" or "attn" (then query: [C] and num_heads dividing C).
    frames_per_token: non-key frames per residual token. spatial=(h, w): pool the key frame's grid
    (from a 5-D x or grid=(H, W)) to h x w tokens with adaptive_avg_pool2d bins.

    Returns EncodeOutput(sequence [B, S+G, C], key_tokens [B, S, C], residual_tokens [B, G, C]);
    S = N or h*w, G = ceil((T-1) / frames_per_token).
    """
    _check_features(x, "x", (4, 5), "of shape [B, T, N, C] or [B, T, H, W, C]")
    q = _check_pool(pool, query, num_heads, x)
    _check_positive_int(frames_per_token, "frames_per_token")
    name = _select_backend(backend, x.device, x.dtype, "encode")
    x, grid_from_shape = _prepare_features(x, 2)
    B, T, N, C = x.shape
    spatial_list, grid_list = _check_grid_and_spatial(N, grid, spatial, grid_from_shape)
    keys = _key_tensor(key_index, T, B, x.device)
    sequence, _ = ops.encode(x, keys, q, pool, num_heads, frames_per_token, spatial_list, grid_list, name)
    S = spatial_list[0] * spatial_list[1] if spatial_list else N
    return EncodeOutput(sequence, sequence[:, :S], sequence[:, S:])


def _check_cu_frames(cu_frames, num_frames: int, device: torch.device) -> Tensor:
    if not isinstance(cu_frames, Tensor):
        raise TypeError(f"cu_frames: expected an int32 or int64 tensor of shape [B+1], got {type(cu_frames).__name__}")
    if cu_frames.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_frames: expected dtype int32 or int64, got {cu_frames.dtype}")
    if cu_frames.dim() != 1 or cu_frames.shape[0] < 2:
        raise ValueError(f"cu_frames: expected shape [B+1] with B >= 1, got {tuple(cu_frames.shape)}")
    if cu_frames.device != device:
        raise ValueError(f"cu_frames: expected device {device} (x's), got {cu_frames.device}")
    offsets = cu_frames.to(torch.int64)
    host = offsets.tolist()  # a few integers: validating them needs their values
    if host[0] != 0:
        raise ValueError(f"cu_frames: must start at 0, got {host[0]}")
    if host[-1] != num_frames:
        raise ValueError(f"cu_frames: must end at the number of packed frames F = {num_frames}, got {host[-1]}")
    if any(b <= a for a, b in zip(host[:-1], host[1:])):
        raise ValueError("cu_frames: must be strictly increasing (every video needs at least one frame)")
    return offsets.contiguous()


def encode_varlen(
    x: Tensor,
    cu_frames: Tensor,
    key_index: KeyIndex = 0,
    pool: str = "mean",
    query: Optional[Tensor] = None,
    num_heads: int = 1,
    frames_per_token: int = 1,
    spatial: Optional[tuple[int, int]] = None,
    grid: Optional[tuple[int, int]] = None,
    backend: str = "auto",
) -> EncodeVarlenOutput:
    """Tokenize videos of different lengths packed along one frame dimension.

    x: [F, N, C] or [F, H, W, C]; cu_frames: [B+1] int32/int64 offsets (video b owns frames
    cu_frames[b]:cu_frames[b+1]); key_index relative to each video. Other options as ``encode``.
    Returns EncodeVarlenOutput(sequence [L, C], cu_tokens [B+1], num_key_tokens, max_tokens).
    """
    _check_features(x, "x", (3, 4), "of shape [F, N, C] or [F, H, W, C]")
    q = _check_pool(pool, query, num_heads, x)
    _check_positive_int(frames_per_token, "frames_per_token")
    name = _select_backend(backend, x.device, x.dtype, "encode_varlen")
    x, grid_from_shape = _prepare_features(x, 1)
    F, N, C = x.shape
    spatial_list, grid_list = _check_grid_and_spatial(N, grid, spatial, grid_from_shape)
    offsets = _check_cu_frames(cu_frames, F, x.device)
    host = offsets.tolist()
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    keys = _key_tensor(key_index, lengths, len(lengths), x.device)
    S = spatial_list[0] * spatial_list[1] if spatial_list else N
    tokens_per_video = [S + num_groups(t, frames_per_token) for t in lengths]
    cu_host = [0]
    for n in tokens_per_video:
        cu_host.append(cu_host[-1] + n)
    cu_tokens = torch.tensor(cu_host, dtype=torch.int64, device=x.device)
    sequence, _ = ops.encode_varlen(
        x, offsets, cu_tokens, keys, q, pool, num_heads, frames_per_token, spatial_list, grid_list,
        max(lengths), cu_host[-1], name,
    )
    return EncodeVarlenOutput(sequence, cu_tokens, S, max(tokens_per_video))


def expand(
    key_tokens: Tensor,
    residual_tokens: Tensor,
    key_index: KeyIndex,
    num_frames: int,
    frames_per_token: int = 1,
    backend: str = "auto",
) -> Tensor:
    """The adjoint of mean encoding: key tokens [B, N, C] and residual tokens [B, G, C] -> frames
    [B, T, N, C]; frame k_b is the key tokens, frame t of group g the key tokens plus r_g."""
    _check_features(key_tokens, "key_tokens", (3,), "of shape [B, N, C]")
    # G = 0 (a one-frame video) is legal: dim 1 may be empty.
    _check_features(residual_tokens, "residual_tokens", (3,), "of shape [B, G, C]", may_be_empty=1)
    if residual_tokens.dtype != key_tokens.dtype:
        raise TypeError(f"residual_tokens: expected dtype {key_tokens.dtype} (key_tokens'), got {residual_tokens.dtype}")
    if residual_tokens.device != key_tokens.device:
        raise ValueError(f"residual_tokens: expected device {key_tokens.device} (key_tokens'), got {residual_tokens.device}")
    _check_positive_int(num_frames, "num_frames")
    _check_positive_int(frames_per_token, "frames_per_token")
    B, N, C = key_tokens.shape
    G = num_groups(num_frames, frames_per_token)
    if residual_tokens.dim() != 3 or residual_tokens.shape != (B, G, C):
        raise ValueError(
            f"residual_tokens: expected shape [B, G, C] = [{B}, {G}, {C}] for num_frames={num_frames} "
            f"and frames_per_token={frames_per_token}, got {tuple(residual_tokens.shape)}"
        )
    name = _select_backend(backend, key_tokens.device, key_tokens.dtype, "expand")
    keys = _key_tensor(key_index, num_frames, B, key_tokens.device)
    if key_tokens.stride(-1) != 1:
        key_tokens = key_tokens.contiguous()
    if residual_tokens.stride(-1) != 1:
        residual_tokens = residual_tokens.contiguous()
    return ops.expand(key_tokens, residual_tokens, keys, num_frames, frames_per_token, name)


def available_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """Backends that run on ``device`` here, e.g. ["cuda", "triton", "torch"]."""
    return backends.available_backends(device)
