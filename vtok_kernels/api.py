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
    max_tokens: int  # max_b S + G_b (S + G of max_frames when given), as FlashAttention's max_seqlen


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


def _assert_on_device(ok: Tensor, message: str) -> None:
    """A value check with no host read: a device-side assert, queued before the kernel on the
    same stream, so a failed check never lets the kernel write out of bounds. The CPU runs it at
    once; eager, its RuntimeError becomes the ValueError every other bad value gets.

    ``message`` must be a constant: under torch.compile a size formatted into it may be symbolic,
    and a string made from a symbolic size is a graph break.
    """
    if ok.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


def _key_tensor(key_index, num_frames: Union[int, Sequence[int], Tensor], batch: int, device: torch.device) -> Tensor:
    """Checks key_index against every video's frame count; returns int64 [B] in [0, T_b).

    ``num_frames`` is one T for a batch (it may be symbolic under torch.compile: nothing here
    specialises on T or B), a host list of T_b for varlen, or an int64 tensor [B] of T_b on the
    device for varlen with the sizes given. An int key against host counts is checked on the
    host, with no device synchronisation. Otherwise the check runs on the device and its result
    is read back for a clear ValueError, except against device counts, under torch.compile or
    under CUDA-graph capture, where it is a device-side assert instead.
    """
    counts_on_device = isinstance(num_frames, Tensor)
    uniform = not counts_on_device and not isinstance(num_frames, (list, tuple))
    if _is_int(key_index) and not counts_on_device:
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
    if _is_int(key_index):
        keys = torch.full((batch,), key_index, dtype=torch.int64, device=device)
    else:
        keys = _check_key_tensor(key_index, batch, device)
    if counts_on_device:
        lengths = num_frames
    elif uniform:
        lengths = torch.full((batch,), num_frames, dtype=torch.int64, device=device)
    else:
        lengths = torch.tensor(list(num_frames), dtype=torch.int64, device=device)
    out_of_range = (keys < -lengths) | (keys >= lengths)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if counts_on_device or torch.compiler.is_compiling() or capturing:
        _assert_on_device(~out_of_range.any(), "key_index: out of range [-T_b, T_b) for a video b of T_b frames")
    elif bool(out_of_range.any()):
        b = int(out_of_range.nonzero()[0, 0])
        t = int(lengths[b])
        raise ValueError(f"key_index: {int(keys[b])} is out of range [-{t}, {t}) for video {b} of {t} frames")
    return torch.where(keys < 0, keys + lengths, keys).contiguous()


def _check_key_tensor(key_index, batch: int, device: torch.device) -> Tensor:
    if not isinstance(key_index, Tensor):
        raise TypeError(f"key_index: expected an int or an integer tensor, got {type(key_index).__name__}")
    if key_index.dtype.is_floating_point or key_index.dtype.is_complex or key_index.dtype == torch.bool:
        raise TypeError(f"key_index: expected an int or an integer tensor, got dtype {key_index.dtype}")
    if key_index.dim() > 1 or (key_index.dim() == 1 and key_index.shape[0] != batch):
        raise ValueError(f"key_index: expected an int or a tensor of shape [B] = [{batch}], got {tuple(key_index.shape)}")
    if key_index.device != device:
        raise ValueError(f"key_index: expected device {device} (x's), got {key_index.device}")
    return key_index.to(torch.int64).expand(batch)


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
    sequence = ops.encode_sequence(x, keys, q, pool, num_heads, frames_per_token, spatial_list, grid_list, name)
    S = spatial_list[0] * spatial_list[1] if spatial_list else N
    return EncodeOutput(sequence, sequence[:, :S], sequence[:, S:])


_CU_START = "cu_frames: must start at 0"
_CU_END = "cu_frames: must end at the number of packed frames F"
_CU_INCREASING = "cu_frames: must be strictly increasing (every video needs at least one frame)"


def _check_cu_frames(cu_frames, num_frames: int, device: torch.device,
                     on_device: bool) -> tuple[Tensor, Union[list[int], Tensor]]:
    """Returns the offsets as int64 [B+1] and the frame count T_b of every video.

    The counts are a host list, or with ``on_device`` an int64 tensor [B] whose checks are
    device-side asserts: validating the offsets on the host needs their values, a sync.
    """
    if not isinstance(cu_frames, Tensor):
        raise TypeError(f"cu_frames: expected an int32 or int64 tensor of shape [B+1], got {type(cu_frames).__name__}")
    if cu_frames.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_frames: expected dtype int32 or int64, got {cu_frames.dtype}")
    if cu_frames.dim() != 1 or cu_frames.shape[0] < 2:
        raise ValueError(f"cu_frames: expected shape [B+1] with B >= 1, got {tuple(cu_frames.shape)}")
    if cu_frames.device != device:
        raise ValueError(f"cu_frames: expected device {device} (x's), got {cu_frames.device}")
    offsets = cu_frames.to(torch.int64).contiguous()
    if on_device:
        lengths = offsets.diff()
        _assert_on_device(offsets[0] == 0, _CU_START)
        _assert_on_device(offsets[-1] == num_frames, f"{_CU_END} = x.shape[0]")
        _assert_on_device((lengths > 0).all(), _CU_INCREASING)
        return offsets, lengths
    host = offsets.tolist()
    if host[0] != 0:
        raise ValueError(f"{_CU_START}, got {host[0]}")
    if host[-1] != num_frames:
        raise ValueError(f"{_CU_END} = {num_frames}, got {host[-1]}")
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    if any(t <= 0 for t in lengths):
        raise ValueError(_CU_INCREASING)
    return offsets, lengths


