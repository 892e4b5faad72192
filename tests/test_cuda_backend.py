"""The cuda backend: what the CPU can prove (the params layout the CuPy loader passes, the launch
plan both loaders share, the binding's argument checks, that the sources compile with nvcc and
NVRTC, availability messages), and on a GPU (marked ``gpu``) parity at realistic and odd shapes,
CUDA-graph replay, deterministic backward and bit-equal loaders."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vtok_kernels as vk
from vtok_kernels import backends, reference
from vtok_kernels.backends import cuda_nvrtc
from tests.utils import LOW_PRECISION, assert_close, assert_one_patch_query_grad_vanishes, features

ROOT = Path(__file__).resolve().parents[1]
DTYPE_ID = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731


def _cuda_extension():
    from vtok_kernels import _extension

    module = _extension.get()
    if module is None or not getattr(module, "built_with_cuda", False):
        pytest.skip("vtok_kernels._C is not built with CUDA here")
    return module


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("nvcc not found")
    return nvcc


# ------------------------------------------------------------------ CPU: layout and plan

def _cpp_layout() -> dict:
    """sizeof / offsetof of every params struct, from a C++ program compiled against params.h."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    lines = ['#include <cstddef>', '#include <cstdio>', '#include "vtok/params.h"', 'int main() {']
    for struct, dtype in cuda_nvrtc.STRUCTS.items():
        lines.append(f'  std::printf("{struct} sizeof %zu\\n", sizeof(vtok::{struct}));')
        for field in dtype.names:
            lines.append(f'  std::printf("{struct} {field} %zu\\n", offsetof(vtok::{struct}, {field}));')
    lines += ['  return 0;', '}']
    return "\n".join(lines), compiler


