"""encode_varlen with max_frames / total_tokens given: no host read, the host path's exact results,
a clear error for every bad size."""
from __future__ import annotations

import random

import pytest
import torch

import vtok_kernels as vk
from vtok_kernels import backends, ops
from vtok_kernels.reference import num_groups
from tests.utils import backend_device

CPU_BACKENDS = [b for b in ("torch", "cpu") if b in backends.KNOWN_BACKENDS]
C = 12
H, W = 2, 3


def random_packing(rng: random.Random, pool: str):
    """Random lengths (most packings hold a one-frame video), frames_per_token, spatial and key."""
    lengths = [rng.randint(1, 6) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.75:
        lengths[rng.randrange(len(lengths))] = 1
    shortest = min(lengths)
    key_kind = rng.choice(["int", "negative", "tensor"])
    if key_kind == "int":
        key = rng.randrange(shortest)
    elif key_kind == "negative":
        key = -rng.randint(1, shortest)
    else:
        key = torch.tensor([rng.randrange(-t, t) for t in lengths])
    return dict(
        lengths=lengths,
        key_index=key,
        frames_per_token=rng.randint(1, 3),
        spatial=rng.choice([None, (1, 2), (2, 2), (H, W)]),
        num_heads=rng.choice([1, 2, 3]) if pool == "attn" else 1,
    )


def sizes_of(lengths, num_key_tokens, frames_per_token) -> tuple[int, int]:
    total = sum(num_key_tokens + num_groups(t, frames_per_token) for t in lengths)
    return max(lengths), total


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0] + lengths).cumsum(0)


def encode_with_grads(frames, query, grad, options, backend, **sizes):
    x = frames.detach().clone().requires_grad_()
    q = query.detach().clone().requires_grad_() if query is not None else None
    out = vk.encode_varlen(x, query=q, backend=backend, **options, **sizes)
    out.sequence.backward(grad)
    return out, x.grad, (q.grad if q is not None else None)


@pytest.mark.parametrize("packing", range(3))
@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sizes_give_the_host_paths_exact_results(backend, pool, packing):
    device = backend_device(backend)
    seed = random.randrange(2**31)
    case = random_packing(random.Random(seed), pool)
    lengths, fpt, spatial = case.pop("lengths"), case["frames_per_token"], case["spatial"]
    frames = torch.randn(sum(lengths), H, W, C, device=device)
    query = torch.randn(C, device=device) if pool == "attn" else None
    key = case.pop("key_index")
    options = dict(case, cu_frames=cu_of(lengths).to(device), pool=pool,
                   key_index=key.to(device) if isinstance(key, torch.Tensor) else key)
    S = spatial[0] * spatial[1] if spatial else H * W
    max_frames, total_tokens = sizes_of(lengths, S, fpt)
    grad = torch.randn(total_tokens, C, device=device)
    what = f"seed {seed}: lengths {lengths}, key {key}, {case}"

    host, host_gx, host_gq = encode_with_grads(frames, query, grad, options, backend)
    assert host.sequence.shape[0] == total_tokens, what
    # max_frames is a bound, not the exact maximum: a larger one changes nothing but max_tokens.
    for slack in (0, random.randint(1, 3)):
        sized, gx, gq = encode_with_grads(frames, query, grad, options, backend,
                                          max_frames=max_frames + slack, total_tokens=total_tokens)
        assert torch.equal(sized.sequence, host.sequence), what
        assert torch.equal(sized.cu_tokens, host.cu_tokens) and sized.cu_tokens.dtype == torch.int64, what
        assert torch.equal(gx, host_gx), what
        assert gq is None if query is None else torch.equal(gq, host_gq), what
        assert sized.num_key_tokens == host.num_key_tokens == S, what
        assert sized.max_tokens == S + num_groups(max_frames + slack, fpt), what
    assert host.max_tokens == S + num_groups(max_frames, fpt), what


def _forbidden(name):
    def read_back(*args, **kwargs):
        raise AssertionError(f"{name}: a host read or copy in the sized path of encode_varlen")
    return read_back


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@pytest.mark.parametrize("key", [-1, "tensor"])
@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_sizes_given_nothing_is_read_back(monkeypatch, pool, key):
    """Every host read a tensor offers raises until the op is called; the op's arguments (the
    kernel's normalised input) must be those the host path gives it."""
    lengths = [random.randint(1, 5) for _ in range(3)] + [1]
    frames = torch.randn(sum(lengths), H, W, C)
    query = torch.randn(C) if pool == "attn" else None
    key = torch.tensor([random.randrange(-t, t) for t in lengths]) if key == "tensor" else key
    options = dict(key_index=key, pool=pool, query=query, num_heads=3 if query is not None else 1,
                   frames_per_token=2, spatial=(1, 2), backend="cpu" if "cpu" in CPU_BACKENDS else "torch")
    calls = []

    def record(*args):
        calls.append(args)
        return args[0].new_empty((args[11], C))

    monkeypatch.setattr(ops, "encode_varlen_sequence", record)
    cu_frames = cu_of(lengths)
    vk.encode_varlen(frames, cu_frames, **options)
    max_frames, total_tokens = calls[0][10], calls[0][11]
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, _forbidden(f"Tensor.{name}"))
        patch.setattr(torch, "tensor", _forbidden("torch.tensor"))
        out = vk.encode_varlen(frames, cu_frames, max_frames=max_frames, total_tokens=total_tokens, **options)
    host_args, sized_args = calls
    assert len(host_args) == len(sized_args)
    for host, sized in zip(host_args, sized_args):
        if isinstance(host, torch.Tensor):
            assert torch.equal(host, sized) and host.dtype == sized.dtype
        else:
            assert host == sized
    assert out.cu_tokens is sized_args[2]


