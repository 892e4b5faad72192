"""The CUDA kernels compiled at run time by NVRTC through CuPy, from the same ``csrc/cuda``
sources the extension compiles with nvcc.

Used by the ``cuda`` backend when ``vtok_kernels._C`` was built without nvcc. The params structs
cross as NumPy structured scalars whose layout (``np.dtype(..., align=True)``, i.e. the C
layout) matches ``csrc/include/vtok/params.h``; ``tests/test_cuda_backend.py`` checks it
against ``offsetof`` / ``sizeof``. The launch plan (vector width, row plan, grids) mirrors
``csrc/cuda/*.cu`` line for line.
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
MEAN, ATTN, GROUP_SUM = 0, 1, 2
THREADS = 256
WARPS = THREADS // 32
LANE_ELEMS = 24
MAX_HEAD_DIM = 32 * LANE_ELEMS


def vec_width(dtype: str) -> int:
    return 16 // _ELEMENT_SIZE[dtype]


def kernel_names() -> list[str]:
    """Every template instantiation the launchers use, as NVRTC name expressions."""
    names = []
    for dtype, ctype in _TYPES.items():
        for v in (vec_width(dtype), 1):
            for mode in (MEAN, ATTN, GROUP_SUM):
                names.append(f"vtok::cuda::residual_fwd_kernel<{ctype}, {v}, {mode}>")
            names.append(f"vtok::cuda::key_tokens_kernel<{ctype}, {v}>")
            for attn in ("false", "true"):
                names.append(f"vtok::cuda::encode_bwd_kernel<{ctype}, {v}, {attn}>")
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
                     ("num_segments", _I32)], align=True)

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


def plan_rows(seg_vecs: int, num_segments: int, vec: int) -> tuple[int, int, int, int]:
    """(lanes, vecs_per_lane, seg_vecs, num_segments): common.cuh plan_rows."""
    max_k = max_vecs_per_lane(vec)
    best, lanes_k = -1, (0, 0)
    for lanes in (32, 16, 8, 4, 2, 1):
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


def _aligned(ptr: int) -> bool:
    return ptr % 16 == 0


def encode_vector_width(p: dict, grad_sequence: int = 0, grad_x: int = 0) -> int:
    """encode.cu encode_vector_width."""
    vec = vec_width(_DTYPE_CODES[p["dtype"]])
    attn = p["pool"] == ATTN
    ok = (p["channels"] % vec == 0 and (not attn or (p["channels"] // p["num_heads"]) % vec == 0)
          and _aligned(p["x"]) and _aligned(p["sequence"]) and p["x_stride_t"] % vec == 0
          and p["x_stride_n"] % vec == 0 and (p["cu_frames"] != 0 or p["x_stride_b"] % vec == 0))
    if grad_sequence:
        ok = ok and _aligned(grad_sequence)
    if grad_x:
        ok = ok and _aligned(grad_x)
    return vec if ok else 1


def encode_plan(p: dict, backward: bool = False, grad_sequence: int = 0, grad_x: int = 0):
    """(vec, lanes, vecs_per_lane, seg_vecs, num_segments), as the extension's cuda_encode_plan."""
    vec = encode_vector_width(p, grad_sequence, grad_x) if backward else encode_vector_width(p)
    plan = plan_segments(p["channels"], vec, p["pool"] == ATTN, p["num_heads"])
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


