"""Launches the CUDA kernels cannot make: both loaders of the cuda backend refuse them with the
same ValueError, before anything reaches a device.

The extension checks in python/cuda_bindings.cpp and in its launchers (csrc/cuda/encode.cu,
expand.cu); the CuPy loader mirrors those checks in ``cuda_nvrtc``. Each case below is refused by
the CuPy loader without CuPy or a GPU, and, where the extension is built with CUDA, by the
extension with the same message (its checks all run on the host, before the first launch).
Sizes past the limits cost nothing: the params are plain integers, and the end-to-end cases use
expanded (stride 0) views."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from vtok_kernels.backends import cuda_nvrtc

# A SigLIP-like batch: bf16, 729 patches x 1152 channels, attn pooling with 8 heads of 144.
B, T, N, C, HEADS = 8, 16, 729, 1152, 8


def _encode_fields(**overrides) -> dict:
    """Forward params; the forward's workspace is as large as the plan asks (none where the
    plan refuses the launch) unless overrides say otherwise."""
    fields = dict(x=4096, x_stride_b=T * N * C, x_stride_t=N * C, x_stride_n=C, batch=B, num_frames=T,
                  num_patches=N, channels=C, dtype=2, key_index=64, cu_frames=0, cu_tokens=0, pool=1,
                  query=512, num_heads=HEADS, frames_per_token=1, spatial=False, grid_h=0, grid_w=0,
                  out_h=0, out_w=0, num_key_tokens=N, num_groups=T - 1, sequence=8192, lse=1024)
    fields.update(overrides)
    if "workspace_elems" not in overrides:
        try:
            elems = cuda_nvrtc.encode_fwd_workspace_elems(fields)
        except ValueError:
            elems = 0
        fields.update(workspace=fields.get("workspace", 1 << 20) if elems else 0, workspace_elems=elems)
    return fields


def _encode_bwd_fields(fwd=None, **overrides) -> dict:
    fwd = _encode_fields() if fwd is None else fwd
    lse_elems = 0 if fwd["cu_frames"] else fwd["batch"] * fwd["num_groups"] * fwd["num_heads"]
    elems = cuda_nvrtc.encode_bwd_workspace_elems(fwd["batch"], fwd["num_patches"], fwd["channels"], lse_elems)
    fields = dict(fwd=fwd, grad_sequence=16384, grad_x=32768, grad_query=640, workspace=768, workspace_elems=elems)
    fields.update(overrides)
    return fields


def _expand_fields(**overrides) -> dict:
    fields = dict(key_tokens=4096, key_stride_b=N * C, key_stride_n=C, residual_tokens=8192, res_stride_b=(T - 1) * C,
                  res_stride_g=C, batch=B, num_frames=T, num_patches=N, channels=C, num_groups=T - 1,
                  frames_per_token=1, key_index=64, dtype=2, frames=16384)
    fields.update(overrides)
    return fields


def _expand_bwd_fields(**overrides) -> dict:
    fields = dict(grad_frames=4096, batch=B, num_frames=T, num_patches=N, channels=C, num_groups=T - 1,
                  frames_per_token=1, key_index=64, dtype=2, grad_key_tokens=8192, grad_residual_tokens=16384)
    fields.update(overrides)
    return fields


# key_tokens_kernel's 32-bit index: S * C = 2^31 exactly (1024 channels) is one past it.
WIDE = dict(channels=1024, x_stride_n=1024, num_patches=2**21, num_key_tokens=2**21)
WIDE_N = 2**31 // C + 1
# The mean backward of 256 float32 channels runs 32 lanes per row, 8 rows per block: one patch
# more than 65535 tiles hold.
TILED = dict(dtype=0, pool=0, num_heads=1, channels=256, x_stride_n=256, x_stride_t=N * 256, x_stride_b=T * N * 256,
             query=0, lse=0)
MANY_TILES_N = 8 * 65535 + 1

_BWD_NEEDED = _encode_bwd_fields()["workspace_elems"]
_FWD_NEEDED = _encode_fields()["workspace_elems"]
_VARLEN = dict(cu_frames=128, cu_tokens=256, num_groups=0)
_VARLEN_NEEDED = cuda_nvrtc.dq_partial_rows(B, N) * C

# (id, op, fields, where the CuPy loader refuses it, the extension's message after "vtok cuda: ").
# "plan": the launch plan refuses it (no CuPy call); "launch": the null-pointer checks at the
# device launch, which the plan leaves out so that it can be recorded from meta tensors.
CASES = [
    # python/cuda_bindings.cpp check_dtype and params_check.h encode_params_error
    ("encode-dtype-float64", "encode_fwd", _encode_fields(dtype=3), "plan",
     "dtype must be float32, float16 or bfloat16 (float64 runs on the cpu and torch backends)"),
    ("encode-no-batch", "encode_fwd", _encode_fields(batch=0), "plan",
     "batch, num_frames, num_patches and channels must be >= 1"),
    ("encode-fpt-0", "encode_fwd", _encode_fields(frames_per_token=0), "plan", "frames_per_token must be >= 1"),
    ("encode-heads-7", "encode_fwd", _encode_fields(num_heads=7), "plan", "num_heads must be >= 1 and divide channels"),
    ("encode-cu-frames-only", "encode_fwd", _encode_fields(cu_frames=128), "plan",
     "cu_frames and cu_tokens must both be set (varlen) or both be null (batched)"),
    ("encode-groups-14", "encode_fwd", _encode_fields(num_groups=14), "plan",
     "num_groups must be ceil((num_frames - 1) / frames_per_token)"),
    ("encode-mean-8-heads", "encode_fwd", _encode_fields(pool=0), "plan", "mean pooling takes num_heads == 1"),
    ("encode-pool-2", "encode_fwd", _encode_fields(pool=2), "plan", "pool must be mean or attn"),
    ("encode-grid-not-n", "encode_fwd", _encode_fields(spatial=True, grid_h=27, grid_w=26, out_h=2, out_w=2,
                                                      num_key_tokens=4), "plan",
     "grid_h * grid_w must equal num_patches"),
    ("encode-spatial-too-big", "encode_fwd", _encode_fields(spatial=True, grid_h=27, grid_w=27, out_h=28, out_w=2,
                                                           num_key_tokens=56), "plan",
     "spatial (out_h, out_w) must fit in the grid"),
    ("encode-spatial-tokens", "encode_fwd", _encode_fields(spatial=True, grid_h=27, grid_w=27, out_h=2, out_w=2,
                                                          num_key_tokens=5), "plan",
     "num_key_tokens must be out_h * out_w"),
    ("encode-key-tokens", "encode_fwd", _encode_fields(num_key_tokens=5), "plan",
     "num_key_tokens must equal num_patches without spatial"),
    ("encode-head-1024", "encode_fwd", _encode_fields(channels=1024, num_heads=1), "plan",
     "attention heads wider than 768 channels are not supported"),
    # csrc/cuda/encode.cu check_encode: grid axes and the 32-bit key token index
    ("encode-65536-videos", "encode_fwd", _encode_fields(batch=65536), "plan", "at most 65535 videos per call"),
    ("encode-key-tokens-2^31", "encode_fwd", _encode_fields(**WIDE), "plan",
     "key tokens of more than 2^31 elements per video"),
    ("encode-spatial-key-tokens-2^31", "encode_fwd",
     _encode_fields(num_patches=WIDE_N * 2, grid_h=WIDE_N, grid_w=2, spatial=True, out_h=WIDE_N, out_w=1,
                    num_key_tokens=WIDE_N), "plan",
     "key tokens of more than 2^31 elements per video"),
    ("encode-65536-groups", "encode_fwd", _encode_fields(num_frames=65537, num_groups=65536), "plan",
     "at most 65535 residual tokens per video"),
    ("encode-2^31-frames", "encode_fwd",
     _encode_fields(num_frames=2**31, num_groups=65535, frames_per_token=32769), "plan",
     "fewer than 2^31 frames per video"),
    ("encode-varlen-2^31-frames", "encode_fwd",
     _encode_fields(num_frames=2**31, frames_per_token=2**31 // 65535 + 1, **_VARLEN), "plan",
     "fewer than 2^31 frames per video"),
    # csrc/cuda/encode.cu encode_fwd: the forward's workspace (the partial rows of the tiles)
    ("encode-workspace-short", "encode_fwd", _encode_fields(workspace_elems=_FWD_NEEDED - 1), "plan",
     "the forward needs a workspace of encode_fwd_workspace_elems floats"),
    ("encode-mean-workspace-short", "encode_fwd",
     _encode_fields(pool=0, num_heads=1, query=0, lse=0,
                    workspace_elems=_encode_fields(pool=0, num_heads=1, query=0, lse=0)["workspace_elems"] - 1),
     "plan", "the forward needs a workspace of encode_fwd_workspace_elems floats"),
    ("encode-varlen-workspace-short", "encode_fwd",
     _encode_fields(workspace_elems=_encode_fields(**_VARLEN)["workspace_elems"] - 1, **_VARLEN), "plan",
     "the forward needs a workspace of encode_fwd_workspace_elems floats"),
    ("encode-varlen-65536-groups", "encode_fwd", _encode_fields(num_frames=65537, **_VARLEN), "plan",
     "at most 65535 residual tokens per video"),
    ("encode-bwd-65536-videos", "encode_bwd", _encode_bwd_fields(_encode_fields(batch=65536), workspace_elems=2**40),
     "plan", "at most 65535 videos per call"),
    # csrc/cuda/encode.cu encode_bwd: patch tiles on grid axis y, the workspace
    ("encode-bwd-65536-tiles", "encode_bwd",
     _encode_bwd_fields(_encode_fields(num_patches=MANY_TILES_N, num_key_tokens=MANY_TILES_N, **TILED)), "plan",
     "too many patches per frame"),
    ("encode-bwd-workspace-short", "encode_bwd", _encode_bwd_fields(workspace_elems=_BWD_NEEDED - 1), "plan",
     "the attn backward needs grad_query and a workspace of encode_bwd_workspace_elems floats"),
    ("encode-bwd-varlen-workspace-short", "encode_bwd",
     _encode_bwd_fields(_encode_fields(**_VARLEN), workspace_elems=_VARLEN_NEEDED - 1), "plan",
     "the attn backward needs grad_query and a workspace of encode_bwd_workspace_elems floats"),
    # python/cuda_bindings.cpp check_expand_sizes, expand.cu expand_bwd
    ("expand-dtype-float64", "expand_fwd", _expand_fields(dtype=3), "plan",
     "dtype must be float32, float16 or bfloat16 (float64 runs on the cpu and torch backends)"),
    ("expand-no-patches", "expand_fwd", _expand_fields(num_patches=0), "plan",
     "batch, num_frames, num_patches and channels must be >= 1"),
    ("expand-fpt-0", "expand_fwd", _expand_fields(frames_per_token=0), "plan", "frames_per_token must be >= 1"),
    ("expand-groups-14", "expand_fwd", _expand_fields(num_groups=14), "plan",
     "num_groups must be ceil((num_frames - 1) / frames_per_token)"),
    ("expand-bwd-dtype-5", "expand_bwd", _expand_bwd_fields(dtype=5), "plan",
     "dtype must be float32, float16 or bfloat16 (float64 runs on the cpu and torch backends)"),
    ("expand-bwd-groups-7", "expand_bwd", _expand_bwd_fields(num_groups=7), "plan",
     "num_groups must be ceil((num_frames - 1) / frames_per_token)"),
    ("expand-bwd-65536-videos", "expand_bwd", _expand_bwd_fields(batch=65536), "plan",
     "at most 65535 videos and 65535 residual tokens per call"),
    ("expand-bwd-65536-groups", "expand_bwd", _expand_bwd_fields(num_frames=65537, num_groups=65536), "plan",
     "at most 65535 videos and 65535 residual tokens per call"),
    # null pointers: params_check.h and the bindings
    ("encode-no-x", "encode_fwd", _encode_fields(x=0), "launch",
     "x, sequence and key_index must be set (got a null pointer)"),
    ("encode-no-query", "encode_fwd", _encode_fields(query=0), "launch", "attn pooling needs query"),
    ("encode-no-lse", "encode_fwd", _encode_fields(lse=0), "launch", "attn pooling needs lse"),
    ("encode-no-workspace", "encode_fwd", _encode_fields(workspace=0), "launch",
     "the forward needs a workspace of encode_fwd_workspace_elems floats"),
    ("encode-bwd-no-grad-x", "encode_bwd", _encode_bwd_fields(grad_x=0), "launch",
     "grad_sequence and grad_x must be set"),
    ("encode-bwd-no-workspace", "encode_bwd", _encode_bwd_fields(workspace=0), "launch",
     "attn backward needs grad_query and workspace (cuda_encode_bwd_workspace_elems floats)"),
    ("expand-no-residual", "expand_fwd", _expand_fields(residual_tokens=0), "launch",
     "key_tokens, residual_tokens, key_index and frames must be device pointers"),
    ("expand-bwd-no-grad-keys", "expand_bwd", _expand_bwd_fields(grad_key_tokens=0), "launch",
     "grad_frames, grad_key_tokens, grad_residual_tokens and key_index must be device pointers"),
]

PLANS = {"encode_fwd": cuda_nvrtc.encode_fwd_launches, "encode_bwd": cuda_nvrtc.encode_bwd_launches,
         "expand_fwd": cuda_nvrtc.expand_fwd_launches, "expand_bwd": cuda_nvrtc.expand_bwd_launches}


def _cuda_extension():
    from vtok_kernels import _extension

    module = _extension.get()
    if module is None or not getattr(module, "built_with_cuda", False):
        return None
    return module


@pytest.fixture
def no_cupy(monkeypatch):
    """The CuPy loader with CuPy unimportable and its compile refused, so that a check missing
    here shows as an ImportError or an AssertionError, never as a launch."""
    monkeypatch.setitem(sys.modules, "cupy", None)

    def compile_reached(device_index):
        raise AssertionError("the NVRTC module was requested: a refused launch got past the checks")

    monkeypatch.setattr(cuda_nvrtc, "_module", compile_reached)
    return cuda_nvrtc.NvrtcLoader()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_both_loaders_refuse_with_the_same_message(no_cupy, case):
    _, op, fields, where, message = case
    expected = "vtok cuda: " + message
    with pytest.raises(ValueError) as nvrtc:
        getattr(no_cupy, op)(fields, 0, 0)
    assert str(nvrtc.value) == expected
    if where == "plan":
        with pytest.raises(ValueError) as planned:
            PLANS[op](fields)
        assert str(planned.value) == expected
    else:
        # Meta tensors have null data pointers: the plan must still come out for them.
        assert PLANS[op](fields)
    module = _cuda_extension()
    if module is None:
        pytest.skip("vtok_kernels._C is not built with CUDA here: the CuPy loader's side only")
    from vtok_kernels.backends.cuda import ExtensionLoader

    with pytest.raises(ValueError) as extension:
        getattr(ExtensionLoader(module), op)(fields, 0, 0)
    assert str(extension.value) == expected


def _grids(launches) -> dict:
    """{kernel: grid}; the forward's merge of partial rows (residual_fwd_kernel in its mode 3)
    as residual_merge."""
    def name(kernel):
        family = kernel.split("<")[0].split("::")[-1]
        return "residual_merge" if family == "residual_fwd_kernel" and kernel.endswith(", 3, 0>") else family

    return {name(kernel): tuple(grid) for kernel, grid, _ in launches}


def test_the_limits_themselves_are_launched():
    """One short of each limit the plan launches, with the grid the launcher computes there:
    the refusals above are one past, not earlier."""
    # The forward: 8 heads of 144 channels, 32 rows of 8 lanes per block, ceil(729 / 32) = 23
    # tiles per frame, each block holding every group (one chunk); the merge of the tiles'
    # partial rows has the groups on axis y.
    grids = _grids(cuda_nvrtc.encode_fwd_launches(_encode_fields(batch=65535, num_frames=65536, num_groups=65535)))
    assert grids["residual_fwd_kernel"] == (23 * HEADS, 1, 65535)
    assert grids["residual_merge"] == (1, 65535, 65535)
    assert grids["key_tokens_kernel"][1] == 65535
    short = dict(WIDE, num_patches=2**21 - 1, num_key_tokens=2**21 - 1)
    assert _grids(cuda_nvrtc.encode_fwd_launches(_encode_fields(**short)))["key_tokens_kernel"] == (512, B)
    varlen = _grids(cuda_nvrtc.encode_fwd_launches(_encode_fields(num_frames=65536, **_VARLEN)))
    assert varlen["residual_fwd_kernel"] == (23 * HEADS, 1, B) and varlen["residual_merge"] == (1, 65535, B)
    frames = _encode_fields(num_frames=2**31 - 1, num_groups=65534, frames_per_token=32769)
    assert _grids(cuda_nvrtc.encode_fwd_launches(frames))["residual_merge"] == (1, 65534, B)

    tiled = _encode_fields(num_patches=8 * 65535, num_key_tokens=8 * 65535, **TILED)
    grids = _grids(cuda_nvrtc.encode_bwd_launches(_encode_bwd_fields(tiled)))
    assert grids["encode_bwd_kernel"] == (1, 65535, B)
    grids = _grids(cuda_nvrtc.encode_bwd_launches(_encode_bwd_fields(workspace_elems=_BWD_NEEDED)))
    assert grids["encode_bwd_kernel"] == (HEADS, 23, B)  # 32 rows of 8 lanes per block: ceil(729 / 32)
    assert cuda_nvrtc.encode_bwd_launches(_encode_bwd_fields(_encode_fields(**_VARLEN),
                                                             workspace_elems=_VARLEN_NEEDED))

    grids = _grids(cuda_nvrtc.expand_bwd_launches(_expand_bwd_fields(batch=65535, num_frames=65536,
                                                                     num_groups=65535)))
    assert grids["residual_fwd_kernel"][1:] == (65535, 65535)


@pytest.mark.parametrize("grid, ok", [
    ((2**31 - 1, 65535, 65535), True), ((2**31,), False), ((1, 65536), False), ((1, 1, 65536), False),
    ((0,), False), ((1, 1, 1, 1), False),
])
def test_every_grid_is_checked_against_cuda_limits(grid, ok):
    """Behind the launchers' checks: no grid CUDA would refuse reaches the driver."""
    if ok:
        cuda_nvrtc.check_grid("k", grid)
    else:
        with pytest.raises(ValueError, match=r"vtok cuda: k would launch a grid of .* CUDA allows"):
            cuda_nvrtc.check_grid("k", grid)