def _check_sizes(max_frames, total_tokens) -> bool:
    """True when the caller gave both varlen sizes (the sync-free path), False for neither."""
    if max_frames is None and total_tokens is None:
        return False
    if total_tokens is None:
        raise ValueError("total_tokens: needed together with max_frames (pass both sizes, or neither)")
    if max_frames is None:
        raise ValueError("max_frames: needed together with total_tokens (pass both sizes, or neither)")
    _check_positive_int(max_frames, "max_frames")
    _check_positive_int(total_tokens, "total_tokens")
    return True


def _cu_tokens(offsets: Tensor, num_key_tokens: int, frames_per_token: int) -> Tensor:
    """[0, cumsum(S + G_b)] on the offsets' device, G_b = ceil((T_b - 1) / frames_per_token)."""
    non_key = (offsets.diff() - 1).clamp_min(0)
    groups = torch.div(non_key + (frames_per_token - 1), frames_per_token, rounding_mode="floor")
    return torch.nn.functional.pad((groups + num_key_tokens).cumsum(0), (1, 0))


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
    max_frames: Optional[int] = None,
    total_tokens: Optional[int] = None,
) -> EncodeVarlenOutput:
    """Tokenize videos of different lengths packed along one frame dimension.

    x: [F, N, C] or [F, H, W, C]; cu_frames: [B+1] int32/int64 offsets (video b owns frames
    cu_frames[b]:cu_frames[b+1]); key_index relative to each video. Other options as ``encode``.

    max_frames (at least the frame count of the longest video) and total_tokens (the rows of the
    output, sum_b S + G_b), as FlashAttention's max_seqlen: pass both, or neither. Without them
    cu_frames is read back to the host to check it and size the output, a device sync. With them
    nothing is read back, so the call can be captured in a CUDA graph or compiled without a graph
    break: every check of cu_frames, key_index and the two sizes is a device-side assert (on the
    CPU a ValueError at once, a RuntimeError under torch.compile).

    Returns EncodeVarlenOutput(sequence [L, C], cu_tokens [B+1], num_key_tokens, max_tokens);
    max_tokens is S + G of the longest video, or of max_frames when the sizes are given.
    """
    _check_features(x, "x", (3, 4), "of shape [F, N, C] or [F, H, W, C]")
    q = _check_pool(pool, query, num_heads, x)
    _check_positive_int(frames_per_token, "frames_per_token")
    sized = _check_sizes(max_frames, total_tokens)
    name = _select_backend(backend, x.device, x.dtype, "encode_varlen")
    x, grid_from_shape = _prepare_features(x, 1)
    F, N, C = x.shape
    spatial_list, grid_list = _check_grid_and_spatial(N, grid, spatial, grid_from_shape)
    S = spatial_list[0] * spatial_list[1] if spatial_list else N
    offsets, lengths = _check_cu_frames(cu_frames, F, x.device, on_device=sized)
    keys = _key_tensor(key_index, lengths, offsets.shape[0] - 1, x.device)
    cu_tokens = _cu_tokens(offsets, S, frames_per_token)
    if sized:
        _assert_on_device(lengths.max() <= max_frames,
                          "max_frames: must be at least the frame count of the longest video in cu_frames")
        _assert_on_device(cu_tokens[-1] == total_tokens,
                          "total_tokens: must equal the output rows sum_b (S + G_b) of cu_frames, "
                          "G_b = ceil((T_b - 1) / frames_per_token)")
    else:
        max_frames = max(lengths)
        total_tokens = sum(S + num_groups(t, frames_per_token) for t in lengths)
    sequence = ops.encode_varlen_sequence(
        x, offsets, cu_tokens, keys, q, pool, num_heads, frames_per_token, spatial_list, grid_list,
        max_frames, total_tokens, name,
    )
    return EncodeVarlenOutput(sequence, cu_tokens, S, S + num_groups(max_frames, frames_per_token))


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
    return ops.expand_frames(key_tokens, residual_tokens, keys, num_frames, frames_per_token, name)


def available_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """Backends that run on ``device`` here, e.g. ["cuda", "triton", "torch"]."""
    return backends.available_backends(device)
