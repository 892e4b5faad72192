"""The cpu backend beyond the shared parity suite: float64 gradcheck of every op through the
backend functions, odd shapes, strided inputs read in place, bitwise determinism across runs and
thread counts, every instruction-set variant, and argument checks in the C++ launchers."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vtok_kernels import _extension, reference
from tests.utils import TOLERANCE, assert_close, features

pytestmark = pytest.mark.skipif(
    _extension.get() is None, reason=f"cpu backend: {_extension.unavailable_reason()}"
)

if _extension.get() is not None:
    from vtok_kernels.backends import cpu


def _options(pool="mean", num_heads=1, frames_per_token=1, spatial=(), grid=()):
    return dict(pool=pool, num_heads=num_heads, frames_per_token=frames_per_token,
                spatial=tuple(spatial), grid=tuple(grid))


def _keys(key_index, B, T):
    """The normalised key_index [B] the backend functions take."""
    return torch.tensor(reference.normalize_keys(key_index, [T] * B), dtype=torch.int64)


def _query(C, pool, dtype=torch.float32):
    return torch.randn(C, dtype=dtype) if pool == "attn" else None


def _ref_options(opts):
    return dict(pool=opts["pool"], num_heads=opts["num_heads"],
                frames_per_token=opts["frames_per_token"],
                spatial=opts["spatial"] or None, grid=opts["grid"] or None)


class _Encode(torch.autograd.Function):
    """encode through the cpu backend functions alone (no torch.library op in between)."""

    @staticmethod
    def forward(ctx, x, key_index, query, opts):
        sequence, lse = cpu.encode_fwd(x, key_index, query, **opts)
        ctx.save_for_backward(x, key_index, sequence, lse)
        ctx.query, ctx.opts = query, opts
        return sequence

    @staticmethod
    def backward(ctx, grad_sequence):
        x, key_index, sequence, lse = ctx.saved_tensors
        grad_x, _ = cpu.encode_bwd(grad_sequence, x, key_index, ctx.query, sequence, lse,
                                   **ctx.opts)
        return grad_x, None, None, None


class _EncodeVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cu_frames, cu_tokens, key_index, query, opts, max_frames):
        total = int(cu_tokens[-1])
        sequence, lse = cpu.encode_varlen_fwd(x, cu_frames, cu_tokens, key_index, query,
                                              max_frames=max_frames, total_tokens=total, **opts)
        ctx.save_for_backward(x, cu_frames, cu_tokens, key_index, sequence, lse)
        ctx.query, ctx.opts, ctx.max_frames = query, opts, max_frames
        return sequence

    @staticmethod
    def backward(ctx, grad_sequence):
        x, cu_frames, cu_tokens, key_index, sequence, lse = ctx.saved_tensors
        grad_x, _ = cpu.encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index,
                                          ctx.query, sequence, lse, max_frames=ctx.max_frames,
                                          **ctx.opts)
        return grad_x, None, None, None, None, None, None


class _Expand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key_tokens, residual_tokens, key_index, num_frames, frames_per_token):
        ctx.save_for_backward(key_index)
        ctx.num_residual, ctx.frames_per_token = residual_tokens.shape[1], frames_per_token
        return cpu.expand_fwd(key_tokens, residual_tokens, key_index, num_frames, frames_per_token)

    @staticmethod
    def backward(ctx, grad_frames):
        (key_index,) = ctx.saved_tensors
        grad_key, grad_res = cpu.expand_bwd(grad_frames.contiguous(), key_index, ctx.num_residual,
                                            ctx.frames_per_token)
        return grad_key, grad_res, None, None, None


GRADCHECK_ENCODE = [
    pytest.param((2, 4, 6, 6), dict(pool="mean"), 1, id="mean"),
    pytest.param((2, 5, 6, 6), dict(pool="mean", frames_per_token=3, spatial=(2, 2), grid=(2, 3)), 0,
                 id="mean-fpt3-spatial"),
    pytest.param((2, 4, 5, 6), dict(pool="attn", num_heads=2), -1, id="attn"),
    pytest.param((1, 6, 6, 9), dict(pool="attn", num_heads=3, frames_per_token=2, spatial=(2, 2),
                                    grid=(3, 2)), 2, id="attn-fpt2-spatial-overlap"),
]


@pytest.mark.parametrize("shape,opts,key", GRADCHECK_ENCODE)
def test_gradcheck_encode(shape, opts, key):
    opts = _options(**opts)
    B, T, N, C = shape
    x = features(shape, torch.float64).requires_grad_(True)
    keys = _keys(key, B, T)
    query = _query(C, opts["pool"])
    assert torch.autograd.gradcheck(lambda x: _Encode.apply(x, keys, query, opts), (x,))


@pytest.mark.parametrize("opts", [
    _options(pool="attn", num_heads=2, frames_per_token=2),
    _options(pool="mean", frames_per_token=2, spatial=(1, 2), grid=(2, 2)),
], ids=["attn-fpt2", "mean-fpt2-spatial"])
def test_gradcheck_encode_varlen(opts):
    lengths, N, C = [3, 1, 4], 4, 6
    cu_frames = torch.tensor([0, 3, 4, 8], dtype=torch.int64)
    groups = [reference.num_groups(t, 2) for t in lengths]
    S = opts["spatial"][0] * opts["spatial"][1] if opts["spatial"] else N
    cu_tokens = torch.tensor([0] + torch.tensor([S + g for g in groups]).cumsum(0).tolist())
    keys = torch.tensor([2, 0, 1], dtype=torch.int64)
    x = features((sum(lengths), N, C), torch.float64).requires_grad_(True)
    query = _query(C, opts["pool"])
    assert torch.autograd.gradcheck(
        lambda x: _EncodeVarlen.apply(x, cu_frames, cu_tokens, keys, query, opts, max(lengths)), (x,))


@pytest.mark.parametrize("frames_per_token", [1, 2])
def test_gradcheck_expand(frames_per_token):
    B, T, N, C = 2, 5, 3, 4
    G = reference.num_groups(T, frames_per_token)
    key_tokens = features((B, N, C), torch.float64).requires_grad_(True)
    residual = features((B, G, C), torch.float64).requires_grad_(True)
    keys = torch.tensor([0, 3])
    assert torch.autograd.gradcheck(
        lambda k, r: _Expand.apply(k, r, keys, T, frames_per_token), (key_tokens, residual))


@pytest.mark.parametrize("spatial,grid", [((), ()), ((2, 2), (3, 2))])
def test_grad_query_float64(spatial, grid):
    """grad_query is float32 by contract (the query is), so it is compared, not gradchecked."""
    opts = _options(pool="attn", num_heads=3, frames_per_token=2, spatial=spatial, grid=grid)
    B, T, N, C = 2, 5, 6, 9
    x = features((B, T, N, C), torch.float64)
    keys = torch.tensor([1, 4])
    query = _query(C, "attn")
    sequence, lse = cpu.encode_fwd(x, keys, query, **opts)
    grad_seq = torch.randn_like(sequence)
    _, grad_query = cpu.encode_bwd(grad_seq, x, keys, query, sequence, lse, **opts)
    q64 = query.double().requires_grad_(True)
    out = reference.encode(x, keys, query=q64, **_ref_options(opts))
    (ref,) = torch.autograd.grad(out, [q64], grad_seq)
    assert_close(grad_query, ref, torch.float32, "grad query")


def _check_encode(x, keys, query, opts, dtype=torch.float32):
    """Forward and backward of the cpu backend against the float64 reference on the same x."""
    sequence, lse = cpu.encode_fwd(x, keys, query, **opts)
    grad_seq = torch.randn(sequence.shape).to(x.dtype)
    grad_x, grad_query = cpu.encode_bwd(grad_seq, x, keys, query, sequence, lse, **opts)
    x64 = x.detach().double().requires_grad_(True)
    q64 = query.double().requires_grad_(True) if query is not None else None
    ref = reference.encode(x64, keys, query=q64, **_ref_options(opts))
    inputs = [x64] + ([q64] if q64 is not None else [])
    grads = torch.autograd.grad(ref, inputs, grad_seq.double(), allow_unused=True)
    assert_close(sequence, ref.detach(), dtype, "sequence")
    assert_close(grad_x, grads[0], dtype, "grad x")
    if query is not None and grads[1] is not None:
        assert_close(grad_query, grads[1], dtype, "grad query")
    return sequence, grad_x


ODD_SHAPES = [
    pytest.param((1, 3, 1, 3), _options(), id="N1-C3-mean"),
    pytest.param((1, 3, 1, 3), _options(pool="attn", num_heads=3), id="N1-C3-attn-headdim1"),
    pytest.param((2, 1, 5, 6), _options(pool="attn", num_heads=2), id="T1"),
    pytest.param((1, 2, 17, 33), _options(pool="attn", num_heads=3), id="one-video-N17-C33"),
    pytest.param((3, 7, 35, 10), _options(pool="attn", num_heads=5, frames_per_token=4,
                                          spatial=(3, 4), grid=(5, 7)), id="fpt4-ragged-spatial"),
]


@pytest.mark.parametrize("shape,opts", ODD_SHAPES)
def test_odd_shapes(shape, opts):
    B, T, N, C = shape
    _check_encode(features(shape, torch.float32), _keys(-1, B, T), _query(C, opts["pool"]), opts)


VIEWS = {
    "frames::3": lambda x: x[:, ::3],
    "patches::2": lambda x: x[:, :, ::2],
    "batch-and-frames": lambda x: x[1:, 1::2],
    "channels-last-of-wider": lambda x: x[..., 2:14],
    "transposed-frames-patches": lambda x: x.transpose(1, 2),
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_strided_inputs_read_in_place(view, pool):
    base = features((3, 10, 8, 16), torch.float32)
    x = VIEWS[view](base)
    assert not x.is_contiguous() and x.stride(-1) == 1
    B, T, N, C = x.shape
    opts = _options(pool=pool, num_heads=2 if pool == "attn" else 1, frames_per_token=2)
    keys = _keys(1, B, T)
    query = _query(C, pool)
    sequence, grad_x = _check_encode(x, keys, query, opts)
    contiguous, _ = cpu.encode_fwd(x.contiguous(), keys, query, **opts)
    assert torch.equal(sequence, contiguous), "a strided x must give the bits of its copy"
    assert grad_x.is_contiguous() and grad_x.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_bitwise_deterministic_runs_and_thread_counts(pool, dtype):
    opts = _options(pool=pool, num_heads=4 if pool == "attn" else 1, frames_per_token=2,
                    spatial=(3, 4), grid=(6, 10))
    # Large enough (> 2**16 elements) that the kernels do use two threads.
    B, T, N, C = 3, 9, 60, 48
    x = features((B, T, N, C), dtype)
    keys = torch.tensor([0, 4, 8])
    query = _query(C, pool)
    grad_seq = None
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2, 2):
            torch.set_num_threads(num_threads)
            sequence, lse = cpu.encode_fwd(x, keys, query, **opts)
            if grad_seq is None:
                grad_seq = torch.randn(sequence.shape).to(dtype)
            grad_x, grad_query = cpu.encode_bwd(grad_seq, x, keys, query, sequence, lse, **opts)
            results.append((sequence, lse, grad_x, grad_query))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or torch.equal(a, b)


def test_expand_deterministic_and_exact():
    B, T, N, C = 2, 6, 19, 7
    key_tokens = features((B, N, C), torch.float32)
    residual = features((B, 5, C), torch.float32)
    keys = torch.tensor([2, 5])
    frames = cpu.expand_fwd(key_tokens, residual, keys, T, 1)
    assert torch.equal(frames, reference.expand(key_tokens, residual, keys, T, 1))
    grad = torch.randn_like(frames)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = cpu.expand_bwd(grad, keys, 5, 1)
        torch.set_num_threads(2)
        second = cpu.expand_bwd(grad, keys, 5, 1)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_mean_round_trip_through_expand():
    """encode(expand(K, R)) == (K, R) for mean pooling, frames_per_token = 1 (DESIGN section 2)."""
    B, T, N, C = 2, 5, 9, 12
    K, R = features((B, N, C), torch.float64), features((B, T - 1, C), torch.float64)
    keys = torch.tensor([0, 2])
    frames = cpu.expand_fwd(K, R, keys, T, 1)
    sequence, _ = cpu.encode_fwd(frames, keys, None, **_options())
    assert torch.allclose(sequence[:, :N], K) and torch.allclose(sequence[:, N:], R)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_non_finite_values_propagate_as_in_the_reference(pool, value):
    x = features((2, 4, 5, 8), torch.float32)
    x[0, 2, 3, 1] = value
    keys = torch.tensor([0, 1])
    query = _query(8, pool)
    opts = _options(pool=pool, num_heads=2 if pool == "attn" else 1)
    sequence, _ = cpu.encode_fwd(x, keys, query, **opts)
    ref = reference.encode(x, keys, query=query, **_ref_options(opts))
    assert torch.equal(torch.isnan(sequence), torch.isnan(ref))
    assert torch.equal(torch.isinf(sequence), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert_close(sequence[finite], ref[finite], torch.float32, "finite elements")


def test_launcher_rejects_bad_params():
    """The C++ launchers refuse inconsistent params with ValueError, never a crash."""
    from vtok_kernels.backends import _params

    x = features((1, 3, 4, 6), torch.float32)
    keys = torch.zeros(1, dtype=torch.int64)
    sequence = torch.empty(1, 6, 6)
    lse = torch.empty(1, 2, 4)
    p = _params.encode_params(x, keys, torch.randn(6), "attn", 4, 1, (), (), sequence, lse)
    with pytest.raises(ValueError, match="num_heads"):
        _extension.get().cpu_encode_fwd(p, 1)
    p = _params.encode_params(x, keys, None, "mean", 1, 1, (), (), sequence, lse)
    p.num_groups = 5
    with pytest.raises(ValueError, match="num_groups"):
        _extension.get().cpu_encode_fwd(p, 1)
    p.num_groups, p.x = 2, 0
    with pytest.raises(ValueError, match="must be set"):
        _extension.get().cpu_encode_fwd(p, 1)


_VARIANT_CHECK = textwrap.dedent("""
    import torch
    from vtok_kernels import _extension, reference
    from vtok_kernels.backends import cpu
    assert _extension.get().cpu_isa() == "{isa}", _extension.get().cpu_isa()
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        x = torch.randn(2, 5, 13, 24).to(dtype)
        keys, q = torch.tensor([0, 3]), torch.randn(24)
        opts = dict(pool="attn", num_heads=3, frames_per_token=2, spatial=(), grid=())
        seq, lse = cpu.encode_fwd(x, keys, q, **opts)
        g = torch.randn(seq.shape).to(dtype)
        gx, gq = cpu.encode_bwd(g, x, keys, q, seq, lse, **opts)
        x64 = x.double().requires_grad_(True)
        ref = reference.encode(x64, keys, query=q.double(), pool="attn", num_heads=3, frames_per_token=2)
        (rgx,) = torch.autograd.grad(ref, [x64], g.double())
        for out, r in ((seq, ref.detach()), (gx, rgx)):
            err = ((out.double() - r).norm() / r.norm()).item()
            assert err <= tol, (dtype, err)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_instruction_set_variants(isa):
    """Every compiled variant is correct, not only the one this CPU picks."""
    module = _extension.get()
    if isa not in module.cpu_isas_compiled.split(","):
        pytest.skip(f"{isa} variant not compiled on this platform")
    if isa == "avx2" and module.cpu_isa() == "baseline":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, VTOK_CPU_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _VARIANT_CHECK.format(isa=isa)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