def test_params_layout_matches_the_cpp_structs(tmp_path):
    source, compiler = _cpp_layout()
    (tmp_path / "layout.cpp").write_text(source)
    subprocess.run([compiler, "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", "layout.cpp", "-o", "layout"],
                   cwd=tmp_path, check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout
    cpp = {}
    for line in out.splitlines():
        struct, field, value = line.split()
        cpp[(struct, field)] = int(value)
    for struct, dtype in cuda_nvrtc.STRUCTS.items():
        size, offsets = cuda_nvrtc.layout(dtype)
        assert size == cpp[(struct, "sizeof")], struct
        for field, offset in offsets.items():
            assert offset == cpp[(struct, field)], f"{struct}.{field}"
        assert len(offsets) + 1 == sum(1 for key in cpp if key[0] == struct), f"{struct}: fields missing"


def test_params_layout_matches_the_extension():
    module = _cuda_extension()
    for struct, (size, offsets) in module.cuda_params_layout().items():
        assert cuda_nvrtc.layout(cuda_nvrtc.STRUCTS[struct]) == (size, dict(offsets)), struct


def test_pack_writes_fields_at_their_offsets():
    p = cuda_nvrtc.pack(cuda_nvrtc.ENCODE_BWD_PARAMS,
                        dict(fwd=dict(channels=1152, spatial=True, pool=1, lse=0xdeadbeef00), workspace_elems=7))
    raw = p.tobytes()
    fwd_offset = cuda_nvrtc.ENCODE_BWD_PARAMS.fields["fwd"][1]
    enc = cuda_nvrtc.ENCODE_PARAMS.fields

    def at(offset, size):
        return int.from_bytes(raw[offset:offset + size], "little")

    assert at(fwd_offset + enc["channels"][1], 8) == 1152
    assert at(fwd_offset + enc["spatial"][1], 1) == 1
    assert at(fwd_offset + enc["pool"][1], 4) == 1
    assert at(fwd_offset + enc["lse"][1], 8) == 0xdeadbeef00
    assert at(cuda_nvrtc.ENCODE_BWD_PARAMS.fields["workspace_elems"][1], 8) == 7


@pytest.mark.parametrize("vec", [1, 4, 8])
def test_row_plan_covers_each_segment(vec):
    max_k = cuda_nvrtc.max_vecs_per_lane(vec)
    for seg_vecs in range(1, 32 * max_k + 1):
        lanes, k, seg, _ = cuda_nvrtc.plan_rows(seg_vecs, 1, vec)
        assert lanes in (1, 2, 4, 8, 16, 32) and seg == seg_vecs
        assert 1 <= k <= max_k and lanes * k >= seg_vecs > lanes * (k - 1)
    assert cuda_nvrtc.plan_rows(32 * max_k + 1, 1, vec)[0] == 0


def test_wide_float32_heads_take_the_scalar_path():
    fields = _fake_encode_fields(C=768, heads=1, dtype=0)
    assert cuda_nvrtc.encode_plan(fields) == (1, 32, 24, 768, 1)
    # The forward's 16-byte float32 rows hold 32 lanes x 3 vectors per head (384 channels), the
    # backward's 32 x 4.
    wide = _fake_encode_fields(C=1024, heads=2, dtype=0)
    assert cuda_nvrtc.encode_plan(wide)[0] == 1 and cuda_nvrtc.encode_plan(wide, True, 4096, 8192)[0] == 4
    assert cuda_nvrtc.encode_plan(_fake_encode_fields(C=1024, heads=4, dtype=0))[0] == 4


def _fake_encode_fields(C=1152, heads=8, pool=1, dtype=2, x=4096, seq=8192, stride_n=None, varlen=False):
    stride_n = C if stride_n is None else stride_n
    return dict(x=x, x_stride_b=16 * 729 * stride_n, x_stride_t=729 * stride_n, x_stride_n=stride_n,
                batch=8, num_frames=16, num_patches=729, channels=C, dtype=dtype, key_index=64,
                cu_frames=128 if varlen else 0, cu_tokens=256 if varlen else 0, pool=pool, query=512,
                num_heads=heads, frames_per_token=1, spatial=False, num_key_tokens=729,
                num_groups=0 if varlen else 15, sequence=seq, lse=1024)


PLAN_CASES = [
    dict(), dict(pool=0, heads=1), dict(C=1024, heads=16, dtype=0), dict(C=12, heads=3, dtype=1),
    dict(x=4098), dict(stride_n=1160), dict(C=100, heads=1, pool=0, dtype=0), dict(varlen=True),
    dict(C=640, heads=1, dtype=0), dict(C=768, heads=1, dtype=2),
]


def test_launch_plan_matches_the_extension():
    module = _cuda_extension()
    for case in PLAN_CASES:
        fields = _fake_encode_fields(**case)
        params = module.EncodeParams()
        for name, value in fields.items():
            value = module.DType(value) if name == "dtype" else module.Pool(value) if name == "pool" else value
            setattr(params, name, value)
        for backward, grads in ((False, (0, 0)), (True, (4096, 8200))):
            assert module.cuda_encode_plan(params, backward, *grads) == cuda_nvrtc.encode_plan(fields, backward, *grads), case
        for design in cuda_nvrtc.FWD_DESIGNS:
            for batch, frames, patches, fpt in ((8, 16, 729, 1), (1, 16, 256, 1), (3, 40, 37, 3), (2, 2, 5000, 1)):
                params.batch, params.num_frames, params.num_patches, params.frames_per_token = batch, frames, patches, fpt
                params.num_groups = 0 if fields["cu_frames"] else cuda_nvrtc.num_groups(frames, fpt)
                sized = dict(fields, batch=batch, num_frames=frames, num_patches=patches, frames_per_token=fpt,
                             num_groups=params.num_groups)
                assert module.cuda_encode_fwd_grid(params, design) == cuda_nvrtc.encode_fwd_grid(sized, design), (
                    case, design, batch, frames, patches, fpt)
    with pytest.raises(ValueError, match="unknown forward design 'rows'"):
        module.cuda_encode_fwd_grid(params, "rows")


def test_launch_plan_picks_16_byte_vectors_only_when_aligned():
    assert cuda_nvrtc.encode_plan(_fake_encode_fields())[0] == 8           # bf16, aligned
    assert cuda_nvrtc.encode_plan(_fake_encode_fields(x=4098))[0] == 1     # pointer off by 2 bytes
    assert cuda_nvrtc.encode_plan(_fake_encode_fields(stride_n=1160 + 1))[0] == 1
    assert cuda_nvrtc.encode_plan(_fake_encode_fields(dtype=0, C=1024, heads=8))[0] == 4
    # SigLIP heads: 144 channels = 18 vectors of 8 spread over 8 lanes x 3 (6 idle of 24).
    assert cuda_nvrtc.encode_plan(_fake_encode_fields()) == (8, 8, 3, 18, 8)
    # The forward's rows take the fewest lanes that idle no more: heads of 64 channels on 4 lanes
    # of 2 vectors (tiles of 64 rows), the backward's on 8 of 1; mean pooling in segments of one
    # 128-byte line (2 vectors per lane).
    heads64 = _fake_encode_fields(heads=18)
    assert cuda_nvrtc.encode_plan(heads64) == (8, 4, 2, 8, 18)
    assert cuda_nvrtc.encode_plan(heads64, True, 4096, 8192) == (8, 8, 1, 8, 18)
    assert cuda_nvrtc.encode_plan(_fake_encode_fields(pool=0, heads=1)) == (8, 4, 2, 8, 18)
    assert cuda_nvrtc.encode_plan(_fake_encode_fields(pool=0, heads=1, dtype=0)) == (4, 4, 2, 8, 36)


class _Recorder(cuda_nvrtc.NvrtcLoader):
    def __init__(self):
        self.calls = []

    def _launch(self, device_index, stream, kernel, grid, args):
        self.calls.append((kernel, tuple(grid), args))


def test_nvrtc_loader_launches_instantiated_kernels_with_the_cpp_grids():
    names = set(cuda_nvrtc.kernel_names())
    loader = _Recorder()
    fields = _fake_encode_fields()
    loader.encode_fwd(dict(fields, workspace=1 << 20, workspace_elems=cuda_nvrtc.encode_fwd_workspace_elems(fields)), 0, 0)
    loader.encode_bwd(dict(fwd=fields, grad_sequence=4096, grad_x=8192, grad_query=64, workspace=128,
                           workspace_elems=10**9), 0, 0)
    loader.expand_fwd(dict(key_tokens=4096, key_stride_b=729 * 1152, key_stride_n=1152, residual_tokens=8192,
                           res_stride_b=15 * 1152, res_stride_g=1152, batch=8, num_frames=16, num_patches=729,
                           channels=1152, num_groups=15, frames_per_token=1, key_index=64, dtype=2,
                           frames=16384), 0, 0)
    loader.expand_bwd(dict(grad_frames=4096, batch=8, num_frames=16, num_patches=729, channels=1152, num_groups=15,
                           frames_per_token=1, key_index=64, dtype=2, grad_key_tokens=8192,
                           grad_residual_tokens=16384), 0, 0)
    kernels = [c[0] for c in loader.calls]
    assert set(kernels) <= names, set(kernels) - names
    grids = dict((c[0], c[1]) for c in loader.calls)
    # The forward: 8 heads x ceil(729 / 32) tiles of 32 rows on x, every group in each block;
    # the merge of the tiles' partial rows: 144 vectors of 8 channels on x, the groups on y.
    assert grids["vtok::cuda::residual_fwd_kernel<vtok::cuda::bf16_t, 8, 1, 3>"] == (8 * 23, 1, 8)
    assert grids["vtok::cuda::residual_fwd_kernel<vtok::cuda::bf16_t, 8, 3, 0>"] == (1, 15, 8)
    plan = [c[2][1] for c in loader.calls if c[0].endswith("8, 1, 3>")][0]
    assert (int(plan["splits"][0]), int(plan["groups_per_block"][0])) == (23, 15)
    assert grids["vtok::cuda::attn_delta_kernel<vtok::cuda::bf16_t>"] == (15, 8)
    # 256 threads / 8 lanes = 32 patch rows per block: ceil(729 / 32) = 23 tiles; a head of 144
    # channels is 18 vectors, 3 per lane (the kernel compiled for 3).
    assert grids["vtok::cuda::encode_bwd_kernel<vtok::cuda::bf16_t, 8, true, 3>"] == (8, 23, 8)
    assert grids["vtok::cuda::residual_fwd_kernel<vtok::cuda::bf16_t, 8, 2, 3>"] == (3, 15, 8)
    reduce_args = [c[2] for c in loader.calls if "grad_query_reduce" in c[0]][0]
    assert int(reduce_args[1]) == 8 * 23
    assert 8 * 23 <= cuda_nvrtc.dq_partial_rows(8, 729)
    # The warp-split forward: 8 heads x 8 videos x 15 chunks of one group (3 vectors per lane
    # hold one group's sums) make 960 warps; two waves of 2 blocks of 8 warps on 132 SMs want
    # 66 per (video, head): 5 splits of the rows (145-146 each), 4800 warps, 600 blocks.
    warps = _Recorder()
    warps.encode_fwd(dict(fields, workspace=1 << 20,
                          workspace_elems=cuda_nvrtc.encode_fwd_workspace_elems(fields, "warps")), 0, 0, "warps")
    assert {c[0] for c in warps.calls} <= names
    [(kernel, grid, args)] = [c for c in warps.calls if "warp_pool_kernel" in c[0]]
    assert (kernel, grid) == ("vtok::cuda::warp_pool_kernel<vtok::cuda::bf16_t, 8, true, 3>", (600,))
    assert (int(args[1]["splits"][0]), int(args[1]["groups_per_block"][0])) == (5, 1)


# ------------------------------------------------------------------ CPU: binding checks

def _encode_params(module, **overrides):
    fields = _fake_encode_fields()
    fields.update(overrides)
    params = module.EncodeParams()
    for name, value in fields.items():
        value = module.DType(value) if name == "dtype" else module.Pool(value) if name == "pool" else value
        setattr(params, name, value)
    return params


@pytest.mark.parametrize("overrides, message", [
    (dict(dtype=3), "dtype"),
    (dict(x=0), "must be set"),
    (dict(num_heads=7), "divide channels"),
    (dict(num_groups=14), "num_groups"),
    (dict(query=0), "query"),
    (dict(cu_frames=128), "cu_frames and cu_tokens"),
    (dict(channels=1024, num_heads=1), "wider than"),
    (dict(spatial=True, grid_h=27, grid_w=27, out_h=28, out_w=2, num_key_tokens=56), "spatial"),
    (dict(num_key_tokens=5), "num_key_tokens"),
])
def test_binding_rejects_bad_params_before_the_device(overrides, message):
    module = _cuda_extension()
    with pytest.raises(ValueError, match=message):
        module.cuda_encode_fwd(_encode_params(module, **overrides), 0)


def test_binding_rejects_attn_backward_without_workspace():
    module = _cuda_extension()
    bp = module.EncodeBwdParams()
    bp.fwd = _encode_params(module)
    bp.grad_sequence, bp.grad_x = 4096, 8192
    with pytest.raises(ValueError, match="workspace"):
        module.cuda_encode_bwd(bp, 0)


# ------------------------------------------------------------------ CPU: the sources compile

def test_kernels_compile_with_nvcc(tmp_path):
    """One instantiation of every kernel for sm_90a, with no spill in the 16-byte configs."""
    nvcc = _nvcc()
    (tmp_path / "tu.cu").write_text(
        '#include "encode.cuh"\n#include "expand.cuh"\n'
        "namespace vtok { namespace cuda {\n"
        "template __global__ void residual_fwd_kernel<bf16_t, 8, kAttnPool>(const EncodeParams, const RowPlan);\n"
        "template __global__ void encode_bwd_kernel<bf16_t, 8, true>(const EncodeBwdParams, const RowPlan);\n"
        "template __global__ void key_tokens_kernel<float, 4>(const EncodeParams);\n"
        "template __global__ void expand_fwd_kernel<half_t, 8>(const ExpandParams);\n"
        "}}\n")
    proc = subprocess.run(
        [nvcc, "-std=c++17", "-arch=sm_90a", "-Xptxas", "-v", f"-I{ROOT / 'csrc' / 'include'}",
         f"-I{ROOT / 'csrc' / 'cuda'}", "-c", "tu.cu", "-o", "tu.o"],
        cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from vtok_kernels.backends.cuda import parse_ptxas

    rows = parse_ptxas(proc.stderr)
    assert {r["kernel"] for r in rows} == {"residual_fwd_kernel", "encode_bwd_kernel", "key_tokens_kernel",
                                           "expand_fwd_kernel"}
    for row in rows:
        assert row["default"] and row["registers"] > 0
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def _nvrtc_or_skip():
    reason = cuda_nvrtc.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("arch", ["compute_80", "compute_90a"])
def test_kernels_compile_with_nvrtc(arch):
    """The CuPy loader's path: NVRTC alone (no GPU) compiles every instantiation it launches."""
    _nvrtc_or_skip()
    ptx, lowered = cuda_nvrtc.compile_ptx(arch)
    assert len(lowered) == len(cuda_nvrtc.kernel_names())
    text = ptx.decode(errors="replace")
    for mangled in lowered.values():
        assert f".entry {mangled}" in text


def test_parse_ptxas_reads_registers_spills_and_shared_memory():
    from vtok_kernels.backends.cuda import parse_ptxas

    log = (
        "ptxas info    : Compiling entry function '_ZN4vtok4cuda19residual_fwd_kernelINS0_6bf16_tELi8ELi1EEEvNS_12"
        "EncodeParamsENS0_7RowPlanE' for 'sm_90a'\n"
        "ptxas info    : Function properties for _ZN4vtok4cuda19residual_fwd_kernelINS0_6bf16_tELi8ELi1EEEvNS_12"
        "EncodeParamsENS0_7RowPlanE\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 72 registers, used 1 barriers, 18496 bytes smem, 568 bytes cmem[0]\n"
    )
    (row,) = parse_ptxas(log)
    assert row["arch"] == "sm_90a" and row["registers"] == 72 and row["shared_bytes"] == 18496
    assert (row["spill_stores"], row["spill_loads"]) == (4, 12)
    if shutil.which("c++filt"):
        assert row["kernel"] == "residual_fwd_kernel"
        assert row["config"] == "T=bf16,V=8,pool=attn" and row["default"]


# ------------------------------------------------------------------ CPU: availability

def test_availability_reasons():
    reason = backends.unavailable_reason("cuda", "cpu")
    assert reason is not None and "CUDA devices only" in reason
    if not torch.cuda.is_available():
        reason = backends.unavailable_reason("cuda", "cuda")
        assert reason is not None and "torch.cuda.is_available()" in reason
        assert "cuda" not in vk.available_backends("cuda")
    assert backends.get("cuda").loader in ("extension", "cupy-nvrtc", "")


def test_extension_arch_covers_same_major_devices_only():
    from vtok_kernels.backends.cuda import _extension_arch_reason

    class Built:
        cuda_archs = "80,90a"

    for capability in ((8, 0), (8, 6), (8, 9), (9, 0)):
        assert _extension_arch_reason(Built, capability) is None, capability
    reason = _extension_arch_reason(Built, (10, 0))
    assert reason is not None and 'VTOK_CUDA_ARCHS="100"' in reason


def test_unknown_loader_is_a_value_error():
    from vtok_kernels.backends import cuda

    with pytest.raises(ValueError, match="VTOK_CUDA_LOADER"):
        cuda.loader_reason("nvcc-at-runtime")


# ------------------------------------------------------------------ GPU

def _reference_encode(x, key_index, query, grad_seq, **options):
    x64 = x.detach().double().requires_grad_(True)
    q64 = query.detach().double().requires_grad_(True) if query is not None else None
    out = reference.encode(x64, key_index, query=q64, **options)
    inputs = [x64] + ([q64] if q64 is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_seq.double(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return out.detach(), grads[0], (grads[1] if q64 is not None else None)


def _check_encode(shape, dtype, pool="mean", num_heads=1, frames_per_token=1, key_index=0, spatial=None,
                  grid=None, offset=0, backward=True):
    """cuda against the float64 reference; offset > 0 misaligns x (the scalar path)."""
    C = shape[-1]
    storage = features(shape[:-1] + (C + offset,), dtype, "cuda")
    x = storage[..., offset:].detach().requires_grad_(backward)
    query = torch.randn(C, device="cuda", requires_grad=True) if pool == "attn" else None
    options = dict(pool=pool, num_heads=num_heads, frames_per_token=frames_per_token, spatial=spatial, grid=grid)
    out = vk.encode(x, key_index, query=query, backend="cuda", **options)
    grad_seq = torch.randn(out.sequence.shape, device="cuda").to(dtype)
    ref_seq, ref_gx, ref_gq = _reference_encode(x, key_index, query, grad_seq, **options)
    assert_close(out.sequence, ref_seq.to(dtype), dtype, "cuda sequence")
    if backward:
        out.sequence.backward(grad_seq)
        assert_close(x.grad, ref_gx, dtype, "cuda grad x")
        if query is not None:
            assert_close(query.grad, ref_gq, dtype, "cuda grad query")


REALISTIC = [
    pytest.param(dict(shape=(8, 16, 729, 1152), pool="attn", num_heads=8), id="siglip-attn8"),
    pytest.param(dict(shape=(8, 16, 729, 1152), pool="mean"), id="siglip-mean"),
    pytest.param(dict(shape=(8, 16, 27, 27, 1152), pool="mean", spatial=(9, 9), key_index=-1), id="siglip-spatial"),
    pytest.param(dict(shape=(4, 32, 576, 1024), pool="attn", num_heads=16, frames_per_token=4), id="clip-attn16-fpt4"),
    pytest.param(dict(shape=(4, 32, 576, 1024), pool="mean", frames_per_token=3, key_index=5), id="clip-mean-fpt3"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize("case", REALISTIC)
def test_realistic_shapes(case, dtype):
    _check_encode(dtype=dtype, **case)


ODD = [
    pytest.param(dict(shape=(3, 5, 37, 200), pool="attn", num_heads=5), id="attn-N37-head40"),
    pytest.param(dict(shape=(2, 6, 37, 200), pool="mean", frames_per_token=4, key_index=-1), id="mean-fpt4"),
    pytest.param(dict(shape=(2, 4, 7, 9, 96), pool="attn", num_heads=3, spatial=(4, 5)), id="attn-spatial-overlap"),
    pytest.param(dict(shape=(1, 1, 50, 64), pool="attn", num_heads=2), id="attn-T1"),
    pytest.param(dict(shape=(2, 5, 33, 1000), pool="attn", num_heads=2), id="attn-head500"),
    pytest.param(dict(shape=(2, 5, 33, 123), pool="attn", num_heads=1), id="attn-C123-scalar"),
    pytest.param(dict(shape=(2, 5, 33, 128), pool="attn", num_heads=4, offset=1), id="attn-misaligned-scalar"),
    pytest.param(dict(shape=(2, 5, 33, 136), pool="mean", offset=3), id="mean-misaligned-scalar"),
    pytest.param(dict(shape=(2, 4, 9, 1024), pool="attn", num_heads=1), id="attn-head1024-falls-back"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
@pytest.mark.parametrize("case", ODD)
def test_odd_shapes(case, dtype):
    _check_encode(dtype=dtype, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_varlen_matches_reference(pool, dtype):
    lengths, N, C = [1, 9, 4, 16], 49, 256
    x = features((sum(lengths), N, C), dtype, "cuda").requires_grad_(True)
    cu_frames = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda")
    keys = torch.tensor([0, 8, -2, 3], device="cuda")
    query = torch.randn(C, device="cuda", requires_grad=True) if pool == "attn" else None
    options = dict(pool=pool, num_heads=4 if pool == "attn" else 1, frames_per_token=2,
                   spatial=(3, 2), grid=(7, 7))
    out = vk.encode_varlen(x, cu_frames, keys, query=query, backend="cuda", **options)
    grad = torch.randn(out.sequence.shape, device="cuda").to(dtype)
    out.sequence.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    q64 = query.detach().double().requires_grad_(True) if query is not None else None
    ref, _ = reference.encode_varlen(x64, cu_frames, keys, query=q64, **options)
    inputs = [x64] + ([q64] if q64 is not None else [])
    grads = torch.autograd.grad(ref, inputs, grad.double())
    assert_close(out.sequence, ref.detach().to(dtype), dtype, "varlen sequence")
    assert_close(x.grad, grads[0], dtype, "varlen grad x")
    if query is not None:
        assert_close(query.grad, grads[1], dtype, "varlen grad query")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
@pytest.mark.parametrize("shape", [(8, 16, 729, 1152), (2, 7, 37, 200), (1, 1, 5, 24)], ids=str)
def test_expand_matches_reference(shape, dtype):
    B, T, N, C = shape
    G = reference.num_groups(T, 2)
    keys = features((B, N, C), dtype, "cuda").requires_grad_(True)
    residual = features((B, G, C), dtype, "cuda").requires_grad_(True)
    key_index = torch.randint(0, T, (B,), device="cuda")
    frames = vk.expand(keys, residual, key_index, T, 2, backend="cuda")
    grad = torch.randn(frames.shape, device="cuda").to(dtype)
    frames.backward(grad)
    k64 = keys.detach().double().requires_grad_(True)
    r64 = residual.detach().double().requires_grad_(True)
    ref = reference.expand(k64, r64, key_index, T, 2)
    gk, gr = torch.autograd.grad(ref, [k64, r64], grad.double(), allow_unused=True)
    assert_close(frames, ref.detach(), dtype, "expand")
    assert_close(keys.grad, gk, dtype, "expand grad key")
    if G:
        assert_close(residual.grad, gr, dtype, "expand grad residual")


def _encode_step(x, query, grad_seq):
    x = x.detach().requires_grad_(True)
    query = query.detach().requires_grad_(True)
    out = vk.encode(x, -1, pool="attn", query=query, num_heads=8, frames_per_token=2, backend="cuda")
    out.sequence.backward(grad_seq)
    return out.sequence.detach(), x.grad, query.grad


@pytest.mark.gpu
def test_backward_is_deterministic_bitwise():
    x = features((4, 16, 729, 1152), torch.bfloat16, "cuda")
    query = torch.randn(1152, device="cuda")
    grad = torch.randn(4, 729 + 8, 1152, device="cuda").to(torch.bfloat16)
    first = _encode_step(x, query, grad)
    for _ in range(2):
        again = _encode_step(x, query, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_graph_replay_is_bit_equal_to_eager():
    from vtok_kernels.backends import get

    cuda = get("cuda")
    x = features((2, 9, 196, 768), torch.bfloat16, "cuda")
    keys = torch.tensor([0, 4], device="cuda")
    query = torch.randn(768, device="cuda")
    args = (keys, query, "attn", 12, 2, [2, 2], [14, 14])
    eager_seq, eager_lse, *kept = cuda.encode_fwd(x, *args)
    grad = torch.randn_like(eager_seq)
    eager_gx, eager_gq = cuda.encode_bwd(grad, x, keys, query, eager_seq, eager_lse, "attn", 12, 2, [2, 2], [14, 14],
                                         *kept)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        cuda.encode_fwd(x, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seq, lse, *kept = cuda.encode_fwd(x, *args)
        gx, gq = cuda.encode_bwd(grad, x, keys, query, seq, lse, "attn", 12, 2, [2, 2], [14, 14], *kept)
    x.copy_(features(x.shape, x.dtype, "cuda"))  # new inputs, same addresses
    eager_seq, eager_lse, *eager_kept = cuda.encode_fwd(x, *args)
    eager_gx, eager_gq = cuda.encode_bwd(grad, x, keys, query, eager_seq, eager_lse, "attn", 12, 2, [2, 2], [14, 14],
                                         *eager_kept)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in ((seq, eager_seq), (lse, eager_lse), (gx, eager_gx), (gq, eager_gq)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_loaders_give_the_same_bits():
    from vtok_kernels.backends import cuda

    for name in cuda.LOADERS:
        reason = cuda.loader_reason(name)
        if reason is not None:
            pytest.skip(f"loader {name}: {reason}")
    x = features((3, 7, 37, 200), torch.float16, "cuda")
    keys = torch.tensor([0, 3, 6], device="cuda")
    query = torch.randn(200, device="cuda")
    results = {}
    for name in cuda.LOADERS:
        loader = cuda.get_loader(name)
        original = cuda._loader
        cuda._loader = lambda loader=loader: loader
        try:
            seq, lse, *kept = cuda.encode_fwd(x, keys, query, "attn", 5, 2, [], [])
            grad = torch.ones_like(seq)
            gx, gq = cuda.encode_bwd(grad, x, keys, query, seq, lse, "attn", 5, 2, [], [], *kept)
            frames = cuda.expand_fwd(seq[:, :37], seq[:, 37:], keys, 7, 2)
            results[name] = (seq, lse, gx, gq, frames) + cuda.expand_bwd(frames, keys, 3, 2)
        finally:
            cuda._loader = original
    for a, b in zip(*results.values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ CPU: the backend's marshalling

class _FieldRecorder:
    name = "recorder"

    def __init__(self):
        self.calls = []

    def __getattr__(self, op):
        return lambda fields, stream, device_index, *design: self.calls.append((op, fields))


@pytest.fixture
def recorded(monkeypatch):
    """The cuda backend's ops on CPU tensors, with the launch replaced by a recorder."""
    import contextlib

    from vtok_kernels.backends import cuda

    recorder = _FieldRecorder()
    monkeypatch.setattr(cuda, "_loader", lambda: recorder)
    monkeypatch.setattr(cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return cuda, recorder


def test_encode_marshals_strided_inputs_in_place(recorded):
    cuda, recorder = recorded
    x = torch.randn(3, 9, 14, 24)[:, ::2, ::2]  # frame and patch strides read in place
    keys = torch.tensor([0, 4, 2])
    query = torch.randn(24)
    seq, lse = cuda.encode_fwd(x, keys, query, "attn", 3, 2, [], [])
    assert seq.shape == (3, 7 + 2, 24) and lse.shape == (3, 2, 3)
    op, p = recorder.calls[-1]
    assert op == "encode_fwd"
    assert p["x"] == x.data_ptr() and (p["x_stride_b"], p["x_stride_t"], p["x_stride_n"]) == x.stride()[:3]
    assert (p["batch"], p["num_frames"], p["num_patches"], p["channels"]) == (3, 5, 7, 24)
    assert (p["num_groups"], p["num_key_tokens"], p["num_heads"], p["pool"]) == (2, 7, 3, 1)
    assert p["sequence"] == seq.data_ptr() and p["lse"] == lse.data_ptr() and p["cu_frames"] == 0
    assert set(p) == set(cuda_nvrtc.ENCODE_PARAMS.names) - {"grid_h", "grid_w", "out_h", "out_w"}

    grad_x, grad_q = cuda.encode_bwd(torch.randn_like(seq), x, keys, query, seq, lse, "attn", 3, 2, [], [])
    op, bp = recorder.calls[-1]
    assert grad_x.shape == x.shape and grad_x.is_contiguous() and grad_q.shape == (24,)
    assert bp["grad_x"] == grad_x.data_ptr() and bp["grad_query"] == grad_q.data_ptr()
    assert bp["workspace_elems"] == cuda_nvrtc.encode_bwd_workspace_elems(3, 7, 24, lse.numel())
    assert set(bp) == set(cuda_nvrtc.ENCODE_BWD_PARAMS.names)


def test_attn_in_16_bits_keeps_float32_residual_tokens_for_the_backward(recorded):
    cuda, recorder = recorded
    x = torch.randn(2, 5, 7, 24).to(torch.bfloat16)
    keys, query = torch.tensor([0, 3]), torch.randn(24)
    seq, lse, residual32 = cuda.encode_fwd(x, keys, query, "attn", 3, 2, [], [])
    assert residual32.shape == (2, 2, 24) and residual32.dtype == torch.float32
    assert recorder.calls[-1][1]["residual32"] == residual32.data_ptr()
    cuda.encode_bwd(torch.randn_like(seq), x, keys, query, seq, lse, "attn", 3, 2, [], [], residual32)
    assert recorder.calls[-1][1]["fwd"]["residual32"] == residual32.data_ptr()
    # mean pooling, and float32 (whose sequence holds r exactly), keep nothing
    assert len(cuda.encode_fwd(x, keys, None, "mean", 1, 2, [], [])) == 2
    seq, lse = cuda.encode_fwd(x.float(), keys, query, "attn", 3, 2, [], [])
    assert recorder.calls[-1][1]["residual32"] == 0


def test_varlen_and_spatial_marshal_offsets_and_bins(recorded):
    cuda, recorder = recorded
    x = torch.randn(8, 12, 16).to(torch.bfloat16)
    cu_frames = torch.tensor([0, 3, 8])
    cu_tokens = torch.tensor([0, 6 + 2, 12 + 2 + 4])
    seq, lse = cuda.encode_varlen_fwd(x, cu_frames, cu_tokens, torch.tensor([0, 4]), None, "mean", 1, 1,
                                      [2, 3], [3, 4], 5, 18)
    assert seq.shape == (18, 16) and lse.numel() == 0
    _, p = recorder.calls[-1]
    assert (p["cu_frames"], p["cu_tokens"], p["x_stride_b"]) == (cu_frames.data_ptr(), cu_tokens.data_ptr(), 0)
    assert (p["batch"], p["num_frames"], p["spatial"], p["num_key_tokens"]) == (2, 5, True, 6)
    assert (p["grid_h"], p["grid_w"], p["out_h"], p["out_w"], p["dtype"], p["lse"]) == (3, 4, 2, 3, 2, 0)


def test_expand_marshals_strided_tokens(recorded):
    cuda, recorder = recorded
    seq = torch.randn(2, 7 + 3, 20).half()
    frames = cuda.expand_fwd(seq[:, :7], seq[:, 7:], torch.tensor([0, 6]), 7, 2)
    assert frames.shape == (2, 7, 7, 20)
    _, p = recorder.calls[-1]
    assert (p["key_stride_b"], p["key_stride_n"], p["res_stride_b"], p["res_stride_g"]) == (200, 20, 200, 20)
    assert p["residual_tokens"] == seq[:, 7:].data_ptr() and p["num_groups"] == 3
    grad_keys, grad_res = cuda.expand_bwd(torch.randn_like(frames), torch.tensor([0, 6]), 3, 2)
    _, p = recorder.calls[-1]
    assert grad_keys.shape == (2, 7, 20) and grad_res.shape == (2, 3, 20)
    assert set(p) == set(cuda_nvrtc.EXPAND_BWD_PARAMS.names)


def test_wide_heads_run_on_the_reference(recorded):
    cuda, recorder = recorded
    x = torch.randn(1, 3, 4, 800)
    seq, lse, *_ = cuda.encode_fwd(x, torch.tensor([0]), torch.randn(800), "attn", 1, 1, [], [])
    assert not recorder.calls and seq.shape == (1, 6, 800) and torch.isfinite(seq).all()


# ------------------------------------------------------------------ CPU: the kernels, emulated

@pytest.fixture
def emulated(monkeypatch):
    """The cuda backend on CPU tensors: the CuPy loader's launch plan, with every kernel body of
    csrc/cuda run by the host emulator (tests/cuda_emulator), threads for lanes."""
    import contextlib

    from tests import cuda_emulator
    from vtok_kernels.backends import cuda

    reason = cuda_emulator.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    loader = cuda_emulator.EmulatedLoader()
    monkeypatch.setattr(cuda, "_loader", lambda: loader)
    monkeypatch.setattr(cuda, "_stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return cuda


def _emulated_encode(cuda, x, keys, query, pool, heads, fpt, spatial, grid):
    seq, lse, *kept = cuda.encode_fwd(x, keys, query, pool, heads, fpt, spatial, grid)
    x64 = x.detach().double().requires_grad_(True)
    q64 = query.double().requires_grad_(True) if query is not None else None
    options = dict(pool=pool, num_heads=heads, frames_per_token=fpt, spatial=tuple(spatial) or None,
                   grid=tuple(grid) or None)
    ref, ref_lse = reference.encode(x64, keys, query=q64, return_lse=True, **options)
    grad = torch.randn(ref.shape).to(x.dtype)
    inputs = [x64] + ([q64] if q64 is not None else [])
    grads = torch.autograd.grad(ref, inputs, grad.double(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    grad_x, grad_q = cuda.encode_bwd(grad, x, keys, query, seq, lse, pool, heads, fpt, spatial, grid, *kept)
    return (seq, ref.detach(), lse, ref_lse.detach(), grad_x, grads[0], grad_q,
            grads[1] if query is not None else None)


EMULATED = [
    # (id, shape, pool, heads, fpt, spatial, grid, channel offset, frame step)
    ("mean-fpt2", (2, 5, 37, 48), "mean", 1, 2, [], [], 0, 1),
    ("attn-3heads", (2, 5, 37, 48), "attn", 3, 1, [], [], 0, 1),
    ("attn-misaligned-scalar", (2, 4, 15, 48), "attn", 2, 3, [], [], 1, 1),
    ("mean-misaligned-spatial", (2, 4, 15, 40), "mean", 1, 1, [2, 3], [3, 5], 3, 1),
    ("attn-spatial-overlap-framestrided", (2, 9, 15, 32), "attn", 1, 2, [2, 3], [3, 5], 0, 2),
    ("attn-T1", (2, 1, 9, 32), "attn", 2, 1, [], [], 0, 1),
    ("attn-C-odd", (1, 4, 9, 21), "attn", 3, 1, [], [], 0, 1),
    ("attn-wide-head-scalar", (1, 3, 9, 640), "attn", 1, 1, [], [], 0, 1),
    ("attn-one-lane-per-row", (2, 4, 300, 12), "attn", 3, 2, [], [], 0, 1),  # 257+ rows: two passes
]


# 16-bit types on the cases that reach both the vector and the scalar paths; float32 on all.
_SIXTEEN_BIT_CASES = ("attn-3heads", "attn-misaligned-scalar", "mean-misaligned-spatial")
EMULATED_PARAMS = [
    pytest.param(case, dtype, id=f"{case[0]}-{DTYPE_ID(dtype)}")
    for case in EMULATED for dtype in LOW_PRECISION
    if dtype == torch.float32 or case[0] in _SIXTEEN_BIT_CASES
]


@pytest.mark.parametrize("case, dtype", EMULATED_PARAMS)
def test_emulated_encode_matches_reference(emulated, case, dtype):
    _, shape, pool, heads, fpt, spatial, grid, offset, step = case
    storage = features(shape[:-1] + (shape[-1] + offset,), dtype)
    x = storage[:, ::step, ..., offset:]
    keys = torch.randint(0, x.shape[1], (shape[0],))
    query = torch.randn(shape[-1]) if pool == "attn" else None
    seq, ref, lse, ref_lse, gx, ref_gx, gq, ref_gq = _emulated_encode(emulated, x, keys, query, pool, heads, fpt,
                                                                     spatial, grid)
    assert_close(seq, ref.to(dtype), dtype, "sequence")
    if pool == "attn" and lse.numel():
        assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    assert_close(gx, ref_gx, dtype, "grad x")
    if query is not None:
        assert_close(gq, ref_gq, dtype, "grad query")


@pytest.mark.parametrize("pool, heads, fpt", [("mean", 1, 1), ("attn", 3, 1), ("attn", 2, 2), ("mean", 1, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "time-major"])
def test_emulated_every_key_frame_position(emulated, monkeypatch, pool, heads, fpt, layout):
    """The forward walks a block's frames with a row pointer carried from frame to frame,
    stepping over the key frame: the key first, last and at every place between (one video
    each), in a contiguous video and in a time-major view (frame stride B x N x C). A 1-SM
    plan puts all of a video's groups in one block, so the walk crosses the key frame."""
    monkeypatch.setattr(cuda_nvrtc, "FILL_SMS", 1)
    T, N, C = 7, 37, 48
    if layout == "time-major":
        x = features((T, T, N, C), torch.float32).permute(1, 0, 2, 3)
    else:
        x = features((T, T, N, C), torch.float32)
    keys = torch.arange(T)
    query = torch.randn(C) if pool == "attn" else None
    seq, ref, lse, ref_lse, gx, ref_gx, gq, ref_gq = _emulated_encode(emulated, x, keys, query, pool, heads, fpt,
                                                                     [], [])
    assert_close(seq, ref.to(torch.float32), torch.float32, "sequence")
    assert_close(gx, ref_gx, torch.float32, "grad x")
    if query is not None:
        assert_close(lse, ref_lse, torch.float32, "lse")
        assert_close(gq, ref_gq, torch.float32, "grad query")


BACKWARD_BY_K = [
    # (id, dtype, C, pool, heads, vectors per lane the backward is compiled for)
    ("attn-bf16-head64-K1", torch.bfloat16, 128, "attn", 2, 1),  # CLIP's head: 8 lanes x 1
    ("attn-bf16-head72-K3", torch.bfloat16, 144, "attn", 2, 3),  # SigLIP's: 4 lanes x 3, 3 idle
    ("attn-bf16-K2", torch.bfloat16, 512, "attn", 1, 2),
    ("attn-fp32-head64-K1", torch.float32, 128, "attn", 2, 1),
    ("attn-fp32-K2", torch.float32, 256, "attn", 1, 2),
    ("attn-fp32-head72-K3", torch.float32, 144, "attn", 2, 3),
    ("attn-fp32-K4", torch.float32, 512, "attn", 1, 4),
    ("mean-bf16-K2", torch.bfloat16, 1024, "mean", 1, 2),
    ("mean-bf16-K3-past-row", torch.bfloat16, 88, "mean", 1, 3),
]


@pytest.mark.parametrize("fpt", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "time-major"])
@pytest.mark.parametrize("case", BACKWARD_BY_K, ids=[c[0] for c in BACKWARD_BY_K])
def test_emulated_backward_per_vectors_per_lane(emulated, case, layout, fpt):
    """The backward on 16-byte rows is compiled for its plan's vectors per lane (K) and walks a
    video's frames with row pointers for x and grad_x carried from frame to frame, stepping over
    the key frame, and grad r's row moved once per group: every K, the key frame at every place
    (one video each), frame strides of a contiguous video and of a time-major view, one and two
    frames per token, rows past N in the last tile."""
    _, dtype, C, pool, heads, k = case
    T, N = 6, 37
    if layout == "time-major":
        x = features((T, T, N, C), dtype).permute(1, 0, 2, 3)
    else:
        x = features((T, T, N, C), dtype)
    keys = torch.arange(T)
    query = torch.randn(C) if pool == "attn" else None
    loader = emulated._loader()
    first = len(loader.launches)
    seq, ref, lse, ref_lse, gx, ref_gx, gq, ref_gq = _emulated_encode(emulated, x, keys, query, pool, heads, fpt,
                                                                     [], [])
    vec = 16 // x.element_size()
    lanes, planned_k, _, _ = cuda_nvrtc.plan_segments(C, vec, pool == "attn", heads)
    assert planned_k == k and N % (256 // lanes)  # the case reaches its K and a short last tile
    [bwd] = [name for name, _ in loader.launches[first:] if "encode_bwd_kernel" in name]
    assert bwd.endswith(f", {vec}, {'true' if pool == 'attn' else 'false'}, {k}>"), bwd
    assert_close(gx, ref_gx, dtype, "grad x")
    if query is not None:
        assert_close(gq, ref_gq, dtype, "grad query")


@pytest.mark.parametrize("design", ["tiles", "warps"])
def test_emulated_fuzz_matches_reference(emulated, monkeypatch, capsys, design):
    """The seeded differential fuzz (benchmarks/fuzz.py: every op, layout, key choice, dtype and
    option, forward and backward, outputs poisoned) on the cuda backend's launch plans with its
    kernels run by the host emulator. Fresh cases every run; VTOK_FUZZ_SEED pins the seed."""
    import os

    from benchmarks import fuzz

    # The public API refuses the cuda backend for CPU tensors; the emulator runs them.
    monkeypatch.setattr(backends.get("cuda"), "unavailable_reason", lambda device_type: None)
    monkeypatch.setenv("VTOK_CUDA_FWD", design)
    seed = int(os.environ.get("VTOK_FUZZ_SEED") or torch.randint(0, 100_000, ()).item())
    count = 30
    launches = emulated._loader().launches
    counts = fuzz.run("cuda", "cpu", fuzz.draw_cases(seed, count, "cuda", fuzz.PROFILES["emulator"]))
    assert counts == {**counts, "passed": count, "failed": 0}, (
        capsys.readouterr().out + f" (seed {seed}: VTOK_FUZZ_SEED={seed} pytest -k emulated_fuzz reruns it)")
    # The cases ran on the emulated kernels (not a fallback): forward and backward of each.
    assert len(launches) >= 2 * count and any("encode_bwd_kernel" in k or "expand" in k for k, _ in launches)


def test_emulated_forward_design_comes_from_the_environment(emulated, monkeypatch):
    """$VTOK_CUDA_FWD picks the forward's design on 16-byte rows (tiles when unset), read once per
    op; an unknown name is a ValueError before anything is launched."""
    x = features((2, 5, 37, 64), torch.bfloat16)
    keys = torch.tensor([0, 3])
    launches = emulated._loader().launches
    for design, kernel in (("", "residual_fwd_kernel"), ("tiles", "residual_fwd_kernel"), ("warps", "warp_pool_kernel")):
        monkeypatch.setenv("VTOK_CUDA_FWD", design)
        first = len(launches)
        emulated.encode_fwd(x, keys, None, "mean", 1, 1, [], [])
        pooled = [name for name, _ in launches[first:] if "key_tokens" not in name]
        assert kernel in pooled[0] and pooled[1].endswith(", 8, 3, 0>"), (design, pooled)
    monkeypatch.setenv("VTOK_CUDA_FWD", "rows")
    first = len(launches)
    with pytest.raises(ValueError, match="VTOK_CUDA_FWD: unknown forward design 'rows'"):
        emulated.encode_fwd(x, keys, None, "mean", 1, 1, [], [])
    assert len(launches) == first


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
def test_emulated_one_patch_query_gradient_vanishes(emulated, dtype):
    x = features((2, 4, 1, 96), dtype)
    keys, query = torch.randint(0, 4, (2,)), torch.randn(96)
    seq, lse, *kept = emulated.encode_fwd(x, keys, query, "attn", 1, 1, [], [])
    assert len(kept) == (dtype != torch.float32)
    grad = torch.randn(seq.shape).to(dtype)
    _, grad_query = emulated.encode_bwd(grad, x, keys, query, seq, lse, "attn", 1, 1, [], [], *kept)
    assert_one_patch_query_grad_vanishes(grad_query, x, grad[:, 1:], 1, f"emulated {dtype}")


@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_emulated_varlen_matches_reference(emulated, pool):
    dtype = torch.bfloat16
    lengths, N, C = [3, 1, 5], 9, 40
    x = features((sum(lengths), N, C), dtype)
    cu_frames = torch.tensor([0, 3, 4, 9])
    keys = torch.tensor([2, 0, 1])
    query = torch.randn(C) if pool == "attn" else None
    S, groups = 4, [1, 0, 2]  # 2x2 key tokens; ceil((T - 1) / 2) residual tokens per video
    cu_tokens = torch.tensor([0] + torch.tensor([S + g for g in groups]).cumsum(0).tolist())
    seq, lse, *kept = emulated.encode_varlen_fwd(x, cu_frames, cu_tokens, keys, query, pool,
                                                 2 if query is not None else 1, 2, [2, 2], [3, 3], 5, 3 * S + 3)
    x64 = x.double().requires_grad_(True)
    q64 = query.double().requires_grad_(True) if query is not None else None
    ref, _ = reference.encode_varlen(x64, cu_frames, keys, pool=pool, query=q64, num_heads=2 if query is not None else 1,
                                     frames_per_token=2, spatial=(2, 2), grid=(3, 3))
    grad = torch.randn(ref.shape).to(dtype)
    grads = torch.autograd.grad(ref, [x64] + ([q64] if q64 is not None else []), grad.double())
    gx, gq = emulated.encode_varlen_bwd(grad, x, cu_frames, cu_tokens, keys, query, seq, lse, pool,
                                        2 if query is not None else 1, 2, [2, 2], [3, 3], 5, *kept)
    assert_close(seq, ref.detach().to(dtype), dtype, "varlen sequence")
    assert_close(gx, grads[0], dtype, "varlen grad x")
    if query is not None:
        assert_close(gq, grads[1], dtype, "varlen grad query")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize("T, fpt, offset", [(7, 2, 0), (6, 1, 1), (1, 1, 0)])
def test_emulated_expand_matches_reference(emulated, T, fpt, offset, dtype):
    B, N, C = 2, 11, 24
    G = reference.num_groups(T, fpt)
    tokens = features((B, N + G, C + offset), dtype)[..., offset:]
    keys = torch.tensor([0, T - 1])
    frames = emulated.expand_fwd(tokens[:, :N], tokens[:, N:], keys, T, fpt)
    k64 = tokens[:, :N].double().requires_grad_(True)
    r64 = tokens[:, N:].double().requires_grad_(True)
    ref = reference.expand(k64, r64, keys, T, fpt)
    grad = torch.randn(ref.shape).to(dtype)
    ref_gk, ref_gr = torch.autograd.grad(ref, [k64, r64], grad.double(), allow_unused=True)
    grad_keys, grad_res = emulated.expand_bwd(grad, keys, G, fpt)
    assert_close(frames, ref.detach(), dtype, "expand")
    assert_close(grad_keys, ref_gk, dtype, "expand grad key")
    if G:
        assert_close(grad_res, ref_gr, dtype, "expand grad residual")


def test_emulated_backward_is_deterministic(emulated):
    x = features((2, 5, 37, 48), torch.bfloat16)
    keys = torch.tensor([1, 4])
    query = torch.randn(48)
    seq, lse, *kept = emulated.encode_fwd(x, keys, query, "attn", 3, 2, [], [])
    grad = torch.randn(seq.shape).to(torch.bfloat16)
    first = emulated.encode_bwd(grad, x, keys, query, seq, lse, "attn", 3, 2, [], [], *kept)
    again = emulated.encode_bwd(grad, x, keys, query, seq, lse, "attn", 3, 2, [], [], *kept)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("design", ["tiles", "warps"])
@pytest.mark.parametrize("pool, heads, bad, query_sign", [
    ("mean", 1, float("nan"), 1), ("attn", 2, float("nan"), 1),
    ("mean", 1, float("inf"), 1), ("attn", 2, float("inf"), 1), ("attn", 2, float("inf"), -1),
])
def test_emulated_non_finite_values_propagate_as_in_the_reference(emulated, monkeypatch, design, pool, heads, bad,
                                                                  query_sign):
    """In both forward designs: the tokens, and for attention the lse the backward reads, are NaN
    and inf where the reference's are (a repeated infinite score is no NaN in the lse)."""
    monkeypatch.setenv("VTOK_CUDA_FWD", design)
    x = features((2, 5, 11, 16), torch.float32)
    x[0, 2, 3, 5] = bad   # a non-key frame of video 0
    x[1, 0, 7, 12] = bad  # the key frame of video 1: every residual at patch 7
    keys = torch.tensor([0, 0])
    # The sign of the query at the bad channels decides whether the scores go to +inf or -inf.
    query = torch.randn(16).abs() * query_sign if pool == "attn" else None
    seq, lse, *_ = emulated.encode_fwd(x, keys, query, pool, heads, 2, [], [])
    ref, ref_lse = reference.encode(x.double(), keys, pool=pool, query=query.double() if query is not None else None,
                                    num_heads=heads, frames_per_token=2, return_lse=True)
    assert torch.equal(torch.isnan(seq), torch.isnan(ref)), "NaN positions differ from the reference"
    assert torch.equal(torch.isinf(seq), torch.isinf(ref)), "inf positions differ from the reference"
    if pool == "attn":
        assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse)), (lse, ref_lse)
        assert torch.equal(lse.isinf() & (lse > 0), ref_lse.isinf() & (ref_lse > 0)), (lse, ref_lse)
    assert torch.isfinite(seq[0, 11 + 1]).all()  # group 1 of video 0 holds no bad value
    finite = torch.isfinite(ref)
    assert torch.allclose(seq[finite].double(), ref[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("pool, heads", [("mean", 1), ("attn", 8)])
def test_non_finite_values_propagate_as_in_the_reference(pool, heads):
    x = features((2, 9, 37, 256), torch.bfloat16, "cuda")
    x[0, 2, 3, 5] = float("nan")
    x[1, 0, 7, 200] = float("inf")
    keys = torch.tensor([0, 0], device="cuda")
    query = torch.randn(256, device="cuda") if pool == "attn" else None
    out = vk.encode(x, keys, pool=pool, query=query, num_heads=heads, frames_per_token=2, backend="cuda")
    ref = reference.encode(x.double(), keys, pool=pool, query=query.double() if query is not None else None,
                           num_heads=heads, frames_per_token=2)
    torch.cuda.synchronize()  # returns: no hang
    assert torch.equal(torch.isnan(out.sequence), torch.isnan(ref))
    assert torch.equal(torch.isinf(out.sequence), torch.isinf(ref))


# ------------------------------------------------------------------ CPU: clamped loads, emulated

# What the kernels load on clamped addresses (row N - 1, the segment's first vector) and then
# zero or never store: rows past N (N not a multiple of the rows a block holds, after several passes), a
# lane's last vector past its segment or past C, a last group shorter than frames_per_token,
# and the scalar path of a misaligned view.
CLAMPED = [
    # (id, shape, pool, heads, fpt, channel offset)
    ("mean-two-segments-tail-rows", (1, 4, 45, 560), "mean", 1, 2, 0),
    ("mean-last-vector-past-row", (2, 3, 20, 88), "mean", 1, 1, 0),
    ("attn-last-vector-past-head", (1, 5, 33, 120), "attn", 3, 3, 0),
    ("attn-misaligned-scalar-tail-rows", (1, 4, 45, 40), "attn", 2, 2, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
@pytest.mark.parametrize("case", CLAMPED, ids=[c[0] for c in CLAMPED])
def test_emulated_clamped_tails_match_reference(emulated, case, dtype):
    _, shape, pool, heads, fpt, offset = case
    B, T, N, C = shape
    vec = 1 if offset else 16 // torch.empty(0, dtype=dtype).element_size()
    lanes, vecs_per_lane, seg_vecs, segments = cuda_nvrtc.plan_segments(C, vec, pool == "attn", heads)
    # the case reaches a clamped load: rows past N, or vectors past a segment or past C
    assert N % (256 // lanes) or lanes * vecs_per_lane > seg_vecs or segments * seg_vecs > C // vec
    x = features((B, T, N, C + offset), dtype)[..., offset:]
    keys = torch.tensor([T - 1] + [1] * (B - 1))
    query = torch.randn(C) if pool == "attn" else None
    seq, ref, lse, ref_lse, gx, ref_gx, gq, ref_gq = _emulated_encode(emulated, x, keys, query, pool, heads, fpt,
                                                                     [], [])
    assert_close(seq, ref.to(dtype), dtype, "sequence")
    if pool == "attn":
        assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    assert_close(gx, ref_gx, dtype, "grad x")
    if query is not None:
        assert_close(gq, ref_gq, dtype, "grad query")


@pytest.mark.parametrize("where", ["x", "grad"])
def test_emulated_clamped_loads_keep_a_bad_value_in_its_head(emulated, where):
    """3 heads of 16 float32 channels: 4 lanes per row with one vector each, so every lane
    loads its 3 other vectors on a clamped address and zeroes them. An inf at channel 0 (in x
    or in grad r) stays in head 0, as in the reference: no other head's score or gradient
    sees it, as inf * 0 or otherwise."""
    B, T, N, C, H, head = 2, 4, 11, 48, 3, 16
    assert cuda_nvrtc.plan_segments(C, 4, True, H)[:2] == (4, 1)
    x = features((B, T, N, C), torch.float32)
    keys = torch.tensor([0, 2])
    query = torch.randn(C)
    if where == "x":
        x[0, 1, :, 0] = float("inf")  # a non-key frame of video 0
        x[1, 2, 3, 0] = float("-inf")  # the key frame of video 1
    seq, lse, *kept = emulated.encode_fwd(x, keys, query, "attn", H, 1, [], [])
    x64 = x.double().requires_grad_(True)
    q64 = query.double().requires_grad_(True)
    ref = reference.encode(x64, keys, query=q64, pool="attn", num_heads=H)
    grad = torch.randn(ref.shape)
    if where == "grad":
        grad[:, N:, 0] = float("inf")  # every residual token's grad at channel 0
    ref_gx, ref_gq = torch.autograd.grad(ref, [x64, q64], grad.double())
    gx, gq = emulated.encode_bwd(grad, x, keys, query, seq, lse, "attn", H, 1, [], [], *kept)
    for out, expected, what in [(seq, ref.detach(), "sequence"), (gx, ref_gx, "grad x"), (gq, ref_gq, "grad query")]:
        assert torch.isfinite(expected[..., head:]).all()
        assert torch.isfinite(out[..., head:]).all(), f"{what}: a non-finite value left head 0"
        assert_close(out[..., head:], expected[..., head:], torch.float32, what)


# ------------------------------------------------------------------ CPU: expand's item walk, emulated
#
# expand_fwd_kernel and expand_grad_keys_kernel walk items (video, key token, vector) with a
# grid-stride loop whose position is carried from item to item, and the forward walks each
# item's frames in rank order, stepping over the key frame, with the groups cut into chunks
# over grid axis z. The launcher's grid is a choice of speed: the results must be the same for
# any grid with at most 4096 blocks on x. The cases below force small grids (one block striding
# over every video, chunks of one group, more chunks than groups) and compare bit for bit with
# the reference run in the same dtype (float32 sums, rounded once), which is what the kernels
# compute.

def _forced_grid_loader(grids: dict):
    """The emulated loader, with the grid of each kernel family named in ``grids`` replaced."""
    from tests import cuda_emulator

    class Loader(cuda_emulator.EmulatedLoader):
        def _launch(self, device_index, stream, kernel, grid, args):
            family = kernel.split("<")[0].split("::")[-1]
            super()._launch(device_index, stream, kernel, grids.get(family, grid), args)

    return Loader()


def _expand_inputs(B, N, C, G, dtype, layout):
    """(key_tokens [B, N, C], residual_tokens [B, G, C]) as views: contiguous, strided (padded
    token rows, residual tokens in the middle of a longer buffer), or misaligned (a channel
    offset of one element: the scalar path)."""
    if layout == "contiguous":
        return features((B, N, C), dtype), features((B, G, C), dtype)
    if layout == "strided":
        keys = features((B, N, C + 8), dtype)[..., :C]
        residual = features((B, G + 3, C), dtype)[:, 2:G + 2]
        return keys, residual
    assert layout == "misaligned"
    tokens = features((B, N + G, C + 1), dtype)[..., 1:]
    return tokens[:, :N], tokens[:, N:]


def _grad_keys_in_order(grad: torch.Tensor) -> torch.Tensor:
    """sum over t of grad[:, t] in increasing t, in float32: what expand_grad_keys_kernel adds."""
    acc = torch.zeros(grad[:, 0].shape, dtype=torch.float32)
    for t in range(grad.shape[1]):
        acc += grad[:, t].float()
    return acc.to(grad.dtype)


EXPAND_WALK = [
    # (id, B, N, C, T, fpt, keys, layout): B * N * C / V items, most cases more than one block holds
    ("fpt3-short-last-group", 4, 29, 48, 8, 3, [0, 3, 7, 5], "contiguous"),
    ("fpt1-key-middle", 3, 29, 40, 6, 1, [2, 5, 0], "strided"),
    ("fpt2-strided", 3, 17, 56, 7, 2, [6, 1, 4], "strided"),
    ("fpt4-misaligned-scalar", 2, 13, 21, 9, 4, [4, 8], "misaligned"),
    ("one-frame", 3, 29, 48, 1, 1, [0, 0, 0], "contiguous"),
    ("two-frames", 2, 29, 48, 2, 1, [1, 0], "misaligned"),
    ("fpt-longer-than-video", 2, 29, 48, 5, 7, [3, 0], "contiguous"),
]
# (x, y, z) or None for the launcher's own grid; z > 1 only where G < 2^31, as the launcher does.
EXPAND_GRIDS = [None, (1, 1, 1), (1, 1, 2), (3, 1, 3), (2, 1, 5)]
# float32 on every grid; bfloat16 (8-element vectors) on the launcher's and on a striding one.
EXPAND_WALK_PARAMS = [
    pytest.param(case, grid, dtype,
                 id=f"{case[0]}-{'launcher' if grid is None else 'x'.join(map(str, grid))}-{DTYPE_ID(dtype)}")
    for case in EXPAND_WALK for grid in EXPAND_GRIDS for dtype in (torch.float32, torch.bfloat16)
    if dtype == torch.float32 or grid in (None, (2, 1, 5))
]


@pytest.mark.parametrize("case, grid, dtype", EXPAND_WALK_PARAMS)
def test_emulated_expand_walk_matches_reference(emulated, monkeypatch, case, grid, dtype):
    _, B, N, C, T, fpt, keys, layout = case
    G = reference.num_groups(T, fpt)
    loader = _forced_grid_loader({} if grid is None else {"expand_fwd_kernel": grid,
                                                          "expand_grad_keys_kernel": grid[:1]})
    monkeypatch.setattr(emulated, "_loader", lambda: loader)
    key_tokens, residual_tokens = _expand_inputs(B, N, C, G, dtype, layout)
    key_index = torch.tensor(keys)
    frames = emulated.expand_fwd(key_tokens, residual_tokens, key_index, T, fpt)
    [(kernel, launched)] = [launch for launch in loader.launches if "expand_fwd" in launch[0]]
    vec = 16 // key_tokens.element_size()
    assert kernel.endswith(f", {1 if layout == 'misaligned' else vec}>")
    if grid is not None:
        assert launched == grid
    assert torch.equal(frames, reference.expand(key_tokens, residual_tokens, key_index, T, fpt))
    assert_close(frames, reference.expand(key_tokens.double(), residual_tokens.double(), key_index, T, fpt),
                 dtype, "expand")

    grad = features((B, T, N, C), dtype)
    grad_keys, grad_res = emulated.expand_bwd(grad, key_index, G, fpt)
    assert torch.equal(grad_keys, _grad_keys_in_order(grad))
    if G:
        k64 = key_tokens.double().requires_grad_(True)
        r64 = residual_tokens.double().requires_grad_(True)
        ref = reference.expand(k64, r64, key_index, T, fpt)
        _, ref_gr = torch.autograd.grad(ref, [k64, r64], grad.double())
        assert_close(grad_res, ref_gr, dtype, "expand grad residual")


def test_expand_forward_grid_spreads_groups_only_while_blocks_are_few():
    """expand.cu expand_fwd_grid, as the CuPy loader mirrors it: the key tokens' vectors on x
    (flat_blocks: at most 4096 blocks, which the kernel's 32-bit split of its first item
    relies on); groups on z only while x is under one wave of resident blocks on an H100, and
    only for G < 2^31 (the kernel's 32-bit chunk size)."""
    grid = cuda_nvrtc.expand_fwd_grid
    assert grid(8 * 729 * 1152 // 8, 15) == (3281, 1, 1)  # SigLIP, bf16: one item per thread
    assert grid(2 * 11 * 3, 3) == (1, 1, 3)
    assert grid(100 * 256, 40) == (100, 1, 11)  # ceil(1056 / 100) chunks
    assert grid(100 * 256, 1) == (100, 1, 1)
    assert grid(7, 2**31 - 1) == (1, 1, cuda_nvrtc.EXPAND_FILL_BLOCKS)
    assert grid(7, 2**31) == (1, 1, 1)
    assert grid(2**40, 2**40) == (4096, 1, 1)
    fields = dict(key_tokens=4096, key_stride_b=729 * 1152, key_stride_n=1152, residual_tokens=8192,
                  res_stride_b=15 * 1152, res_stride_g=1152, batch=2, num_frames=16, num_patches=729,
                  channels=1152, num_groups=15, frames_per_token=1, key_index=64, dtype=2, frames=16384)
    [(kernel, launched, _)] = cuda_nvrtc.expand_fwd_launches(fields)
    assert kernel == "vtok::cuda::expand_fwd_kernel<vtok::cuda::bf16_t, 8>"
    assert launched == (821, 1, 2)  # 2 * 729 * 144 vectors; ceil(1056 / 821) chunks
    [(kernel, launched, _)] = cuda_nvrtc.expand_fwd_launches(dict(fields, frames=16386))
    assert kernel.endswith(", 1>") and launched == (4096, 1, 1)


# ------------------------------------------------------------------ CPU: the forward's tiles and group chunks, emulated
#
# On 16-byte rows a forward block holds one tile of patch rows (its key rows in registers) for
# groups_per_block consecutive groups; each tile of a frame leaves a partial row per group,
# which residual_fwd_kernel in its merge mode folds in tile order. FILL_SMS (the SMs whose two
# waves the grid aims at) is lowered so that the small shapes below reach several groups per
# block; 0 puts every group of a video in one block.

FORWARD_SPLITS = [
    # (id, lengths (batched: [T] * B), N, C, pool, heads, fpt, fill_sms, dtype,
    #  (splits, groups_per_block, chunks) the plan must come to)
    ("mean-chunks-ragged-tiles-ragged", [6, 6], 150, 64, "mean", 1, 1, 2, torch.bfloat16, (3, 2, 3)),
    ("mean-every-group-per-block", [6, 6], 150, 64, "mean", 1, 1, 0, torch.bfloat16, (3, 5, 1)),
    ("mean-one-group-per-block", [6, 6], 150, 64, "mean", 1, 1, 132, torch.bfloat16, (3, 1, 5)),
    # groups of 3, 3, 3 and 2 frames, the short one after another in its block
    ("mean-fpt3-short-last-group", [12, 12], 100, 32, "mean", 1, 3, 0, torch.float32, (2, 4, 1)),
    ("attn-merge-across-tiles", [5, 5], 300, 64, "attn", 2, 1, 1, torch.bfloat16, (3, 4, 1)),
    ("attn-chunks-ragged-fpt2", [11, 11, 11], 300, 64, "attn", 2, 2, 6, torch.float32, (5, 4, 2)),
    ("attn-one-tile", [7, 7], 40, 48, "attn", 3, 2, 0, torch.float16, (1, 3, 1)),
    # videos of 2, 0, 5 and 4 groups: only the third has a group in chunk 1
    ("varlen-mean-chunks", [3, 1, 6, 5], 70, 64, "mean", 1, 1, 2, torch.bfloat16, (2, 4, 2)),
    ("varlen-attn-every-group", [3, 1, 6, 5], 300, 64, "attn", 4, 2, 0, torch.bfloat16, (2, 3, 1)),
    # attention compiled for each count of vectors per lane (K), the rows' reduce-scatter at each
    # number of rounds: heads of 72 (9 vectors over 4 lanes of 3: three slots hold no vector) with
    # a short last tile, one and two frames per token
    ("attn-K3-head72-uneven-tail", [5, 5], 150, 144, "attn", 2, 1, 0, torch.bfloat16, (3, 4, 1)),
    ("attn-K3-head72-fpt2", [8, 8], 150, 144, "attn", 2, 2, 1, torch.float16, (3, 4, 1)),
    ("attn-K3-fp32-head48", [6, 6], 70, 96, "attn", 2, 1, 2, torch.float32, (2, 4, 2)),
    # one vector per head: a lane per row, 5 rounds, the second tile short of rows
    ("attn-K1-head8-tail", [4, 4], 300, 16, "attn", 2, 2, 0, torch.bfloat16, (2, 2, 1)),
    ("attn-K2-fp32-lanes8-tail", [4, 4], 100, 128, "attn", 2, 1, 0, torch.float32, (4, 3, 1)),
    # a head of 96 vectors: 32 lanes per row, no round
    ("attn-K3-lanes32", [3, 3], 20, 768, "attn", 1, 1, 0, torch.bfloat16, (3, 2, 1)),
    # segments of one vector: mean pooling holds 2 per lane, of which one is not the lane's
    ("mean-one-vector-segments", [4, 4], 300, 8, "mean", 1, 1, 0, torch.bfloat16, (2, 3, 1)),
]


def _forward_split_case(emulated, monkeypatch, case, fill_sms=None, dtype=None, design="tiles"):
    """(sequence, lse, reference sequence, reference lse, (launches, pooling plans)) of one
    FORWARD_SPLITS (or WARP_SPLITS, design "warps") case, after checking its residual tokens
    against the reference."""
    _, lengths, N, C, pool, heads, fpt, fill, case_dtype, _ = case
    dtype = dtype or case_dtype
    monkeypatch.setattr(cuda_nvrtc, "FILL_SMS", fill if fill_sms is None else fill_sms)
    monkeypatch.setenv("VTOK_CUDA_FWD", design)
    varlen = case[0].startswith("varlen")
    gen = torch.Generator().manual_seed(sum(lengths) * N + C)  # the same data for every fill_sms
    query = torch.randn(C, generator=gen) if pool == "attn" else None
    keys = torch.tensor([int(torch.randint(0, t, (1,), generator=gen)) for t in lengths])
    loader = emulated._loader()
    plans = []
    launch = loader._launch

    def recording(device_index, stream, kernel, grid, args):
        if ("residual_fwd_kernel" in kernel and not kernel.endswith(", 3, 0>")) or "warp_pool_kernel" in kernel:
            plan = args[1].reshape(-1)[0]
            plans.append((kernel, tuple(int(g) for g in grid), int(plan["splits"]), int(plan["groups_per_block"])))
        launch(device_index, stream, kernel, grid, args)

    monkeypatch.setattr(loader, "_launch", recording)
    first = len(loader.launches)
    if varlen:
        x = features((sum(lengths), N, C), dtype, generator=gen)
        cu_frames = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
        groups = [reference.num_groups(t, fpt) for t in lengths]
        cu_tokens = torch.tensor([0] + torch.tensor([N + g for g in groups]).cumsum(0).tolist())
        seq, lse, *_ = emulated.encode_varlen_fwd(x, cu_frames, cu_tokens, keys, query, pool, heads, fpt,
                                                  [], [], max(lengths), int(cu_tokens[-1]))
        ref, _, ref_lse = reference.encode_varlen(x.double(), cu_frames, keys, pool=pool, num_heads=heads,
                                                  query=None if query is None else query.double(),
                                                  frames_per_token=fpt, return_lse=True)
    else:
        x = features((len(lengths), lengths[0], N, C), dtype, generator=gen)
        seq, lse, *_ = emulated.encode_fwd(x, keys, query, pool, heads, fpt, [], [])
        ref, ref_lse = reference.encode(x.double(), keys, pool=pool, num_heads=heads,
                                        query=None if query is None else query.double(), frames_per_token=fpt,
                                        return_lse=True)
    # The residual tokens apart from the key tokens, whose norm would hide their errors.
    if varlen:
        residual = torch.ones(seq.shape[0], dtype=torch.bool)
        for start in cu_tokens[:-1].tolist():
            residual[start:start + N] = False
    else:
        residual = (slice(None), slice(N, None))
    assert_close(seq[residual], ref[residual].to(dtype), dtype, "residual tokens")
    return seq, lse, ref, ref_lse, (loader.launches[first:], plans)


@pytest.mark.parametrize("case", FORWARD_SPLITS, ids=[c[0] for c in FORWARD_SPLITS])
def test_emulated_forward_tiles_and_chunks_match_reference(emulated, monkeypatch, case):
    seq, lse, ref, ref_lse, (launches, plans) = _forward_split_case(emulated, monkeypatch, case)
    _, lengths, N, C, pool, heads, fpt, fill, dtype, (splits, per_block, chunks) = case
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    lanes, k, _, segments = cuda_nvrtc.plan_segments_fwd(C, vec, pool == "attn", heads)
    # The case reaches what it is named for: the 16-byte path, its tiles (the last one short of
    # rows where N is not a multiple), its groups per block and chunks (the last one short of
    # groups where they do not divide), and the merge launch after the pooling.
    [(kernel, grid, planned_splits, planned_per_block)] = plans
    assert kernel.endswith(f", {vec}, 1, {k}>" if pool == "attn" else f", {vec}, 0, {cuda_nvrtc.FWD_VECS}>")
    assert (planned_splits, planned_per_block, grid) == (splits, per_block, (splits * segments, chunks, len(lengths)))
    assert -(-N // (256 // lanes)) == splits
    assert -(-max(reference.num_groups(t, fpt) for t in lengths) // per_block) == chunks
    assert any(k.endswith(f"{vec}, 3, 0>") for k, _ in launches)
    assert_close(seq, ref.to(dtype), dtype, "sequence")
    if pool == "attn":
        assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")


@pytest.mark.parametrize("case", [c for c in FORWARD_SPLITS if c[0] in ("mean-chunks-ragged-tiles-ragged",
                                                                         "attn-chunks-ragged-fpt2",
                                                                         "varlen-mean-chunks")],
                         ids=lambda c: c[0])
def test_emulated_forward_bits_do_not_depend_on_groups_per_block(emulated, monkeypatch, case):
    """Which block pools a group changes with the grid; the order of every sum does not (float32,
    where a different order shows in the last bits)."""
    runs = [_forward_split_case(emulated, monkeypatch, case, fill_sms, torch.float32) for fill_sms in (0, 1, 132)]
    assert len({run[4][1][0][3] for run in runs}) > 1  # several groups per block, and fewer
    results = [run[:2] for run in runs]
    for seq, lse in results[1:]:
        assert torch.equal(seq, results[0][0]) and torch.equal(lse, results[0][1])


WARP_SPLITS = [
    # (id, frames per video, N, C, pool, heads, frames_per_token, FILL_SMS, dtype,
    #  (splits, groups per warp, chunks)); varlen when the id says so
    # chunks of 2 groups, the last one short; rows in passes of 8 (4 lanes), the last one short
    ("mean-chunks-of-2", [6, 6], 150, 64, "mean", 1, 1, 0, torch.bfloat16, (1, 2, 3)),
    ("mean-fp32-chunks-of-4", [6, 6], 150, 32, "mean", 1, 1, 0, torch.float32, (1, 4, 2)),
    ("mean-splits-of-64-rows", [6, 6], 150, 512, "mean", 1, 1, 2, torch.bfloat16, (2, 2, 3)),
    ("mean-fp16-lanes-idle", [5, 5], 37, 40, "mean", 1, 1, 0, torch.float16, (1, 2, 2)),
    ("attn-K2-chunks-of-2", [8, 8], 100, 128, "attn", 2, 1, 0, torch.bfloat16, (1, 2, 4)),
    ("attn-K3-head72-fpt2-splits", [8, 8], 150, 144, "attn", 2, 2, 1, torch.bfloat16, (2, 1, 4)),
    ("attn-K1-head8-fpt3-short-group", [11, 11], 37, 16, "attn", 2, 3, 0, torch.bfloat16, (1, 4, 1)),
    ("attn-K3-fp32-splits-of-16-rows", [6, 6], 70, 96, "attn", 2, 1, 2, torch.float32, (4, 1, 5)),
    ("attn-K3-lanes32", [3, 3], 20, 768, "attn", 1, 1, 0, torch.bfloat16, (1, 1, 2)),
    # videos of 2, 0, 5 and 4 groups: only the third has a group in chunk 2
    ("varlen-mean-chunks", [3, 1, 6, 5], 70, 64, "mean", 1, 1, 0, torch.bfloat16, (1, 2, 3)),
    ("varlen-attn-K1-fpt2-splits", [3, 1, 6, 5], 300, 32, "attn", 4, 2, 1, torch.bfloat16, (2, 3, 1)),
]


@pytest.mark.parametrize("case", WARP_SPLITS, ids=[c[0] for c in WARP_SPLITS])
def test_emulated_forward_warp_splits_match_reference(emulated, monkeypatch, case):
    """The warp-split forward (VTOK_CUDA_FWD=warps): each case reaches the grid it is named for
    (splits of the rows, groups per warp, the last chunk or row pass short) and the merge launch
    after it, with the reference's residual tokens and lse."""
    seq, lse, ref, ref_lse, (launches, plans) = _forward_split_case(emulated, monkeypatch, case, design="warps")
    _, lengths, N, C, pool, heads, fpt, fill, dtype, (splits, per_warp, chunks) = case
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    lanes, k, _, segments = cuda_nvrtc.plan_segments_fwd(C, vec, pool == "attn", heads)
    [(kernel, grid, planned_splits, planned_per_warp)] = plans
    named_k = re.search(r"-K(\d)-", case[0])
    assert named_k is None or int(named_k.group(1)) == k
    assert kernel == cuda_nvrtc.warp_pool_kernel(kernel.split("<")[1].split(",")[0], vec, pool == "attn", k)
    assert (planned_splits, planned_per_warp) == (splits, per_warp)
    assert grid == (-(-len(lengths) * segments * chunks * splits // 8),)
    assert -(-max(reference.num_groups(t, fpt) for t in lengths) // per_warp) == chunks
    assert any(k.endswith(f"{vec}, 3, 0>") for k, _ in launches)
    assert_close(seq, ref.to(dtype), dtype, "sequence")
    if pool == "attn":
        assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")


@pytest.mark.parametrize("case", [
    # float32, where a different order of the sums shows in the last bits; FILL_SMS 0 and 1 give
    # the same splits and 4, then 2 (attn) or 1 (mean) groups per warp
    ("attn-K2", [16, 16], 60, 64, "attn", 2, 1, 0, torch.float32, None),
    ("mean", [16, 16], 60, 32, "mean", 1, 1, 0, torch.float32, None),
], ids=lambda c: c[0])
def test_emulated_warp_split_bits_do_not_depend_on_groups_per_warp(emulated, monkeypatch, case):
    """Which warp pools a group changes with the fill; the order of every sum does not while the
    splits stay."""
    runs = [_forward_split_case(emulated, monkeypatch, case, fill_sms, None, "warps") for fill_sms in (0, 1)]
    plans = [run[4][1][0] for run in runs]
    assert plans[0][2] == plans[1][2] and plans[0][3] > plans[1][3], plans  # same splits, fewer groups per warp
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("jumps", [(12.0,), (100.0,), (100.0, 200.0)], ids=["e12", "e100", "e100-e200"])
def test_emulated_warp_split_rescales_when_a_later_row_dominates(emulated, monkeypatch, jumps):
    """warp_pool keeps its running maximum until a score reaches it plus kRescaleMargin (e^8):
    rows whose scores jump past it late in a split (in later passes, after the maximum settled)
    take the rescale, and the tokens and lse still match the reference. A jump of 100 or 200
    would overflow a float weight (e^88) on the path that keeps the maximum: only a rescale
    passes."""
    monkeypatch.setenv("VTOK_CUDA_FWD", "warps")
    monkeypatch.setattr(cuda_nvrtc, "FILL_SMS", 0)  # one split: 70 rows in passes of a few
    B, T, N, C, heads = 2, 4, 70, 64, 2
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    x = features((B, T, N, C), torch.float32, generator=gen)
    query = torch.randn(C, generator=gen)
    keys = torch.tensor([0, 2])
    head_dim = C // heads
    # A row's residual along its head's query: score = jump (natural-log units) above ~0.
    unit = query.view(heads, head_dim) / query.view(heads, head_dim).norm(dim=1, keepdim=True)
    per_score = (query.view(heads, head_dim).norm(dim=1) / head_dim ** 0.5).view(heads, 1)
    for b in range(B):
        for t in range(T):
            if t == int(keys[b]):
                continue
            for n, jump in zip((N // 2, N - 3), jumps):
                x[b, t, n] = x[b, keys[b], n] + (jump / per_score * unit).reshape(C)
    seq, lse, *_ = emulated.encode_fwd(x, keys, query, "attn", heads, 1, [], [])
    ref, ref_lse = reference.encode(x.double(), keys, pool="attn", num_heads=heads, query=query.double(),
                                    return_lse=True)
    assert_close(seq[:, N:], ref[:, N:].float(), torch.float32, "residual tokens")
    assert_close(lse, ref_lse.float(), torch.float32, "lse")