# ------------------------------------------------------------------ through the backend's ops

class _Recorder(cuda_nvrtc.NvrtcLoader):
    def __init__(self):
        self.launches = []

    def _launch(self, device_index, stream, kernel, grid, args):
        self.launches.append((kernel, tuple(grid)))


def _zeros(*shape, dtype=torch.float32):
    """A tensor of ``shape`` holding one element (every stride 0)."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


BACKEND_CASES = [
    ("65536-videos", lambda cuda: cuda.encode_fwd(_zeros(65536, 2, 1, 8), _zeros(65536, dtype=torch.int64), None,
                                                  "mean", 1, 1, [], []),
     "at most 65535 videos per call"),
    ("65537-frames", lambda cuda: cuda.encode_fwd(_zeros(1, 65537, 1, 8), _zeros(1, dtype=torch.int64),
                                                  torch.ones(8), "attn", 2, 1, [], []),
     "at most 65535 residual tokens per video"),
    ("expand-bwd-65536-groups", lambda cuda: cuda.expand_bwd(_zeros(1, 65537, 1, 8), _zeros(1, dtype=torch.int64),
                                                             65536, 1),
     "at most 65535 videos and 65535 residual tokens per call"),
]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=[c[0] for c in BACKEND_CASES])
def test_backend_ops_refuse_before_any_launch(monkeypatch, case):
    """The cuda backend's ops on CPU tensors too large for one launch: each loader raises the
    extension's ValueError and launches nothing."""
    from vtok_kernels.backends import cuda

    _, call, message = case
    monkeypatch.setattr(cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    recorder = _Recorder()
    loaders = [recorder]
    module = _cuda_extension()
    if module is not None:
        loaders.append(cuda.ExtensionLoader(module))
    for loader in loaders:
        monkeypatch.setattr(cuda, "_loader", lambda loader=loader: loader)
        with pytest.raises(ValueError) as refused:
            call(cuda)
        assert str(refused.value) == "vtok cuda: " + message, loader.name
    assert recorder.launches == []


# ------------------------------------------------------------------ the forward's split of a frame and its workspace

def test_forward_split_and_workspace_match_the_extension():
    """vtok/encode_split.h, as the launcher computes it and as cuda_nvrtc mirrors it."""
    module = _cuda_extension()
    if module is None:
        pytest.skip("vtok_kernels._C is not built with CUDA here")
    for tiles in (1, 2, 12, 23):
        for segments in (1, 8, 18):
            for batch in (1, 3, 8):
                for groups in (0, 1, 2, 5, 15, 64):
                    for fill in (0, 7, 792, 1056, 10**6):
                        for tile_blocks in (True, False):
                            args = (tiles, segments, batch, groups, fill, tile_blocks)
                            assert module.cuda_encode_split(*args) == cuda_nvrtc.encode_split(*args), args
    for args in ((8, 15, 12, 1152, 18, True, True), (8, 15, 12, 1152, 1, False, True), (3, 7, 1, 40, 5, True, True),
                 (8, 15, 1, 1152, 18, True, False)):
        assert module.cuda_encode_fwd_workspace_elems(*args) == cuda_nvrtc.encode_fwd_workspace_elems_for(*args)


def test_warp_split_covers_every_group_and_fills_the_device_cheaply():
    """vtok/encode_split.h warp_split: every group in exactly one chunk, splits of at least 64
    rows before fewer groups per warp, splits of at least 16 rows only short of one wave, and
    the blocks hold every warp item."""
    for rows in (1, 15, 37, 64, 256, 729, 5000):
        for segments in (1, 8, 18):
            for batch in (1, 3, 8, 64):
                for groups in (0, 1, 2, 5, 15, 64):
                    for chunk_groups in (1, 2, 4):
                        for fill in (0, 32, 4224):
                            splits, per_warp, chunks, blocks = cuda_nvrtc.warp_split(
                                rows, segments, batch, groups, chunk_groups, fill, 8)
                            case = (rows, segments, batch, groups, chunk_groups, fill)
                            if groups == 0:
                                assert (chunks, blocks) == (0, 0), case
                                continue
                            assert 1 <= per_warp <= chunk_groups and chunks == -(-groups // per_warp), case
                            assert 1 <= splits <= max(1, rows // 16), case
                            warps = batch * segments * chunks * splits
                            assert blocks == -(-warps // 8), case
                            target = -(-fill // (batch * segments))  # warps per (video, segment)
                            if splits > max(1, rows // 64):  # small splits only short of one wave
                                assert per_warp == 1 and 2 * max(1, rows // 64) * chunks < target, case
                            if per_warp < min(chunk_groups, groups):  # fewer groups only past the cheap splits
                                full = min(chunk_groups, groups)
                                assert max(1, rows // 64) * -(-groups // full) < target, case
                                assert (per_warp + 1 > chunk_groups or
                                        splits * -(-groups // (per_warp + 1)) < target), case
                            if 2 * splits * chunks < target:  # short of one wave: nothing left to split
                                assert per_warp == 1 and splits == max(1, rows // 16), case
                            else:  # not more warps than the wave needs
                                assert splits == 1 or (splits - 1) * chunks < target, case


@pytest.mark.skipif(torch.cuda.is_available(), reason="launches with made-up pointers: only where no device runs them")
@pytest.mark.parametrize("fields", [_encode_fields(), _encode_fields(pool=0, num_heads=1, query=0, lse=0),
                                    _encode_fields(**_VARLEN)], ids=["attn", "mean", "varlen"])
def test_the_planned_workspace_passes_the_extension(fields):
    """cuda_nvrtc.encode_fwd_workspace_elems floats are what the launcher asks for: one fewer
    is refused (above), these pass its checks and reach the launch, which fails here for want
    of a device."""
    module = _cuda_extension()
    if module is None:
        pytest.skip("vtok_kernels._C is not built with CUDA here")
    from vtok_kernels.backends.cuda import ExtensionLoader

    assert fields["workspace_elems"] > 0
    with pytest.raises(RuntimeError, match="launch of key_tokens_kernel failed"):
        ExtensionLoader(module).encode_fwd(fields, 0, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="launches with made-up pointers: only where no device runs them")
@pytest.mark.parametrize("pool", ["attn", "mean"])
def test_warp_split_workspace_is_what_both_loaders_ask_for(pool):
    """The warp-split forward (design "warps") splits a frame's rows otherwise than the tiles do,
    so its workspace differs: both loaders refuse one float fewer than encode_fwd_workspace_elems
    says for that design, and take that many (the extension's launch then fails for want of a
    device)."""
    mean = {} if pool == "attn" else dict(pool=0, num_heads=1, query=0, lse=0)
    fields = _encode_fields(**mean)
    elems = cuda_nvrtc.encode_fwd_workspace_elems(fields, "warps")
    assert 0 < elems != cuda_nvrtc.encode_fwd_workspace_elems(fields, "tiles")
    short = dict(fields, workspace=1 << 20, workspace_elems=elems - 1)
    message = "vtok cuda: the forward needs a workspace of encode_fwd_workspace_elems floats"
    with pytest.raises(ValueError) as refused:
        cuda_nvrtc.encode_fwd_launches(short, "warps")
    assert str(refused.value) == message
    launches = cuda_nvrtc.encode_fwd_launches(dict(short, workspace_elems=elems), "warps")
    assert [k.split("<")[0] for k, _, _ in launches] == [
        "vtok::cuda::key_tokens_kernel", "vtok::cuda::warp_pool_kernel", "vtok::cuda::residual_fwd_kernel"]
    with pytest.raises(ValueError, match="unknown forward design 'rows'"):
        cuda_nvrtc.encode_fwd_launches(fields, "rows")
    module = _cuda_extension()
    if module is None:
        return
    from vtok_kernels.backends.cuda import ExtensionLoader

    with pytest.raises(ValueError) as refused:
        ExtensionLoader(module).encode_fwd(short, 0, 0, "warps")
    assert str(refused.value) == message
    with pytest.raises(RuntimeError, match="launch of key_tokens_kernel failed"):
        ExtensionLoader(module).encode_fwd(dict(short, workspace_elems=elems), 0, 0, "warps")


# ------------------------------------------------------------------------------ the cached plan
def _random_fields(rng) -> dict:
    """Forward params of a random shape and layout: sizes that pass or fail the checks, pointers
    aligned, misaligned or null, batched or varlen."""
    channels = rng.choice([8, 24, 72, 1024, 1152, 1030])
    heads = rng.choice([1, 2, 8, 16])
    fields = dict(x=rng.choice([4096, 4096 + 2, 4096 + 8]), x_stride_b=T * N * channels,
                  x_stride_t=rng.choice([N * channels, N * channels + 1]), x_stride_n=channels,
                  batch=rng.choice([1, 8, 70000]), num_frames=rng.choice([1, 2, 16]), num_patches=N,
                  channels=channels, dtype=rng.choice([0, 1, 2, 5]), key_index=64, cu_frames=0, cu_tokens=0,
                  pool=rng.choice([0, 1]), query=rng.choice([0, 512]), num_heads=heads,
                  frames_per_token=rng.choice([1, 3]), spatial=False, grid_h=0, grid_w=0, out_h=0, out_w=0,
                  num_key_tokens=N, sequence=rng.choice([8192, 8192 + 4]), lse=1024)
    fields["num_groups"] = cuda_nvrtc.num_groups(fields["num_frames"], fields["frames_per_token"])
    if rng.random() < 0.3:
        fields.update(cu_frames=128, cu_tokens=rng.choice([0, 256]), num_groups=0, x_stride_b=0)
    return fields


def _outcome(function, *args):
    try:
        return function(*args)
    except ValueError as exc:
        return f"ValueError: {exc}"


@pytest.mark.parametrize("design", cuda_nvrtc.FWD_DESIGNS)
def test_the_cached_plan_is_the_plan(design):
    """encode_fwd_workspace_elems computes once per plan_key: every shape, layout and refusal
    gets what the uncached plan gives, pointers standing for their kind."""
    import random

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    seen = set()
    for _ in range(400):
        fields = _random_fields(rng)
        seen.add(_outcome(cuda_nvrtc._encode_fwd_workspace_elems, fields, design) == 0)
        assert _outcome(cuda_nvrtc.encode_fwd_workspace_elems, fields, design) == \
            _outcome(cuda_nvrtc._encode_fwd_workspace_elems, fields, design), (seed, fields)
    assert seen == {True, False}  # some launches need no workspace (or are refused), some do
    # only sizes, options and each pointer's kind make the key
    a = _encode_fields()
    b = dict(a, x=a["x"] + 4096, sequence=a["sequence"] + 16 * 7)
    assert cuda_nvrtc.plan_key(a) == cuda_nvrtc.plan_key(b)
    assert cuda_nvrtc.plan_key(a) != cuda_nvrtc.plan_key(dict(a, x=a["x"] + 2))
    assert cuda_nvrtc.plan_key(a) != cuda_nvrtc.plan_key(dict(a, cu_frames=0, lse=0))


def test_a_misaligned_view_is_not_served_a_cached_aligned_plan():
    aligned = _encode_fields()
    misaligned = dict(aligned, x=aligned["x"] + 2)
    first = cuda_nvrtc.encode_fwd_workspace_elems(aligned)
    assert first > 0  # the 16-byte path splits a frame's rows over blocks
    assert cuda_nvrtc.encode_fwd_workspace_elems(misaligned) == 0  # the scalar path needs none
    assert cuda_nvrtc.encode_fwd_workspace_elems(aligned) == first


def test_the_cached_plan_follows_the_sms_it_fills(monkeypatch):
    """FILL_SMS sizes the grids (tests shrink it to reach small splits): part of the key."""
    fields = _encode_fields(num_patches=600, num_key_tokens=600)
    full = cuda_nvrtc.encode_fwd_workspace_elems(fields, "warps")
    monkeypatch.setattr(cuda_nvrtc, "FILL_SMS", 1)
    small = cuda_nvrtc.encode_fwd_workspace_elems(fields, "warps")
    assert small == cuda_nvrtc._encode_fwd_workspace_elems(fields, "warps") and small < full


def test_a_refused_launch_is_refused_every_time():
    fields = dict(_encode_fields(), batch=70000)
    for _ in range(2):
        with pytest.raises(ValueError, match="at most 65535 videos per call"):
            cuda_nvrtc.encode_fwd_workspace_elems(fields)


# ------------------------------------------------------------------------------ the loader per device
def test_the_loader_is_chosen_once_per_device(monkeypatch):
    from vtok_kernels.backends import cuda

    asked = []
    monkeypatch.setattr(cuda, "_index_loader", {})
    monkeypatch.setattr(cuda, "_device_loader", {})
    monkeypatch.setattr(cuda, "_loaders", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: asked.append(index) or (9, 0))
    monkeypatch.setattr(cuda, "_default_loader_name", lambda: "cupy-nvrtc")
    monkeypatch.setattr(cuda, "loader_reason", lambda name: None)
    monkeypatch.setattr(cuda, "get_loader", lambda name: object())
    monkeypatch.setattr(cuda.BACKEND, "loader", cuda.BACKEND.loader)  # what info() says, restored
    current = [0]
    first = cuda._loader()
    assert cuda._loader() is first and asked == [0]
    current[0] = 1
    assert cuda._loader() is first and asked == [0, 1]  # one loader object per loader, for every device


def test_the_stream_is_the_current_raw_stream(monkeypatch):
    from vtok_kernels.backends import cuda

    x = torch.empty(0)
    monkeypatch.setattr(cuda, "_current_raw_stream", lambda index: 1000 + (index or 0))
    assert cuda._stream(x) == 1000
    monkeypatch.setattr(cuda, "_current_raw_stream", None)

    class Stream:
        cuda_stream = 77

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    assert cuda._stream(x) == 77


@pytest.mark.gpu
def test_the_raw_stream_is_the_current_stream():
    from vtok_kernels.backends import cuda

    x = torch.empty(1, device="cuda")
    assert cuda._current_raw_stream is not None
    side = torch.cuda.Stream()
    assert cuda._stream(x) == torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.stream(side):
        assert cuda._stream(x) == side.cuda_stream != torch.cuda.default_stream(x.device).cuda_stream
