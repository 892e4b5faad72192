"""The triton backend on a GPU that is not the current one. Triton launches on the current
device whatever the tensors' device, so every op makes its tensors' device current first
(``on_input_device``); without that, x on cuda:1 while cuda:0 is current is an illegal address."""
from __future__ import annotations

import contextlib

import pytest
import torch

import vtok_kernels as vk
from vtok_kernels import backends, reference
from tests.utils import assert_close, features


def _triton_modules():
    from vtok_kernels.backends.triton import encode, expand

    return encode, expand


def test_every_triton_op_is_guarded():
    encode, expand = _triton_modules()
    guarded = encode.on_input_device(len).__code__
    for op in backends.OPS:
        module = expand if op.startswith("expand") else encode
        assert getattr(module, op).__code__ is guarded, f"triton {op} is not guarded"


def test_guard_makes_the_tensors_device_current(monkeypatch):
    """The guard's logic on the CPU: a tensor that reports cuda:1 (a subclass) makes
    torch.cuda.device(cuda:1) current around the op, a CPU tensor makes no device current."""
    encode, _ = _triton_modules()
    current = []

    @contextlib.contextmanager
    def device(where):
        current.append(torch.device(where))
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)

    class OnSecondGpu(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    seen = []
    op = encode.on_input_device(lambda *args, **kwargs: seen.append(list(current)))
    op(torch.Tensor._make_subclass(OnSecondGpu, torch.empty(1)), 3)
    op(3, x=torch.Tensor._make_subclass(OnSecondGpu, torch.empty(1)))
    op(torch.empty(1), 3)
    assert seen == [[torch.device("cuda", 1)], [torch.device("cuda", 1)], []]
    assert not current


def _every_op_matches_reference(device) -> None:
    """encode (mean, attn with head sizes 128 and 64, spatial key tokens), encode_varlen and
    expand, forward and backward, with every tensor on ``device``."""
    dtype = torch.bfloat16
    keys = torch.tensor([1, 4])
    for pool, heads, spatial, grid in (("attn", 2, None, None), ("attn", 4, (2, 3), (6, 6)),
                                       ("mean", 1, None, None)):
        x = features((2, 5, 36, 256), dtype, device).requires_grad_(True)
        query = torch.randn(256, device=device, requires_grad=True) if pool == "attn" else None
        options = dict(pool=pool, num_heads=heads, frames_per_token=2, spatial=spatial, grid=grid)
        out = vk.encode(x, keys.to(device), query=query, backend="triton", **options).sequence
        grad = torch.randn_like(out)
        out.backward(grad)
        x64 = x.detach().cpu().double().requires_grad_(True)
        q64 = query.detach().cpu().double().requires_grad_(True) if query is not None else None
        ref = reference.encode(x64, keys, query=q64, **options)
        ref.backward(grad.cpu().double())
        assert out.device == x.grad.device == torch.device(device)
        assert_close(out.cpu(), ref.detach(), dtype, f"{pool} sequence")
        assert_close(x.grad.cpu(), x64.grad, dtype, f"{pool} grad x")
        if query is not None:
            assert_close(query.grad.cpu(), q64.grad, dtype, f"{pool} grad query")

    x = features((9, 36, 128), dtype, device).requires_grad_(True)
    cu_frames = torch.tensor([0, 3, 4, 9])
    query = torch.randn(128, device=device, requires_grad=True)
    out = vk.encode_varlen(x, cu_frames.to(device), 0, pool="attn", query=query,
                           backend="triton").sequence
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().cpu().double().requires_grad_(True)
    q64 = query.detach().cpu().double().requires_grad_(True)
    ref, _ = reference.encode_varlen(x64, cu_frames, 0, pool="attn", query=q64)
    ref.backward(grad.cpu().double())
    assert_close(out.cpu(), ref.detach(), dtype, "varlen sequence")
    assert_close(x.grad.cpu(), x64.grad, dtype, "varlen grad x")
    assert_close(query.grad.cpu(), q64.grad, dtype, "varlen grad query")

    key_tokens = features((2, 36, 256), dtype, device).requires_grad_(True)
    residual = features((2, 4, 256), dtype, device).requires_grad_(True)
    keys = torch.tensor([0, 4])
    frames = vk.expand(key_tokens, residual, keys.to(device), 5, backend="triton")
    grad = torch.randn_like(frames)
    frames.backward(grad)
    k64 = key_tokens.detach().cpu().double().requires_grad_(True)
    r64 = residual.detach().cpu().double().requires_grad_(True)
    ref = reference.expand(k64, r64, keys, 5)
    ref.backward(grad.cpu().double())
    assert_close(frames.cpu(), ref.detach(), dtype, "expand")
    assert_close(key_tokens.grad.cpu(), k64.grad, dtype, "expand grad key")
    assert_close(residual.grad.cpu(), r64.grad, dtype, "expand grad residual")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_every_op_on_the_second_device_while_the_first_is_current():
    torch.cuda.set_device(0)
    _every_op_matches_reference("cuda:1")
    assert torch.cuda.current_device() == 0