cu_ok = torch.tensor([0, 2, 5])  # two videos of 2 and 3 frames: 6 key tokens each, 1 + 2 residual
SIZES_OK = dict(max_frames=3, total_tokens=6 + 1 + 6 + 2)

# (id, kwargs over x [5, 6, C], cu_ok and SIZES_OK, exception, words the message must contain)
BAD_SIZES = [
    ("only-max-frames", dict(max_frames=3, total_tokens=None), ValueError, "total_tokens: needed together with max_frames"),
    ("only-total-tokens", dict(max_frames=None), ValueError, "max_frames: needed together with total_tokens"),
    ("max-frames-float", dict(max_frames=3.0), TypeError, "max_frames: expected an int"),
    ("max-frames-bool", dict(max_frames=True), TypeError, "max_frames: expected an int"),
    ("total-tokens-tensor", dict(total_tokens=torch.tensor(15)), TypeError, "total_tokens: expected an int"),
    ("max-frames-zero", dict(max_frames=0), ValueError, "max_frames: expected a positive int"),
    ("total-tokens-negative", dict(total_tokens=-15), ValueError, "total_tokens: expected a positive int"),
    ("max-frames-below-longest", dict(max_frames=2), ValueError,
     "max_frames: must be at least the frame count of the longest video in cu_frames"),
    ("total-tokens-too-few", dict(total_tokens=14), ValueError, "total_tokens: must equal the output rows"),
    ("total-tokens-too-many", dict(total_tokens=16), ValueError, "total_tokens: must equal the output rows"),
    ("total-tokens-other-fpt", dict(frames_per_token=2), ValueError, "total_tokens: must equal the output rows"),
    ("cu-first", dict(cu_frames=torch.tensor([1, 2, 5])), ValueError, "cu_frames: must start at 0"),
    ("cu-last", dict(cu_frames=torch.tensor([0, 2, 4])), ValueError, "cu_frames: must end at the number of packed frames F"),
    ("cu-decreasing", dict(cu_frames=torch.tensor([0, 3, 2, 5])), ValueError, "cu_frames: must be strictly increasing"),
    ("cu-empty-video", dict(cu_frames=torch.tensor([0, 2, 2, 5])), ValueError, "cu_frames: must be strictly increasing"),
    ("cu-float", dict(cu_frames=torch.tensor([0.0, 2.0, 5.0])), TypeError, "cu_frames: expected dtype int32 or int64"),
    ("key-int-past-a-short-video", dict(key_index=2), ValueError, "key_index: out of range [-T_b, T_b)"),
    ("key-negative-past-a-short-video", dict(key_index=-3), ValueError, "key_index: out of range [-T_b, T_b)"),
    ("key-tensor-one-video", dict(key_index=torch.tensor([0, 3])), ValueError, "key_index: out of range [-T_b, T_b)"),
    ("key-tensor-negative", dict(key_index=torch.tensor([-3, 0])), ValueError, "key_index: out of range [-T_b, T_b)"),
]


@pytest.mark.parametrize("kwargs, error, words", [pytest.param(*row[1:], id=row[0]) for row in BAD_SIZES])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_sizes_raise_a_clear_error_before_any_kernel(monkeypatch, backend, kwargs, error, words):
    monkeypatch.setattr(ops, "encode_varlen", _forbidden("the op, after a failed check"))
    arguments = dict(x=torch.randn(5, H * W, C), cu_frames=cu_ok, backend=backend, **SIZES_OK)
    arguments.update(kwargs)
    with pytest.raises(error) as info:
        vk.encode_varlen(**arguments)
    assert words in str(info.value)


def test_compile_fullgraph_with_sizes_on_symbolic_packings():
    """With the sizes given nothing breaks the graph, even with F, B and the sizes symbolic, and a
    wrong size still fails (a RuntimeError from the compiled assert)."""
    device = backend_device("cpu")
    torch._dynamo.reset()
    query = torch.randn(C, device=device, requires_grad=True)

    def step(frames, cu_frames, keys, query, max_frames, total_tokens):
        out = vk.encode_varlen(frames, cu_frames, keys, "attn", query, 3, 2, spatial=(2, 2),
                               backend="cpu", max_frames=max_frames, total_tokens=total_tokens)
        return out.sequence.square().sum() + out.max_tokens

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for lengths in ([random.randint(1, 6) for _ in range(3)] + [1], [random.randint(1, 6) for _ in range(4)]):
        frames = torch.randn(sum(lengths), H, W, C, device=device, requires_grad=True)
        keys = torch.tensor([random.randrange(-t, t) for t in lengths], device=device)
        args = (frames, cu_of(lengths).to(device), keys, query, *sizes_of(lengths, 4, 2))
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, (frames, query))
        loss_ref = step(*args)
        grads_ref = torch.autograd.grad(loss_ref, (frames, query))
        torch.testing.assert_close(loss, loss_ref)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r)
    with pytest.raises(RuntimeError, match="total_tokens: must equal the output rows"):
        compiled(*args[:-1], args[-1] + 1)
