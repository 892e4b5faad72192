"""torch.library ops: opcheck on each, and torch.compile(fullgraph=True) through the public API."""
from __future__ import annotations

import pytest
import torch

import vtok_kernels as vk
from vtok_kernels import backends
from tests.utils import backend_device

CPU_BACKENDS = [b for b in ("torch", "cpu") if b in backends.KNOWN_BACKENDS]


def _op_samples(device):
    x = torch.randn(2, 5, 6, 12, device=device, requires_grad=True)
    q = torch.randn(12, device=device, requires_grad=True)
    keys = torch.tensor([1, 4], device=device)
    frames = torch.randn(6, 6, 12, device=device, requires_grad=True)
    cu_frames = torch.tensor([0, 2, 6], device=device)
    cu_tokens = torch.tensor([0, 4 + 1, 5 + 4 + 2], device=device)
    key_tokens = torch.randn(2, 6, 12, device=device, requires_grad=True)
    residual = torch.randn(2, 4, 12, device=device, requires_grad=True)
    return {
        "encode-attn": (torch.ops.vtok.encode.default, (x, keys, q, "attn", 3, 2, [], [], "B")),
        "encode-mean-spatial": (torch.ops.vtok.encode.default, (x, keys, None, "mean", 1, 1, [2, 1], [3, 2], "B")),
        "encode_varlen-attn": (torch.ops.vtok.encode_varlen.default,
                               (frames, cu_frames, cu_tokens, torch.tensor([0, 3], device=device), q, "attn", 2, 2, [2, 2], [2, 3], 4, 11, "B")),
        "expand": (torch.ops.vtok.expand.default, (key_tokens, residual, keys, 5, 1, "B")),
    }


SAMPLES = ["encode-attn", "encode-mean-spatial", "encode_varlen-attn", "expand"]


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, sample):
    device = backend_device(backend)
    op, args = _op_samples(device)[sample]
    args = tuple(backend if a == "B" else a for a in args)
    torch.library.opcheck(op, args)


# cuda in bfloat16 (GPU only): its forward keeps float32 residual tokens, which the fake must match
@pytest.mark.parametrize("backend, dtype", [(b, torch.float32) for b in CPU_BACKENDS]
                         + [("cuda", torch.float32), ("cuda", torch.bfloat16)])
def test_backward_ops_opcheck(backend, dtype):
    device = backend_device(backend)
    x = torch.randn(2, 4, 5, 8, device=device).to(dtype)
    q = torch.randn(8, device=device)
    keys = torch.tensor([0, 3], device=device)
    seq, lse, residual32 = torch.ops.vtok.encode(x, keys, q, "attn", 2, 1, [], [], backend)
    grad = torch.randn_like(seq)
    torch.library.opcheck(torch.ops.vtok.encode_backward.default,
                          (grad, x, keys, q, seq, lse, residual32, "attn", 2, 1, [], [], backend))
    frames = torch.randn(6, 5, 8, device=device).to(dtype)
    cu_frames = torch.tensor([0, 2, 6], device=device)
    cu_tokens = torch.tensor([0, 5 + 1, 6 + 5 + 3], device=device)
    varlen_keys = torch.tensor([1, 0], device=device)
    seq, lse, residual32 = torch.ops.vtok.encode_varlen(frames, cu_frames, cu_tokens, varlen_keys, q, "attn",
                                                        2, 1, [], [], 4, 14, backend)
    torch.library.opcheck(torch.ops.vtok.encode_varlen_backward.default,
                          (torch.randn_like(seq), frames, cu_frames, cu_tokens, varlen_keys, q, seq, lse,
                           residual32, "attn", 2, 1, [], [], 4, backend))
    grad_frames = torch.randn(2, 4, 5, 8, device=device).to(dtype)
    torch.library.opcheck(torch.ops.vtok.expand_backward.default, (grad_frames, keys, 3, 1, backend))


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend, pool):
    device = backend_device(backend)
    torch._dynamo.reset()
    x = torch.randn(2, 5, 3, 4, 12, device=device, requires_grad=True)
    q = torch.randn(12, device=device, requires_grad=True) if pool == "attn" else None
    heads = 3 if pool == "attn" else 1

    def step(x, q):
        out = vk.encode(x, key_index=-1, pool=pool, query=q, num_heads=heads, frames_per_token=2,
                        spatial=(2, 2), backend=backend)
        return out.residual_tokens.square().sum() + out.key_tokens.sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, q)
    inputs = [x] + ([q] if q is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    loss_ref = step(x, q)
    grads_ref = torch.autograd.grad(loss_ref, inputs)
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


def test_compile_with_per_video_key_tensor():
    torch._dynamo.reset()
    x = torch.randn(3, 4, 5, 8)
    keys = torch.tensor([0, -1, 2])
    compiled = torch.compile(lambda x, k: vk.encode(x, k, backend="torch").sequence, fullgraph=True)
    torch.testing.assert_close(compiled(x, keys), vk.reference.encode(x, keys))


def test_compile_has_one_forward_op_per_encode():
    """One fused op per encode call, not one per stage (each op costs a dispatch)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    x = torch.randn(2, 4, 6, 8)
    q = torch.randn(8)
    torch.compile(lambda x, q: vk.encode(x, pool="attn", query=q, num_heads=2, backend="torch").sequence,
                  backend=recorder, fullgraph=True)(x, q)
    code = recorder.graphs[0].code
    assert code.count("torch.ops.vtok.encode.default") == 1


def test_gradcheck_through_the_ops_in_float64():
    """The registered autograd of every op, checked numerically through the public API."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(6, dtype=torch.float64, requires_grad=True)
    keys = torch.tensor([1, -1])
    assert torch.autograd.gradcheck(
        lambda x, q: vk.encode(x, keys, "attn", q, 2, 2, spatial=(2, 2), grid=(2, 3), backend="torch").sequence, (x, q))
    frames = torch.randn(5, 6, 6, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 1, 5])
    assert torch.autograd.gradcheck(
        lambda f, q: vk.encode_varlen(f, cu, -1, "attn", q, 3, backend="torch").sequence, (frames, q))
    K = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    R = torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda K, R: vk.expand(K, R, keys, 4, 2, backend="torch"), (K, R))