def _flat_blocks(work: int) -> int:
    return max(1, min(-(-work // THREADS), 4096))


def _flat_blocks_per_video(work: int, batch: int) -> int:
    return max(1, min(-(-work // THREADS), -(-4096 // batch)))


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
        import cupy

        function = _module(device_index).get_function(kernel)
        with cupy.cuda.Device(device_index), cupy.cuda.ExternalStream(stream, device_index):
            function(tuple(int(g) for g in grid), (THREADS,), args)

    @staticmethod
    def _ctype(dtype_code: int) -> str:
        return _TYPES[_DTYPE_CODES[dtype_code]]

    def encode_fwd(self, p: dict, stream: int, device_index: int) -> None:
        vec, lanes, k, seg_vecs, segments = encode_plan(p)
        if lanes == 0:
            raise ValueError(f"vtok cuda: attention heads wider than {MAX_HEAD_DIM} channels are not supported")
        ctype = self._ctype(p["dtype"])
        params = pack(ENCODE_PARAMS, p)
        plan = pack(ROW_PLAN, dict(lanes=lanes, vecs_per_lane=k, seg_vecs=seg_vecs, num_segments=segments))
        groups = num_groups(p["num_frames"], p["frames_per_token"]) if p["cu_frames"] else p["num_groups"]
        if p["num_key_tokens"] > 0:
            grid = (_flat_blocks_per_video(p["num_key_tokens"] * p["channels"] // vec, p["batch"]), p["batch"])
            self._launch(device_index, stream, f"vtok::cuda::key_tokens_kernel<{ctype}, {vec}>", grid, (params,))
        if groups > 0:
            mode = ATTN if p["pool"] == ATTN else MEAN
            self._launch(device_index, stream, f"vtok::cuda::residual_fwd_kernel<{ctype}, {vec}, {mode}>",
                         (segments, groups, p["batch"]), (params, plan))

    def encode_bwd(self, bp: dict, stream: int, device_index: int) -> None:
        p = bp["fwd"]
        vec, lanes, k, seg_vecs, segments = encode_plan(p, True, bp["grad_sequence"], bp["grad_x"])
        if lanes == 0:
            raise ValueError(f"vtok cuda: attention heads wider than {MAX_HEAD_DIM} channels are not supported")
        ctype = self._ctype(p["dtype"])
        params = pack(ENCODE_BWD_PARAMS, bp)
        plan = pack(ROW_PLAN, dict(lanes=lanes, vecs_per_lane=k, seg_vecs=seg_vecs, num_segments=segments))
        groups = num_groups(p["num_frames"], p["frames_per_token"]) if p["cu_frames"] else p["num_groups"]
        rows = THREADS // lanes
        tiles = -(-p["num_patches"] // rows)
        grid = (segments, tiles, p["batch"])
        if p["pool"] == ATTN:
            if groups > 0:
                self._launch(device_index, stream, f"vtok::cuda::attn_delta_kernel<{ctype}>",
                             (groups, p["batch"]), (params,))
            self._launch(device_index, stream, f"vtok::cuda::encode_bwd_kernel<{ctype}, {vec}, true>", grid,
                         (params, plan))
            self._launch(device_index, stream, f"vtok::cuda::grad_query_reduce_kernel<{THREADS}>",
                         (-(-p["channels"] // THREADS),), (params, np.int64(p["batch"] * tiles)))
        else:
            self._launch(device_index, stream, f"vtok::cuda::encode_bwd_kernel<{ctype}, {vec}, false>", grid,
                         (params, plan))

    def expand_fwd(self, p: dict, stream: int, device_index: int) -> None:
        ctype = self._ctype(p["dtype"])
        vec = vec_width(_DTYPE_CODES[p["dtype"]])
        ok = (p["channels"] % vec == 0 and _aligned(p["key_tokens"]) and _aligned(p["frames"])
              and p["key_stride_b"] % vec == 0 and p["key_stride_n"] % vec == 0
              and (p["num_groups"] == 0 or (_aligned(p["residual_tokens"]) and p["res_stride_b"] % vec == 0
                                            and p["res_stride_g"] % vec == 0)))
        v = vec if ok else 1
        rows = p["batch"] * p["num_frames"] * p["num_patches"]
        self._launch(device_index, stream, f"vtok::cuda::expand_fwd_kernel<{ctype}, {v}>",
                     (_flat_blocks(rows * p["channels"] // v),), (pack(EXPAND_PARAMS, p),))

    def expand_bwd(self, p: dict, stream: int, device_index: int) -> None:
        ctype = self._ctype(p["dtype"])
        vec = vec_width(_DTYPE_CODES[p["dtype"]])
        ok = (p["channels"] % vec == 0 and _aligned(p["grad_frames"]) and _aligned(p["grad_key_tokens"])
              and (p["num_groups"] == 0 or _aligned(p["grad_residual_tokens"])))
        v = vec if ok else 1
        self._launch(device_index, stream, f"vtok::cuda::expand_grad_keys_kernel<{ctype}, {v}>",
                     (_flat_blocks(p["batch"] * p["num_patches"] * p["channels"] // v),),
                     (pack(EXPAND_BWD_PARAMS, p),))
        if p["num_groups"] > 0:
            # expand.cu: the group sum is the encode forward's reduction in kGroupSum mode.
            n, c, t = p["num_patches"], p["channels"], p["num_frames"]
            fields = dict(x=p["grad_frames"], x_stride_n=c, x_stride_t=n * c, x_stride_b=t * n * c,
                          batch=p["batch"], num_frames=t, num_patches=n, channels=c, dtype=p["dtype"],
                          key_index=p["key_index"], frames_per_token=p["frames_per_token"],
                          num_heads=1, num_key_tokens=0, num_groups=p["num_groups"],
                          sequence=p["grad_residual_tokens"])
            lanes, k, seg_vecs, segments = plan_segments(c, v, False, 1)
            plan = pack(ROW_PLAN, dict(lanes=lanes, vecs_per_lane=k, seg_vecs=seg_vecs, num_segments=segments))
            self._launch(device_index, stream, f"vtok::cuda::residual_fwd_kernel<{ctype}, {v}, {GROUP_SUM}>",
                         (segments, p["num_groups"], p["batch"]), (pack(ENCODE_PARAMS, fields), plan))


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