_EXP_CHECK = r"""
#include "cpu/common.h"
#include <cmath>
#include <cstdio>
int main() {
  using vtok::cpu::exp_approx;
  double worst = 0;
  auto check = [&](float x) {
    const double want = std::exp(static_cast<double>(x));
    const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(want)) - 23);
    worst = std::fmax(worst, std::fabs(exp_approx(x) - want) / ulp);
  };
  // A fine grid over the whole range, and powers of two on both sides of 0.
  for (int i = 0; i <= 4000000; ++i) {
    const float x = -87.3f + static_cast<float>(i) * (175.6f / 4e6f);
    if (x <= 88.3f) check(x);  // above, e^88.3 by design
  }
  for (int k = 0; k < 40; ++k) {
    check(std::ldexp(1.0f, -k));
    check(-std::ldexp(1.0f, -k));
  }
  int bad = 0;
  bad += exp_approx(-INFINITY) != 0.0f;
  bad += exp_approx(-1000.0f) != 0.0f;
  bad += !std::isnan(exp_approx(NAN));
  bad += exp_approx(0.0f) != 1.0f;
  std::printf("%.3f %d\n", worst, bad);
  return 0;
}
"""


@pytest.mark.parametrize("flags", [["-O0"], ["-O3", "-mavx2", "-mfma", "-fopenmp-simd"]])
def test_exp_approx_within_two_ulp_of_exp(tmp_path, flags):
    """The CPU kernels' float softmax exponential (csrc/cpu/common.h), scalar and vectorised."""
    import shutil
    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    if "-mavx2" in flags and _extension.get().cpu_isa() == "baseline":
        pytest.skip("this CPU has no AVX2 to run the vectorised build on")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    source, binary = tmp_path / "exp_check.cpp", tmp_path / "exp_check"
    source.write_text(_EXP_CHECK)
    subprocess.run(["g++", "-std=c++17", *flags, f"-I{csrc}", f"-I{csrc / 'include'}",
                    str(source), "-o", str(binary)], check=True)
    worst_ulp, special_bad = subprocess.run([str(binary)], capture_output=True, text=True,
                                            check=True).stdout.split()
    assert float(worst_ulp) <= 2.0
    assert int(special_bad) == 0, "-inf and -1000 must give 0, NaN must stay NaN, 0 must give 1"


