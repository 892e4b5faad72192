"""The CUDA kernels compiled at run time by NVRTC through CuPy, from the same ``csrc/cuda``
sources the extension compiles with nvcc.

Used by the ``cuda`` backend when ``vtok_kernels._C`` was built without nvcc. The params structs
cross as NumPy structured scalars whose layout (``np.dtype(..., align=True)``, i.e. the C
layout) matches ``csrc/include/vtok/params.h``; ``tests/test_cuda_backend.py`` checks it
against ``offsetof`` / ``sizeof``. The launch plan (vector width, row plan, grids) mirrors
``csrc/cuda/*.cu`` line for line, and so do the checks before it: a launch the extension refuses
with a ValueError (``python/cuda_bindings.cpp``, the launchers' limits) is refused here with the
same message, before CuPy is called.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np

# ------------------------------------------------------------------ sources

_ROOT = Path(__file__).resolve().parents[2]


def source_dirs() -> tuple[Path, Path]:
    """(csrc/include, csrc/cuda): from a source checkout, or the copies installed with the package."""
    candidates = [
        (_ROOT / "csrc" / "include", _ROOT / "csrc" / "cuda"),
        (Path(__file__).resolve().parents[1] / "csrc" / "include",
         Path(__file__).resolve().parents[1] / "csrc" / "cuda"),
    ]
    for include, cuda in candidates:
        if (cuda / "encode.cuh").is_file() and (include / "vtok" / "params.h").is_file():
            return include, cuda
    raise FileNotFoundError("the CUDA sources (csrc/cuda/*.cuh, csrc/include/vtok/*.h) are not installed")


PROGRAM_SOURCE = '#include "encode.cuh"\n#include "expand.cuh"\n'

_TYPES = {"float32": "float", "float16": "vtok::cuda::half_t", "bfloat16": "vtok::cuda::bf16_t"}
_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_CODES = {0: "float32", 1: "float16", 2: "bfloat16"}
MEAN, ATTN, GROUP_SUM, MERGE_SPLITS = 0, 1, 2, 3
THREADS = 256
WARPS = THREADS // 32
LANE_ELEMS = 24
MAX_HEAD_DIM = 32 * LANE_ELEMS
# common.cuh kFwdVecs: vectors per lane of the encode forward's mean pooling on 16-byte rows.
FWD_VECS = 2
# encode.cu kFillSms: the forward's grid aims at two waves of resident blocks on this many SMs
# (an H100's), whatever the device. Tests lower it to reach several groups per block at small
# shapes.
FILL_SMS = 132


def vec_width(dtype: str) -> int:
    return 16 // _ELEMENT_SIZE[dtype]


def residual_fwd_kernel(ctype: str, vec: int, mode: int, vecs_per_lane: int = 0) -> str:
    """The name expression of residual_fwd_kernel in ``mode``: attention on 16-byte rows is
    compiled for the plan's ``vecs_per_lane``, every other mode for encode.cuh
    residual_vecs_per_lane (spelled out, as the compiler names it)."""
    k = vecs_per_lane if mode == ATTN and vec > 1 else residual_vecs_per_lane(vec, mode)
    return f"vtok::cuda::residual_fwd_kernel<{ctype}, {vec}, {mode}, {k}>"


def warp_pool_kernel(ctype: str, vec: int, attn: bool, vecs_per_lane: int) -> str:
    """The name expression of warp_pool_kernel (encode.cu launch_warp_pool): attention compiled
    for the plan's ``vecs_per_lane``, mean pooling for FWD_VECS."""
    k = vecs_per_lane if attn else FWD_VECS
    return f"vtok::cuda::warp_pool_kernel<{ctype}, {vec}, {'true' if attn else 'false'}, {k}>"


WARP_POOL_MIN_BLOCKS = 2  # encode.cuh kWarpPoolMinBlocks

FWD_DESIGNS = ("tiles", "warps")


def fwd_design() -> str:
    """The encode forward's design on 16-byte rows (launch.h FwdDesign): $VTOK_CUDA_FWD, default
    "tiles" (a block per tile of patch rows) or "warps" (a warp per split of the rows and chunk
    of groups). An op reads it once and passes it to its loader."""
    import os

    name = os.environ.get("VTOK_CUDA_FWD") or "tiles"
    if name not in FWD_DESIGNS:
        raise ValueError(f"VTOK_CUDA_FWD: unknown forward design {name!r}; expected one of {FWD_DESIGNS}")
    return name


def warp_chunk_groups(vec: int, k: int) -> int:
    """encode.cuh warp_chunk_groups: the most groups a warp_pool_kernel warp holds."""
    return 4 if vec * k <= 8 else 2 if vec * k <= 16 else 1


def bwd_vecs_per_lane(vec: int) -> int:
    """encode.cuh bwd_vecs_per_lane: the most vectors per lane an encode_bwd_kernel holds."""
    return max_vecs_per_lane(vec)


def encode_bwd_kernel(ctype: str, vec: int, attn: bool, vecs_per_lane: int = 0) -> str:
    """The name expression of encode_bwd_kernel: on 16-byte rows compiled for the plan's
    ``vecs_per_lane``, on the scalar path for bwd_vecs_per_lane (spelled out, as the compiler
    names it)."""
    k = vecs_per_lane if vec > 1 else bwd_vecs_per_lane(vec)
    return f"vtok::cuda::encode_bwd_kernel<{ctype}, {vec}, {'true' if attn else 'false'}, {k}>"


