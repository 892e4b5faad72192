"""Every backend against the float64 reference: encode, encode_varlen and expand, forward and
backward, every dtype and option, at small odd shapes (N not a multiple of any block, C not a
power of two, T = 1, one video, strided inputs). Outputs are poisoned (conftest)."""
from __future__ import annotations

import pytest
import torch

import vtok_kernels as vk
from vtok_kernels import backends, reference
from tests.utils import LOW_PRECISION, assert_close, assert_one_patch_query_grad_vanishes, backend_device, features

BACKENDS = backends.KNOWN_BACKENDS
DTYPE_ID = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731


def _case(id, shape, pool="mean", num_heads=1, frames_per_token=1, key_index=0, spatial=None,
          grid=None, view=None):
    return pytest.param(
        dict(shape=shape, pool=pool, num_heads=num_heads, frames_per_token=frames_per_token,
             key_index=key_index, spatial=spatial, grid=grid, view=view),
        id=id,
    )


# view: how the test derives the kernel's input from a contiguous tensor of `shape`.
ENCODE_CASES = [
    _case("mean", (2, 5, 7, 12)),
    _case("attn-3heads", (2, 5, 7, 12), pool="attn", num_heads=3),
    _case("attn-fpt2-ragged", (2, 6, 7, 12), pool="attn", num_heads=1, frames_per_token=2),
    _case("mean-fpt3-lastkey", (1, 7, 5, 20), frames_per_token=3, key_index=-1),
    _case("attn-perkey", (3, 4, 13, 12), pool="attn", num_heads=2, key_index="tensor"),
    _case("mean-spatial", (2, 4, 12, 12), spatial=(2, 3), grid=(3, 4), key_index=1),
    _case("attn-spatial5d-overlap", (2, 4, 3, 5, 12), pool="attn", num_heads=4, spatial=(2, 3)),
    _case("attn-T1", (1, 1, 5, 12), pool="attn", num_heads=2),
    _case("mean-N1-C3", (2, 3, 1, 3)),
    _case("attn-headdim1", (2, 3, 1, 3), pool="attn", num_heads=3, key_index=-2),
    _case("attn-framestrided", (2, 9, 7, 12), pool="attn", num_heads=2, view="frames::2"),
    _case("mean-patchstrided", (2, 4, 14, 12), frames_per_token=2, view="patches::2"),
    _case("attn-batchsliced-fpt2", (3, 5, 7, 24), pool="attn", num_heads=4, frames_per_token=2,
          view="batch1:"),
]


def _derive(x: torch.Tensor, view):
    if view == "frames::2":
        return x[:, ::2]
    if view == "patches::2":
        return x[:, :, ::2]
    if view == "batch1:":
        return x[1:]
    return x


def _key(key_index, batch: int, num_frames: int, device):
    if key_index == "tensor":
        keys = torch.randint(-num_frames, num_frames, (batch,))
        return keys.to(device)
    return key_index


def _reference_grads(x, query, grad_seq, key_index, **options):
    """The reference in float64 on the same (already rounded) input values."""
    x64 = x.detach().double().requires_grad_(True)
    q64 = query.detach().double().requires_grad_(True) if query is not None else None
    out = reference.encode(x64, key_index, query=q64, **options)
    grads = _grads(out, [x64] + ([q64] if q64 is not None else []), grad_seq.double())
    return out.detach(), grads[0], (grads[1] if q64 is not None else None)


def _grads(out, inputs, grad):
    """autograd.grad where an unused input (the query when T = 1) gets zeros."""
    grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