_HUGE_PAGE_CHECK = textwrap.dedent("""
    import torch
    from vtok_kernels.backends import cpu
    x = torch.randn(2, 8, 256, 1024)  # grad_x: 16 MiB, four or more whole 2 MiB pages
    keys = torch.zeros(2, dtype=torch.int64)
    sequence, lse = cpu.encode_fwd(x, keys, None, "mean", 1, 1, (), ())
    grad_x, _ = cpu.encode_bwd(torch.randn(sequence.shape), x, keys, None, sequence, lse,
                               "mean", 1, 1, (), ())
    inside = grad_x.data_ptr() + grad_x.numel() * grad_x.element_size() // 2
    mapping = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(v, 16) for v in head.split("-"))
            mapping = start <= inside < end
        elif head == "VmFlags:" and mapping:
            print("hinted" if "hg" in line.split()[1:] else "not hinted")
            break
""")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="needs Linux with transparent huge pages")
@pytest.mark.parametrize("setting,expected", [(None, "hinted"), ("0", "not hinted")])
def test_huge_page_hint_on_grad_x_and_its_switch(setting, expected):
    env = dict(os.environ)
    env.pop("VTOK_CPU_HUGE_PAGES", None)
    if setting is not None:
        env["VTOK_CPU_HUGE_PAGES"] = setting
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _HUGE_PAGE_CHECK], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == expected