def kernel_names() -> list[str]:
    """Every template instantiation the launchers use, as NVRTC name expressions."""
    names = []
    for dtype, ctype in _TYPES.items():
        for v in (vec_width(dtype), 1):
            for mode in (MEAN, ATTN, GROUP_SUM) + ((MERGE_SPLITS,) if v > 1 else ()):
                counts = range(1, fwd_vecs_per_lane(v, True) + 1) if mode == ATTN and v > 1 else (0,)
                names.extend(residual_fwd_kernel(ctype, v, mode, k) for k in counts)
            if v > 1:
                names.extend(warp_pool_kernel(ctype, v, True, k) for k in range(1, fwd_vecs_per_lane(v, True) + 1))
                names.append(warp_pool_kernel(ctype, v, False, FWD_VECS))
            names.append(f"vtok::cuda::key_tokens_kernel<{ctype}, {v}>")
            for attn in (False, True):
                counts = range(1, bwd_vecs_per_lane(v) + 1) if v > 1 else (0,)
                names.extend(encode_bwd_kernel(ctype, v, attn, k) for k in counts)
            names.append(f"vtok::cuda::expand_fwd_kernel<{ctype}, {v}>")
            names.append(f"vtok::cuda::expand_grad_keys_kernel<{ctype}, {v}>")
        names.append(f"vtok::cuda::attn_delta_kernel<{ctype}>")
    names.append(f"vtok::cuda::grad_query_reduce_kernel<{THREADS}>")
    return names


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """Options for NVRTC; arch like "sm_90a" (cubin) or "compute_80" (PTX)."""
    include, cuda = source_dirs()
    return ("-std=c++17", f"-arch={arch}", f"-I{include}", f"-I{cuda}")


# ------------------------------------------------------------------ params layout

_PTR = np.uint64
_I64 = np.int64
_I32 = np.int32

ENCODE_PARAMS = np.dtype([
    ("x", _PTR), ("x_stride_b", _I64), ("x_stride_t", _I64), ("x_stride_n", _I64),
    ("batch", _I64), ("num_frames", _I64), ("num_patches", _I64), ("channels", _I64),
    ("dtype", _I32), ("key_index", _PTR), ("cu_frames", _PTR), ("cu_tokens", _PTR),
    ("pool", _I32), ("query", _PTR), ("num_heads", _I64), ("frames_per_token", _I64),
    ("spatial", np.bool_), ("grid_h", _I64), ("grid_w", _I64), ("out_h", _I64), ("out_w", _I64),
    ("num_key_tokens", _I64), ("num_groups", _I64), ("sequence", _PTR), ("lse", _PTR),
    ("residual32", _PTR),
    ("workspace", _PTR), ("workspace_elems", _I64),
], align=True)

ENCODE_BWD_PARAMS = np.dtype([
    ("fwd", ENCODE_PARAMS), ("grad_sequence", _PTR), ("grad_x", _PTR), ("grad_query", _PTR),
    ("workspace", _PTR), ("workspace_elems", _I64),
], align=True)

EXPAND_PARAMS = np.dtype([
    ("key_tokens", _PTR), ("key_stride_b", _I64), ("key_stride_n", _I64),
    ("residual_tokens", _PTR), ("res_stride_b", _I64), ("res_stride_g", _I64),
    ("batch", _I64), ("num_frames", _I64), ("num_patches", _I64), ("channels", _I64),
    ("num_groups", _I64), ("frames_per_token", _I64), ("key_index", _PTR), ("dtype", _I32),
    ("frames", _PTR),
], align=True)

EXPAND_BWD_PARAMS = np.dtype([
    ("grad_frames", _PTR), ("batch", _I64), ("num_frames", _I64), ("num_patches", _I64),
    ("channels", _I64), ("num_groups", _I64), ("frames_per_token", _I64), ("key_index", _PTR),
    ("dtype", _I32), ("grad_key_tokens", _PTR), ("grad_residual_tokens", _PTR),
], align=True)

ROW_PLAN = np.dtype([("lanes", _I32), ("vecs_per_lane", _I32), ("seg_vecs", _I32),
                     ("num_segments", _I32), ("splits", _I32), ("groups_per_block", _I32)], align=True)

STRUCTS = {
    "EncodeParams": ENCODE_PARAMS,
    "EncodeBwdParams": ENCODE_BWD_PARAMS,
    "ExpandParams": EXPAND_PARAMS,
    "ExpandBwdParams": EXPAND_BWD_PARAMS,
}


def pack(dtype: np.dtype, fields: dict) -> np.ndarray:
    """A one-element structured array (what CuPy passes by value) from a {field: value} dict."""
    out = np.zeros((1,), dtype=dtype)
    for name, value in fields.items():
        if isinstance(value, dict):
            out[name] = pack(dtype.fields[name][0], value)
        else:
            out[name] = value
    return out


def layout(dtype: np.dtype) -> tuple[int, dict]:
    """(sizeof, {field: offset}) as the extension's cuda_params_layout() reports it."""
    return dtype.itemsize, {name: spec[1] for name, spec in dtype.fields.items()}