@pytest.mark.parametrize("case", ENCODE_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_encode(backend, case, dtype):
    device = backend_device(backend)
    shape = case["shape"]
    leaf = features(shape, dtype, device).requires_grad_(True)
    x = _derive(leaf, case["view"])
    B, T = x.shape[:2]
    C = shape[-1]
    key_index = _key(case["key_index"], B, T, device)
    query = torch.randn(C, device=device, requires_grad=True) if case["pool"] == "attn" else None
    options = dict(pool=case["pool"], num_heads=case["num_heads"],
                   frames_per_token=case["frames_per_token"], spatial=case["spatial"], grid=case["grid"])
    x_before = leaf.detach().clone()

    out = vk.encode(x, key_index, query=query, backend=backend, **options)
    grad_seq = torch.randn(out.sequence.shape, device=device).to(dtype)
    out.sequence.backward(grad_seq)

    ref_seq, ref_gx, ref_gq = _reference_grads(x, query, grad_seq, key_index, **options)
    assert out.sequence.dtype == dtype and out.sequence.is_contiguous()
    S = out.key_tokens.shape[1]
    assert out.key_tokens.data_ptr() == out.sequence.data_ptr()
    assert out.residual_tokens.shape[1] == reference.num_groups(T, case["frames_per_token"])
    assert_close(out.sequence, ref_seq.to(dtype), dtype, f"{backend} sequence")
    grad_x = _derive(leaf.grad, case["view"])
    assert_close(grad_x, ref_gx, dtype, f"{backend} grad x")
    if case["view"]:  # the elements a view skips receive no gradient
        mask = torch.ones_like(leaf.grad, dtype=torch.bool)
        _derive(mask, case["view"]).fill_(False)
        assert (leaf.grad[mask] == 0).all()
    if query is not None:
        assert_close(query.grad, ref_gq, dtype, f"{backend} grad query")
    assert torch.equal(leaf.detach(), x_before), "encode modified its input"
    num_patches = x.shape[2:-1].numel()
    assert S == (case["spatial"][0] * case["spatial"][1] if case["spatial"] else num_patches)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_one_patch_query_gradient_vanishes(backend, dtype):
    device = backend_device(backend)
    x = features((2, 4, 1, 96), dtype, device).requires_grad_(True)
    query = torch.randn(96, device=device, requires_grad=True)
    keys = torch.randint(0, 4, (2,), device=device)
    out = vk.encode(x, keys, pool="attn", query=query, backend=backend)
    grad_seq = torch.randn(out.sequence.shape, device=device).to(dtype)
    (grad_query,) = torch.autograd.grad(out.sequence, [query], grad_seq)
    assert_one_patch_query_grad_vanishes(grad_query, x, grad_seq[:, 1:], 1, f"{backend} {dtype}")


VARLEN_CASES = [
    pytest.param(dict(lengths=[1, 4, 6], pool="mean", num_heads=1, frames_per_token=1, key_index=0,
                      spatial=None, grid=None, N=7), id="mean-onefamevideo"),
    pytest.param(dict(lengths=[3, 1, 5], pool="attn", num_heads=2, frames_per_token=2,
                      key_index="tensor", spatial=None, grid=None, N=9), id="attn-fpt2-perkey"),
    pytest.param(dict(lengths=[5], pool="attn", num_heads=3, frames_per_token=1, key_index=-1,
                      spatial=(2, 2), grid=(3, 3), N=9), id="attn-spatial-onevideo"),
    pytest.param(dict(lengths=[2, 7], pool="mean", num_heads=1, frames_per_token=3, key_index=1,
                      spatial=(1, 2), grid=(2, 5), N=10), id="mean-spatial-fpt3"),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
@pytest.mark.parametrize("case", VARLEN_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_varlen(backend, case, dtype):
    device = backend_device(backend)
    lengths, C = case["lengths"], 12
    F = sum(lengths)
    x = features((F, case["N"], C), dtype, device).requires_grad_(True)
    cu_frames = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    key_index = _key(case["key_index"], len(lengths), min(lengths), device)
    query = torch.randn(C, device=device, requires_grad=True) if case["pool"] == "attn" else None
    options = dict(pool=case["pool"], num_heads=case["num_heads"],
                   frames_per_token=case["frames_per_token"], spatial=case["spatial"], grid=case["grid"])

    out = vk.encode_varlen(x, cu_frames, key_index, query=query, backend=backend, **options)
    grad_seq = torch.randn(out.sequence.shape, device=device).to(dtype)
    out.sequence.backward(grad_seq)

    x64 = x.detach().double().requires_grad_(True)
    q64 = query.detach().double().requires_grad_(True) if query is not None else None
    ref_seq, ref_cu = reference.encode_varlen(x64, cu_frames, key_index, query=q64, **options)
    grads = _grads(ref_seq, [x64] + ([q64] if q64 is not None else []), grad_seq.double())
    assert torch.equal(out.cu_tokens.cpu(), ref_cu.cpu())
    assert out.sequence.is_contiguous() and out.sequence.dtype == dtype
    assert_close(out.sequence, ref_seq.detach().to(dtype), dtype, f"{backend} varlen sequence")
    assert_close(x.grad, grads[0], dtype, f"{backend} varlen grad x")
    if query is not None:
        assert_close(query.grad, grads[1], dtype, f"{backend} varlen grad query")


EXPAND_CASES = [
    pytest.param(dict(B=2, T=5, N=7, C=12, frames_per_token=1, key_index=0), id="fpt1"),
    pytest.param(dict(B=3, T=6, N=5, C=20, frames_per_token=2, key_index="tensor"), id="fpt2-perkey"),
    pytest.param(dict(B=1, T=7, N=1, C=3, frames_per_token=4, key_index=-1), id="N1-C3-ragged"),
    pytest.param(dict(B=2, T=1, N=6, C=12, frames_per_token=1, key_index=0), id="T1"),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_ID)
@pytest.mark.parametrize("case", EXPAND_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expand(backend, case, dtype):
    device = backend_device(backend)
    B, T, N, C, fpt = case["B"], case["T"], case["N"], case["C"], case["frames_per_token"]
    G = reference.num_groups(T, fpt)
    key_tokens = features((B, N, C), dtype, device).requires_grad_(True)
    residual = features((B, G, C), dtype, device).requires_grad_(True)
    key_index = _key(case["key_index"], B, T, device)

    frames = vk.expand(key_tokens, residual, key_index, T, fpt, backend=backend)
    grad = torch.randn(frames.shape, device=device).to(dtype)
    frames.backward(grad)

    k64 = key_tokens.detach().double().requires_grad_(True)
    r64 = residual.detach().double().requires_grad_(True)
    ref = reference.expand(k64, r64, key_index, T, fpt)
    ref_gk, ref_gr = _grads(ref, [k64, r64], grad.double())
    assert frames.is_contiguous() and frames.dtype == dtype
    assert_close(frames, ref.detach(), dtype, f"{backend} expand")
    assert_close(key_tokens.grad, ref_gk, dtype, f"{backend} expand grad key")
    if G:
        assert_close(residual.grad, ref_gr, dtype, f"{backend} expand grad residual")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    """The key frame's gradient sums over every group: the same bits on every run."""
    device = backend_device(backend)
    x = features((2, 7, 11, 24), torch.float32, device).requires_grad_(True)
    query = torch.randn(24, device=device, requires_grad=True)
    grad_seq = None
    runs = []
    for _ in range(2):
        out = vk.encode(x, 3, pool="attn", query=query, num_heads=4, frames_per_token=2, backend=backend)
        grad_seq = torch.randn_like(out.sequence) if grad_seq is None else grad_seq
        gx, gq = torch.autograd.grad(out.sequence, [x, query], grad_seq)
        runs.append((out.sequence.detach(), gx, gq))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_propagate_as_in_the_reference(backend, pool):
    """A NaN or an infinity in the features gives NaN / inf exactly where the reference has them."""
    device = backend_device(backend)
    x = features((2, 4, 5, 12), torch.float32, device)
    x[0, 2, 1, 0] = float("nan")
    x[1, 3, 4, 7] = float("inf")
    x[1, 1, 0, 2] = -float("inf")
    query = torch.randn(12, device=device) if pool == "attn" else None
    heads = 3 if pool == "attn" else 1
    out = vk.encode(x, pool=pool, query=query, num_heads=heads, backend=backend).sequence
    ref = reference.encode(x.double(), pool=pool, query=query, num_heads=heads)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN pattern differs from the reference"
    assert torch.equal(out.isinf(), ref.isinf()), "inf pattern differs from the reference"
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], torch.float32, f"{backend} finite part")