# ------------------------------------------------------------------ launch plan (mirrors csrc/cuda)

def max_vecs_per_lane(vec: int) -> int:
    """common.cuh max_vecs_per_lane."""
    return 4 if vec == 4 else LANE_ELEMS // vec


def plan_rows(seg_vecs: int, num_segments: int, vec: int, fewest_lanes: bool = False,
              max_k: int = 0) -> tuple[int, int, int, int]:
    """(lanes, vecs_per_lane, seg_vecs, num_segments): common.cuh plan_rows."""
    max_k = max_k or max_vecs_per_lane(vec)
    best, lanes_k = -1, (0, 0)
    for lanes in ((1, 2, 4, 8, 16, 32) if fewest_lanes else (32, 16, 8, 4, 2, 1)):
        k = -(-seg_vecs // lanes)
        if k > max_k:
            continue
        waste = lanes * k - seg_vecs
        if best < 0 or waste < best:
            best, lanes_k = waste, (lanes, k)
    return lanes_k[0], lanes_k[1], seg_vecs, num_segments


def plan_segments(channels: int, vec: int, attn: bool, num_heads: int):
    total = channels // vec
    if attn:
        return plan_rows(total // num_heads, num_heads, vec)
    segments = -(-total // 64)
    return plan_rows(-(-total // segments), segments, vec)


def fwd_vecs_per_lane(vec: int, attn: bool) -> int:
    """common.cuh fwd_vecs_per_lane."""
    return (3 if vec == 4 else max_vecs_per_lane(vec)) if attn else FWD_VECS


def residual_vecs_per_lane(vec: int, mode: int) -> int:
    """encode.cuh residual_vecs_per_lane: the vectors per lane residual_fwd_kernel holds in
    ``mode`` (attention on 16-byte rows: the most its plan may choose)."""
    if mode == MERGE_SPLITS:
        return 0
    return fwd_vecs_per_lane(vec, mode == ATTN) if vec > 1 and mode != GROUP_SUM else max_vecs_per_lane(vec)


def plan_segments_fwd(channels: int, vec: int, attn: bool, num_heads: int):
    """common.cuh plan_segments_fwd: the encode forward on 16-byte rows."""
    total = channels // vec
    if attn:
        return plan_rows(total // num_heads, num_heads, vec, True, fwd_vecs_per_lane(vec, True))
    segments = -(-total // 8)
    return plan_rows(-(-total // segments), segments, vec, True, fwd_vecs_per_lane(vec, False))


def _aligned(ptr: int) -> bool:
    return ptr % 16 == 0


def encode_vector_width(p: dict, grad_sequence: int = 0, grad_x: int = 0) -> int:
    """encode.cu encode_vector_width."""
    vec = vec_width(_DTYPE_CODES[p["dtype"]])
    attn = p["pool"] == ATTN
    ok = (p["channels"] % vec == 0 and (not attn or (p["channels"] // p["num_heads"]) % vec == 0)
          and _aligned(p["x"]) and _aligned(p["sequence"]) and p["x_stride_t"] % vec == 0
          and p["x_stride_n"] % vec == 0 and (p["cu_frames"] != 0 or p["x_stride_b"] % vec == 0))
    if p.get("workspace", 0):
        ok = ok and _aligned(p["workspace"])
    if grad_sequence:
        ok = ok and _aligned(grad_sequence)
    if grad_x:
        ok = ok and _aligned(grad_x)
    return vec if ok else 1


def encode_plan(p: dict, backward: bool = False, grad_sequence: int = 0, grad_x: int = 0):
    """(vec, lanes, vecs_per_lane, seg_vecs, num_segments), as the extension's cuda_encode_plan."""
    vec = encode_vector_width(p, grad_sequence, grad_x) if backward else encode_vector_width(p)
    attn = p["pool"] == ATTN
    plan = (plan_segments(p["channels"], vec, attn, p["num_heads"]) if backward or vec == 1
            else plan_segments_fwd(p["channels"], vec, attn, p["num_heads"]))
    if plan[0] == 0 and vec > 1:  # a head too wide for 16-byte rows: the scalar path
        vec = 1
        plan = plan_segments(p["channels"], vec, p["pool"] == ATTN, p["num_heads"])
    return (vec,) + plan


def num_groups(frames: int, frames_per_token: int) -> int:
    return 0 if frames <= 1 else -(-(frames - 1) // frames_per_token)


def dq_partial_rows(batch: int, num_patches: int) -> int:
    return batch * (-(-num_patches // WARPS))


def encode_bwd_workspace_elems(batch: int, num_patches: int, channels: int, lse_elems: int) -> int:
    return dq_partial_rows(batch, num_patches) * channels + lse_elems


def fwd_min_blocks(vec: int, mode: int) -> int:
    """encode.cuh fwd_min_blocks: the resident blocks per SM the forward's kernels are built for."""
    return 1 if vec == 1 else (3 if mode == ATTN else 4)


def encode_split(tiles: int, segments: int, batch: int, groups: int, fill_blocks: int,
                 tile_blocks: bool) -> tuple[int, int, int]:
    """(splits, groups_per_block, chunks): vtok/encode_split.h encode_split."""
    if not tile_blocks or groups < 1:
        return 1, 1, groups
    base = segments * tiles * batch
    chunks = -(-fill_blocks // base) if fill_blocks > base else 1
    # ceil(groups / g) >= chunks for every g < groups / (chunks - 1)
    most = -(-groups // (chunks - 1)) - 1 if chunks > 1 else groups
    per_block = max(most, 1)
    return tiles, per_block, -(-groups // per_block)


def encode_fwd_workspace_elems_for(batch: int, groups: int, splits: int, channels: int, heads: int,
                                   attn: bool, tile_blocks: bool = True) -> int:
    """vtok/encode_split.h encode_fwd_workspace_elems (none on the scalar path)."""
    return batch * groups * splits * (channels + (2 * heads if attn else 0)) if tile_blocks else 0


def warp_split(rows: int, segments: int, batch: int, groups: int, chunk_groups: int, fill_warps: int,
               warps_per_block: int) -> tuple[int, int, int, int]:
    """(splits, groups_per_warp, chunks, blocks): vtok/encode_split.h warp_split."""
    if groups < 1:
        return 1, 1, 0, 0
    per_item = batch * segments
    target = -(-fill_warps // per_item)
    per_warp = min(chunk_groups, groups)
    chunks = -(-groups // per_warp)

    def splits_up_to(min_rows: int) -> int:
        return min(max(-(-target // chunks), 1), max(rows // min_rows, 1))

    splits = splits_up_to(64)
    if splits * chunks < target and per_warp > 1:
        wanted = -(-target // splits)
        per_warp = 1 if wanted >= groups else -(-groups // wanted)
        chunks = -(-groups // per_warp)
        splits = splits_up_to(64)  # no more than the smaller chunks need
    if 2 * splits * chunks < target:  # short of one wave
        splits = max(splits, splits_up_to(16))
    return splits, per_warp, chunks, -(-(per_item * chunks * splits) // warps_per_block)


def encode_fwd_grid(p: dict, design: str = "tiles", plan=None) -> tuple[int, int, int, int]:
    """encode.cu forward_grid: (splits, groups per block or warp, chunks, blocks) of the
    residual launch, as the extension's cuda_encode_fwd_grid."""
    vec, lanes, k, _, segments = encode_plan(p) if plan is None else plan
    groups = max_groups(p)
    if design == "warps" and vec > 1:
        compiled_k = k if _get(p, "pool") == ATTN else FWD_VECS  # encode.cu launch_warp_pool
        return warp_split(_get(p, "num_patches"), segments, _get(p, "batch"), groups,
                          warp_chunk_groups(vec, compiled_k),
                          2 * FILL_SMS * WARP_POOL_MIN_BLOCKS * WARPS, WARPS)
    tiles = -(-_get(p, "num_patches") // (THREADS // lanes))
    mode = ATTN if _get(p, "pool") == ATTN else MEAN
    splits, per_block, chunks = encode_split(tiles, segments, _get(p, "batch"), groups,
                                             2 * FILL_SMS * fwd_min_blocks(vec, mode), vec > 1)
    return splits, per_block, chunks, splits * segments * chunks * _get(p, "batch")


# The params fields that hold device pointers. The launch plan reads of a pointer only whether
# it is set and whether it is 16-byte aligned (encode_vector_width, the varlen checks).
POINTER_FIELDS = frozenset({"x", "key_index", "query", "sequence", "lse", "residual32", "cu_frames",
                            "cu_tokens", "workspace", "grad_sequence", "grad_x", "grad_query"})


def plan_key(p: dict) -> tuple:
    """What the launch plan of params ``p`` depends on: every size and option, and of each pointer
    (set, 16-byte aligned). Two calls with equal keys get the same grid and workspace."""
    return tuple((name, (value != 0, value % 16 == 0) if name in POINTER_FIELDS else value)
                 for name, value in p.items())


@functools.lru_cache(maxsize=256)
def _workspace_elems_of(key: tuple, design: str, fill_sms: int) -> int:
    # a pointer stands for any of its kind: set and aligned (16), set and misaligned (8), null
    p = {name: (16 if value == (True, True) else 8 if value[0] else 0) if name in POINTER_FIELDS else value
         for name, value in key}
    return _encode_fwd_workspace_elems(p, design)


def encode_fwd_workspace_elems(p: dict, design: str = "tiles") -> int:
    """Floats of workspace the forward of params ``p`` (a fields dict) needs in ``design``,
    after the checks its launch makes first (ValueError): the partial rows of a frame's splits.
    Computed once per plan_key (a refused launch is checked again on every call); FILL_SMS, which
    the grids are sized for, is part of the key."""
    return _workspace_elems_of(plan_key(p), design, FILL_SMS)


def _encode_fwd_workspace_elems(p: dict, design: str) -> int:
    check_encode_args(p)
    plan = encode_plan(p)
    check_encode_launch(p, plan[1])
    if max_groups(p) < 1:
        return 0
    splits = encode_fwd_grid(p, design, plan)[0]
    return encode_fwd_workspace_elems_for(_get(p, "batch"), max_groups(p), splits, _get(p, "channels"),
                                          _get(p, "num_heads"), _get(p, "pool") == ATTN, plan[0] > 1)


def _flat_blocks(work: int) -> int:
    return max(1, min(-(-work // THREADS), 4096))


def _flat_blocks_per_video(work: int, batch: int) -> int:
    return max(1, min(-(-work // THREADS), -(-4096 // batch)))


# expand.cu kExpandFillBlocks: one wave of resident blocks on an H100 (132 SMs x 8).
EXPAND_FILL_BLOCKS = 132 * 8


def expand_fwd_grid(items: int, groups: int) -> tuple[int, int, int]:
    """expand.cu expand_fwd_grid: the key tokens' vectors on x, and while x leaves the device short
    of blocks, the groups in contiguous chunks on z (only for G < 2^31)."""
    x = _flat_blocks(items)
    z = 1
    if 1 < groups < 2**31:
        z = min(groups, -(-EXPAND_FILL_BLOCKS // x))
    return x, 1, z


# ------------------------------------------------------------------ launch checks (mirror the extension)
#
# The extension refuses a launch it cannot make before anything reaches the device: argument
# checks in python/cuda_bindings.cpp (check_dtype, check_encode with encode_params_error of
# csrc/include/vtok/params_check.h, check_expand_sizes, the pointer checks of each binding), then
# limits in the launchers (csrc/cuda/encode.cu check_encode and encode_bwd, csrc/cuda/expand.cu
# expand_bwd). The functions below are those checks with the same text, so that both loaders
# raise the same ValueError for the same call; a change to either side is a change to both
# (tests/test_cuda_launch_limits.py compares them case by case).
#
# One difference of order: the null-pointer checks run last, at the device launch
# (NvrtcLoader._launch), not first as in the bindings. The launch plan is computed from the
# sizes alone so that it can be recorded from meta tensors, whose data pointers are null
# (machine_code.record_launches); a call with a null pointer and also a bad size reports the
# size here and the pointer in the extension. Fields missing from a params dict are 0, as
# pack() sends them.

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
# key_tokens_kernel indexes a video's S * C key token elements in 32 bits.
MAX_KEY_TOKEN_ELEMS = 2**31


def _refuse(message: str) -> None:
    raise ValueError("vtok cuda: " + message)


def _get(p, name: str) -> int:
    """Field ``name`` of a params dict (0 when missing) or of a packed struct's element."""
    return int(p[name]) if isinstance(p, np.void) else int(p.get(name, 0))


def _check_dtype(p: dict) -> None:
    if _get(p, "dtype") not in _DTYPE_CODES:
        _refuse("dtype must be float32, float16 or bfloat16 (float64 runs on the cpu and torch backends)")


def encode_params_error(p: dict) -> Optional[str]:
    """params_check.h encode_params_error without its null-pointer checks (null_pointer_error):
    None when consistent, else what is wrong."""
    g = functools.partial(_get, p)
    if g("batch") < 1 or g("num_frames") < 1 or g("num_patches") < 1 or g("channels") < 1:
        return "batch, num_frames, num_patches and channels must be >= 1"
    if g("frames_per_token") < 1:
        return "frames_per_token must be >= 1"
    if g("num_heads") < 1 or g("channels") % g("num_heads") != 0:
        return "num_heads must be >= 1 and divide channels"
    if bool(g("cu_frames")) != bool(g("cu_tokens")):
        return "cu_frames and cu_tokens must both be set (varlen) or both be null (batched)"
    if not g("cu_frames") and g("num_groups") != num_groups(g("num_frames"), g("frames_per_token")):
        return "num_groups must be ceil((num_frames - 1) / frames_per_token)"
    if g("pool") == MEAN:
        if g("num_heads") != 1:
            return "mean pooling takes num_heads == 1"
    elif g("pool") != ATTN:
        return "pool must be mean or attn"
    if g("spatial"):
        if g("grid_h") < 1 or g("grid_w") < 1 or g("grid_h") * g("grid_w") != g("num_patches"):
            return "grid_h * grid_w must equal num_patches"
        if g("out_h") < 1 or g("out_w") < 1 or g("out_h") > g("grid_h") or g("out_w") > g("grid_w"):
            return "spatial (out_h, out_w) must fit in the grid"
        if g("num_key_tokens") != g("out_h") * g("out_w"):
            return "num_key_tokens must be out_h * out_w"
    elif g("num_key_tokens") != g("num_patches"):
        return "num_key_tokens must equal num_patches without spatial"
    return None


def null_pointer_error(struct: np.dtype, p) -> Optional[str]:
    """The extension's null-pointer checks (params_check.h and the bindings, in their order) for
    the fields of a ``struct``, a dict or a packed element: None when every pointer the kernels
    read or write is set."""
    g = functools.partial(_get, p)
    if struct == ENCODE_PARAMS:
        if not g("x") or not g("sequence") or not g("key_index"):
            return "x, sequence and key_index must be set (got a null pointer)"
        if g("pool") == ATTN:
            if not g("query"):
                return "attn pooling needs query"
            # Varlen: whether any video has a residual token is known on the device only.
            if not (g("lse") or g("cu_frames") or g("num_groups") == 0):
                return "attn pooling needs lse"
        # The forward's launcher: a workspace the plan sized (workspace_elems) must be there.
        if g("workspace_elems") and not g("workspace"):
            return "the forward needs a workspace of encode_fwd_workspace_elems floats"
        return None
    if struct == ENCODE_BWD_PARAMS:
        error = null_pointer_error(ENCODE_PARAMS, p["fwd"])
        if error is not None:
            return error
        if not g("grad_sequence") or not g("grad_x"):
            return "grad_sequence and grad_x must be set"
        if _get(p["fwd"], "pool") == ATTN and (not g("grad_query") or not g("workspace")):
            return "attn backward needs grad_query and workspace (cuda_encode_bwd_workspace_elems floats)"
        return None
    if struct == EXPAND_PARAMS:
        if not (g("key_tokens") and g("frames") and g("key_index") and (g("num_groups") == 0 or g("residual_tokens"))):
            return "key_tokens, residual_tokens, key_index and frames must be device pointers"
        return None
    if struct == EXPAND_BWD_PARAMS:
        if not (g("grad_frames") and g("grad_key_tokens") and g("key_index")
                and (g("num_groups") == 0 or g("grad_residual_tokens"))):
            return "grad_frames, grad_key_tokens, grad_residual_tokens and key_index must be device pointers"
        return None
    raise TypeError(f"not a params struct: {struct}")


def check_pointers(params: np.ndarray) -> None:
    """A ValueError for a packed params struct (what a kernel receives) with a null pointer."""
    error = null_pointer_error(params.dtype, params.reshape(-1)[0])
    if error is not None:
        _refuse(error)


def check_encode_args(p: dict) -> None:
    """cuda_bindings.cpp check_encode: the arguments of either encode launcher."""
    _check_dtype(p)
    error = encode_params_error(p)
    if error is not None:
        _refuse(error)
    if _get(p, "pool") == ATTN and _get(p, "channels") // _get(p, "num_heads") > MAX_HEAD_DIM:
        _refuse(f"attention heads wider than {MAX_HEAD_DIM} channels are not supported")


def max_groups(p: dict) -> int:
    """encode.cu max_groups: residual tokens per video, the residual kernels' grid axis y."""
    return (num_groups(_get(p, "num_frames"), _get(p, "frames_per_token")) if _get(p, "cu_frames")
            else _get(p, "num_groups"))


def check_encode_launch(p: dict, lanes: int) -> None:
    """encode.cu check_encode: the grids (videos on axis z or y, residual tokens on axis y) and
    key_tokens_kernel's 32-bit index, given the row plan's ``lanes``."""
    if _get(p, "batch") > MAX_GRID_YZ:
        _refuse("at most 65535 videos per call")
    if _get(p, "num_key_tokens") * _get(p, "channels") >= MAX_KEY_TOKEN_ELEMS:
        _refuse("key tokens of more than 2^31 elements per video")
    if max_groups(p) > MAX_GRID_YZ:
        _refuse("at most 65535 residual tokens per video")
    if _get(p, "num_frames") >= 2**31:
        _refuse("fewer than 2^31 frames per video")
    if lanes == 0:
        _refuse(f"attention heads of {_get(p, 'channels') // _get(p, 'num_heads')} channels exceed the {MAX_HEAD_DIM} "
                "a block pools (use more heads or another backend)")


def encode_bwd_tiles(num_patches: int, lanes: int) -> int:
    """encode.cu encode_bwd: blocks of THREADS / lanes patch rows, the backward's grid axis y."""
    rows = THREADS // lanes
    return -(-num_patches // rows)


def check_encode_bwd_launch(bp: dict, lanes: int) -> None:
    """encode.cu encode_bwd: check_encode, then patch tiles on grid axis y and the workspace."""
    p = bp["fwd"]
    check_encode_launch(p, lanes)
    g = functools.partial(_get, p)
    if encode_bwd_tiles(g("num_patches"), lanes) > MAX_GRID_YZ:
        _refuse("too many patches per frame")
    if g("pool") == ATTN:
        # Varlen: sum_b G_b is known to the caller only (cu_tokens lives on the device). The
        # launcher's null checks of workspace and grad_query are null_pointer_error's.
        lse_elems = 0 if g("cu_frames") else g("batch") * g("num_groups") * g("num_heads")
        if _get(bp, "workspace_elems") < encode_bwd_workspace_elems(g("batch"), g("num_patches"), g("channels"),
                                                                     lse_elems):
            _refuse("the attn backward needs grad_query and a workspace of encode_bwd_workspace_elems floats")


def check_expand_args(p: dict) -> None:
    """The cuda_expand_fwd / cuda_expand_bwd bindings: check_dtype, check_expand_sizes."""
    g = functools.partial(_get, p)
    _check_dtype(p)
    if g("batch") < 1 or g("num_frames") < 1 or g("num_patches") < 1 or g("channels") < 1:
        _refuse("batch, num_frames, num_patches and channels must be >= 1")
    if g("frames_per_token") < 1:
        _refuse("frames_per_token must be >= 1")
    if g("num_groups") != num_groups(g("num_frames"), g("frames_per_token")):
        _refuse("num_groups must be ceil((num_frames - 1) / frames_per_token)")


def check_expand_bwd_launch(p: dict) -> None:
    """expand.cu expand_bwd: the group sum's grid holds the videos on axis z, the groups on y."""
    if _get(p, "batch") > MAX_GRID_YZ or _get(p, "num_groups") > MAX_GRID_YZ:
        _refuse("at most 65535 videos and 65535 residual tokens per call")


def check_grid(kernel: str, grid) -> None:
    """CUDA's grid limits, for every launch this loader makes. The checks above keep the grids
    of the extension's launchers within them; this one stands behind them so that no launch
    reaches the driver with a grid it would refuse."""
    limits = (MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ)
    if len(grid) > 3 or any(not 1 <= int(g) <= limit for g, limit in zip(grid, limits)):
        _refuse(f"{kernel} would launch a grid of {tuple(int(g) for g in grid)} blocks; CUDA allows "
                f"1 to {MAX_GRID_X} along x and 1 to {MAX_GRID_YZ} along y and z")


# ------------------------------------------------------------------ launches
#
# Each op's launches as (kernel name expression, grid, kernel arguments), in launch order, built
# by pure functions: the checks and the grids can be exercised without CuPy or a GPU.

def _checked(launches: list) -> list:
    for kernel, grid, _ in launches:
        check_grid(kernel, grid)
    return launches


def _ctype(dtype_code: int) -> str:
    return _TYPES[_DTYPE_CODES[dtype_code]]


def _row_plan(lanes: int, k: int, seg_vecs: int, segments: int, splits: int = 1,
              groups_per_block: int = 1) -> np.ndarray:
    return pack(ROW_PLAN, dict(lanes=lanes, vecs_per_lane=k, seg_vecs=seg_vecs, num_segments=segments,
                               splits=splits, groups_per_block=groups_per_block))


def encode_fwd_launches(p: dict, design: str = "tiles") -> list:
    """The launches of encode.cu encode_fwd in ``design``, after its checks (ValueError); no CuPy
    needed."""
    check_encode_args(p)
    if design not in FWD_DESIGNS:
        _refuse(f"unknown forward design '{design}' (expected 'tiles' or 'warps')")
    vec, lanes, k, seg_vecs, segments = plan_info = encode_plan(p)
    check_encode_launch(p, lanes)
    ctype = _ctype(p["dtype"])
    groups = max_groups(p)
    warps = design == "warps" and vec > 1
    splits, per_item, chunks, blocks = encode_fwd_grid(p, design, plan_info)
    if groups > 0:
        needed = encode_fwd_workspace_elems_for(p["batch"], groups, splits, p["channels"], p["num_heads"],
                                                p["pool"] == ATTN, vec > 1)
        if needed > 0 and _get(p, "workspace_elems") < needed:
            _refuse("the forward needs a workspace of encode_fwd_workspace_elems floats")
        if splits * segments > MAX_GRID_X or (warps and blocks > MAX_GRID_X):
            _refuse("too many patches per frame")
    params = pack(ENCODE_PARAMS, p)
    plan = _row_plan(lanes, k, seg_vecs, segments, splits, per_item)
    launches = []
    if p["num_key_tokens"] > 0:
        grid = (_flat_blocks_per_video(p["num_key_tokens"] * p["channels"] // vec, p["batch"]), p["batch"])
        launches.append((f"vtok::cuda::key_tokens_kernel<{ctype}, {vec}>", grid, (params,)))
    if groups > 0:
        mode = ATTN if p["pool"] == ATTN else MEAN
        if warps:  # encode.cu launch_warp_pool
            launches.append((warp_pool_kernel(ctype, vec, mode == ATTN, k), (blocks,), (params, plan)))
        else:
            # encode.cu launch_attn_pool: attention on 16-byte rows at the plan's vectors per lane
            launches.append((residual_fwd_kernel(ctype, vec, mode, k), (splits * segments, chunks, p["batch"]),
                             (params, plan)))
        if vec > 1:  # the partial rows of the splits, merged in split order
            launches.append((residual_fwd_kernel(ctype, vec, MERGE_SPLITS),
                             (-(-(p["channels"] // vec) // THREADS), groups, p["batch"]), (params, plan)))
    return _checked(launches)


def encode_bwd_launches(bp: dict) -> list:
    """The launches of encode.cu encode_bwd, after its checks (ValueError); no CuPy needed."""
    p = bp["fwd"]
    check_encode_args(p)
    vec, lanes, k, seg_vecs, segments = encode_plan(p, True, bp["grad_sequence"], bp["grad_x"])
    check_encode_bwd_launch(bp, lanes)
    ctype = _ctype(p["dtype"])
    params = pack(ENCODE_BWD_PARAMS, bp)
    plan = _row_plan(lanes, k, seg_vecs, segments)
    groups = max_groups(p)
    tiles = encode_bwd_tiles(p["num_patches"], lanes)
    grid = (segments, tiles, p["batch"])
    launches = []
    if p["pool"] == ATTN:
        if groups > 0:
            launches.append((f"vtok::cuda::attn_delta_kernel<{ctype}>", (groups, p["batch"]), (params,)))
        # encode.cu launch_bwd: on 16-byte rows at the plan's vectors per lane
        launches.append((encode_bwd_kernel(ctype, vec, True, k), grid, (params, plan)))
        launches.append((f"vtok::cuda::grad_query_reduce_kernel<{THREADS}>", (-(-p["channels"] // THREADS),),
                         (params, np.int64(p["batch"] * tiles))))
    else:
        launches.append((encode_bwd_kernel(ctype, vec, False, k), grid, (params, plan)))
    return _checked(launches)


def expand_fwd_launches(p: dict) -> list:
    """The launch of expand.cu expand_fwd, after the binding's checks (ValueError)."""
    check_expand_args(p)
    ctype = _ctype(p["dtype"])
    vec = vec_width(_DTYPE_CODES[p["dtype"]])
    ok = (p["channels"] % vec == 0 and _aligned(p["key_tokens"]) and _aligned(p["frames"])
          and p["key_stride_b"] % vec == 0 and p["key_stride_n"] % vec == 0
          and (p["num_groups"] == 0 or (_aligned(p["residual_tokens"]) and p["res_stride_b"] % vec == 0
                                        and p["res_stride_g"] % vec == 0)))
    v = vec if ok else 1
    elems = p["batch"] * p["num_patches"] * p["channels"]  # of the key tokens
    return _checked([(f"vtok::cuda::expand_fwd_kernel<{ctype}, {v}>", expand_fwd_grid(elems // v, p["num_groups"]),
                      (pack(EXPAND_PARAMS, p),))])


def expand_bwd_launches(p: dict) -> list:
    """The launches of expand.cu expand_bwd, after its checks (ValueError); no CuPy needed."""
    check_expand_args(p)
    check_expand_bwd_launch(p)
    ctype = _ctype(p["dtype"])
    vec = vec_width(_DTYPE_CODES[p["dtype"]])
    ok = (p["channels"] % vec == 0 and _aligned(p["grad_frames"]) and _aligned(p["grad_key_tokens"])
          and (p["num_groups"] == 0 or _aligned(p["grad_residual_tokens"])))
    v = vec if ok else 1
    launches = [(f"vtok::cuda::expand_grad_keys_kernel<{ctype}, {v}>",
                 (_flat_blocks(p["batch"] * p["num_patches"] * p["channels"] // v),), (pack(EXPAND_BWD_PARAMS, p),))]
    if p["num_groups"] > 0:
        # expand.cu: the group sum is the encode forward's reduction in kGroupSum mode.
        n, c, t = p["num_patches"], p["channels"], p["num_frames"]
        fields = dict(x=p["grad_frames"], x_stride_n=c, x_stride_t=n * c, x_stride_b=t * n * c,
                      batch=p["batch"], num_frames=t, num_patches=n, channels=c, dtype=p["dtype"],
                      key_index=p["key_index"], frames_per_token=p["frames_per_token"],
                      num_heads=1, num_key_tokens=0, num_groups=p["num_groups"],
                      sequence=p["grad_residual_tokens"])
        lanes, k, seg_vecs, segments = plan_segments(c, v, False, 1)
        launches.append((residual_fwd_kernel(ctype, v, GROUP_SUM),
                         (segments, p["num_groups"], p["batch"]),
                         (pack(ENCODE_PARAMS, fields), _row_plan(lanes, k, seg_vecs, segments))))
    return _checked(launches)


# ------------------------------------------------------------------ the loader

def unavailable_reason() -> Optional[str]:
    """None when CuPy and its NVRTC load, else why not and how to get them."""
    try:
        import cupy  # noqa: F401
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        return (f"CuPy with NVRTC is not usable ({type(exc).__name__}: {exc}); "
                "pip install cupy-cuda12x (or cupy-cuda13x to match the driver)")
    try:
        source_dirs()
    except FileNotFoundError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    include, cuda = source_dirs()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(
            code=PROGRAM_SOURCE,
            options=("-std=c++17", f"-I{include}", f"-I{cuda}"),
            name_expressions=kernel_names(),
        )
        module.compile()
    return module


class NvrtcLoader:
    """Runs the launchers of csrc/cuda/*.cu with kernels NVRTC compiled from the same text."""

    name = "cupy-nvrtc"

    def _launch(self, device_index: int, stream: int, kernel: str, grid, args) -> None:
        # Every launch of an op passes the op's params first: the first launch checks them all.
        check_pointers(args[0])
        import cupy

        function = _module(device_index).get_function(kernel)
        with cupy.cuda.Device(device_index), cupy.cuda.ExternalStream(stream, device_index):
            function(tuple(int(g) for g in grid), (THREADS,), args)

    def _run(self, device_index: int, stream: int, launches: list) -> None:
        # The launch list, and with it every check but the null-pointer ones, is complete before
        # the first launch.
        for kernel, grid, args in launches:
            self._launch(device_index, stream, kernel, grid, args)

    def encode_fwd(self, p: dict, stream: int, device_index: int, design: str = "tiles") -> None:
        self._run(device_index, stream, encode_fwd_launches(p, design))

    def encode_bwd(self, bp: dict, stream: int, device_index: int) -> None:
        self._run(device_index, stream, encode_bwd_launches(bp))

    def expand_fwd(self, p: dict, stream: int, device_index: int) -> None:
        self._run(device_index, stream, expand_fwd_launches(p))

    def expand_bwd(self, p: dict, stream: int, device_index: int) -> None:
        self._run(device_index, stream, expand_bwd_launches(p))


def compile_ptx(arch: str = "compute_90a", names: Optional[list[str]] = None) -> tuple[bytes, dict]:
    """Compiles the kernels with NVRTC alone (no GPU needed): (PTX or cubin, {name expr: lowered name})."""
    from cupy.cuda import nvrtc

    include, cuda = source_dirs()
    names = kernel_names() if names is None else names
    prog = nvrtc.createProgram(PROGRAM_SOURCE, "vtok_kernels.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(nvrtc_options(arch)))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed for {arch}: {exc}\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return binary, lowered
