"""The API's eager path (ops.py): the same bits as the torch.library ops, which still serve every
call that is traced or intercepted."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtok_kernels as vk
from vtok_kernels import ops
from tests.utils import backend_device

BACKENDS = ["cpu", "torch", pytest.param("triton", marks=pytest.mark.slow)]


@pytest.fixture(params=[True, False], ids=["eager", "ops"])
def path(request, monkeypatch):
    monkeypatch.setattr(ops, "EAGER_FUNCTIONS", request.param)
    return request.param


def _encode_call(device, dtype, pool, backend):
    C, heads = 24, 3
    x = torch.randn(2, 5, 3, 2, C, device=device).to(dtype).requires_grad_()
    query = torch.randn(C, device=device, requires_grad=True) if pool == "attn" else None
    keys = torch.tensor([4, 1], device=device)

    def call():
        out = vk.encode(x, keys, pool, query, heads if pool == "attn" else 1, frames_per_token=2,
                        spatial=(2, 1), backend=backend)
        return out.sequence, [t for t in (x, query) if t is not None]

    return call


def _varlen_call(device, dtype, pool, backend):
    C, heads = 24, 3
    x = torch.randn(9, 4, C, device=device).to(dtype).requires_grad_()
    query = torch.randn(C, device=device, requires_grad=True) if pool == "attn" else None
    cu_frames = torch.tensor([0, 1, 6, 9], device=device)

    def call():
        out = vk.encode_varlen(x, cu_frames, -1, pool, query, heads if pool == "attn" else 1,
                               frames_per_token=2, backend=backend)
        return out.sequence, [t for t in (x, query) if t is not None]

    return call


def _expand_call(device, dtype, pool, backend):
    key_tokens = torch.randn(2, 6, 24, device=device).to(dtype).requires_grad_()
    residual = torch.randn(2, 3, 24, device=device).to(dtype).requires_grad_()

    def call():
        return vk.expand(key_tokens, residual, torch.tensor([0, 5], device=device), 6, 2,
                         backend=backend), [key_tokens, residual]

    return call


CALLS = {"encode": _encode_call, "encode_varlen": _varlen_call, "expand": _expand_call}
OP_NODE = {"encode": "GeneratedBackwardFor_vtok_encode_defaultBackward",
           "encode_varlen": "GeneratedBackwardFor_vtok_encode_varlen_defaultBackward",
           "expand": "GeneratedBackwardFor_vtok_expand_defaultBackward"}
EAGER_NODE = {"encode": "_EncodeFunctionBackward", "encode_varlen": "_EncodeFunctionBackward",
              "expand": "_ExpandFunctionBackward"}


def _run(call, grad_seed):
    out, inputs = call()
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, inputs, upstream)
    return out, grads, out.grad_fn.name()


@pytest.mark.parametrize("op, pool", [("encode", "mean"), ("encode", "attn"), ("encode_varlen", "mean"),
                                      ("encode_varlen", "attn"), ("expand", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_gives_the_bits_of_the_ops(monkeypatch, backend, op, pool, dtype):
    call = CALLS[op](backend_device(backend), dtype, pool, backend)
    seed = int(torch.randint(0, 2**31, ()))
    monkeypatch.setattr(ops, "EAGER_FUNCTIONS", False)
    ref_out, ref_grads, ref_node = _run(call, seed)
    monkeypatch.setattr(ops, "EAGER_FUNCTIONS", True)
    out, grads, node = _run(call, seed)
    assert (ref_node, node) == (OP_NODE[op], EAGER_NODE[op])
    assert out.dtype == ref_out.dtype and torch.equal(out, ref_out)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == ref.dtype and torch.equal(grad, ref)
    with torch.no_grad():
        plain, _ = call()
    assert plain.grad_fn is None and torch.equal(plain, ref_out)


class _OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_an_intercepted_call_takes_the_ops(path):
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    with _OpsSeen() as seen:
        seq = vk.encode(x, 0, backend="cpu").sequence
        seq.sum().backward()
    assert seen.ops.count("vtok.encode.default") == 1 and seen.ops.count("vtok.encode_backward.default") == 1
    assert torch.equal(x.grad, torch.autograd.grad(vk.encode(x, 0, backend="cpu").sequence.sum(), x)[0])


def test_a_tensor_subclass_takes_the_ops(path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 4, 8))
        q = mode.from_tensor(torch.randn(8))
        assert vk.encode(x, 0, "attn", q, 2, backend="cpu").sequence.shape == (2, 6, 8)


@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_meta_tensors_take_the_ops_fakes(path, pool):
    x = torch.randn(2, 3, 4, 8, device="meta", requires_grad=True)
    query = torch.randn(8, device="meta") if pool == "attn" else None
    seq = vk.encode(x, 0, pool, query, 2 if query is not None else 1).sequence
    seq.sum().backward()
    assert seq.shape == (2, 6, 8) and seq.grad_fn.name() == OP_NODE["encode"] and x.grad.shape == x.shape


def test_a_jit_trace_records_the_ops(path):
    x = torch.randn(2, 3, 4, 8)
    fn = lambda x: vk.encode(x, 1, backend="cpu").sequence  # noqa: E731
    traced = torch.jit.trace(fn, (x,), check_trace=False)
    assert "vtok::encode" in str(traced.graph)
    other = torch.randn(2, 3, 4, 8)
    assert torch.equal(traced(other), fn(other))


def test_a_parameter_query_takes_the_eager_path(path):
    x = torch.randn(2, 3, 4, 8)
    query = torch.nn.Parameter(torch.randn(8))
    seq = vk.encode(x, 0, "attn", query, 2, backend="cpu").sequence
    assert seq.grad_fn.name() == (EAGER_NODE["encode"] if path else OP_NODE["encode"])


def test_compiled_calls_trace_the_ops(path):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = AotEagerAndRecordGraphs()
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    fn = torch.compile(lambda x: vk.encode(x, 0, backend="cpu").sequence, backend=recorder, fullgraph=True)
    fn(x).sum().backward()
    assert "torch.ops.vtok.encode.default" in "".join(g.code for g in recorder.fw_graphs)
    assert "torch.ops.vtok.encode_backward.default" in "".join(g.code for g in recorder.bw_graphs)


# A gradient penalty: the second derivative of encode reaches its backward through x alone (the
# upstream gradient seq * 2 depends on x too). Neither path has that formula: both must raise,
# never return a gradient short of its terms, or None.
@pytest.mark.parametrize("op, pool", [("encode", "mean"), ("encode", "attn"), ("encode_varlen", "attn")])
def test_second_derivatives_raise_on_either_path(path, op, pool):
    lin = torch.nn.Linear(24, 24).double()
    seq, inputs = CALLS[op]("cpu", torch.float64, pool, "cpu")()
    x = inputs[0]
    if op == "encode":  # x through a layer, whose weight's second derivative passes encode's
        query = inputs[1] if pool == "attn" else None
        seq = vk.encode(lin(x), torch.tensor([4, 1]), pool, query, 3 if query is not None else 1,
                        frames_per_token=2, spatial=(2, 1), backend="cpu").sequence
    (grad_x,) = torch.autograd.grad(seq.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad_x.pow(2).sum(), lin.weight if op == "encode" else x, retain_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad_x.pow(2).sum().backward(inputs=[x])


def test_expand_second_derivatives_follow_the_upstream_gradient(path):
    out, inputs = _expand_call("cpu", torch.float64, None, "cpu")()
    upstream = torch.randn(out.shape, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(out, inputs, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grads[0].sum(), upstream)
    # expand is linear: without a graph upstream its gradients carry none
    grads = torch.autograd.grad(out, inputs, upstream.detach(), create_graph=True)
    assert not any(g.requires_grad for g in grads)


@pytest.mark.parametrize("op, pool", [("encode", "attn"), ("encode_varlen", "mean"), ("expand", None)])
def test_a_batched_backward_equals_one_backward_per_gradient(path, op, pool):
    out, inputs = CALLS[op]("cpu", torch.float32, pool, "cpu")()
    upstream = torch.randn(3, *out.shape)
    batched = torch.autograd.grad(out, inputs, upstream, is_grads_batched=True, retain_graph=True)
    for k in range(upstream.shape[0]):
        single = torch.autograd.grad(out, inputs, upstream[k], retain_graph=True)
        for b, s in zip(batched, single, strict=True):
            assert torch.equal(b[k], s)


def test_a_dispatch_subclass_takes_the_ops(path):
    from torch.testing._internal.two_tensor import TwoTensor

    x = torch.randn(2, 3, 4, 8)
    out = vk.encode(TwoTensor(x, 2 * x), 0, backend="cpu").sequence
    plain = vk.encode(x, 0, backend="cpu").sequence
    assert isinstance(out, TwoTensor) and torch.equal(out.a, plain) and torch.equal(out.b, 2 * plain)


@pytest.mark.parametrize("op", ["encode", "encode_varlen", "expand"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_forward_mode_ad_is_refused_not_dropped(path, op, backend):
    import torch.autograd.forward_ad as fwAD

    out, inputs = CALLS[op]("cpu", torch.float32, "mean", backend)()
    primal = inputs[0].detach()
    with fwAD.dual_level():
        dual = fwAD.make_dual(primal, torch.randn_like(primal))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            if op == "encode":
                vk.encode(dual, 4, backend=backend)
            elif op == "encode_varlen":
                vk.encode_varlen(dual, torch.tensor([0, 1, 6, 9]), -1, backend=backend)
            else:
                vk.expand(dual, inputs[1].detach(), 0, 6, 2, backend=backend)
        # a dual level alone, with no tangent on the inputs, changes nothing
        assert vk.encode(torch.randn(2, 3, 4, 8), 0, backend=backend).sequence.shape == (2, 6, 8)


def test_the_profiler_names_the_eager_calls(path):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        vk.encode(x, 0, backend="cpu").sequence.sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"vtok::encode", "vtok::encode_backward"} <= names


def test_the_environment_can_keep_the_ops():
    assert ops.eager_functions_enabled({}) is True
    assert ops.eager_functions_enabled({"VTOK_EAGER_FUNCTIONS": "1"}) is True
    assert ops.eager_functions_enabled({"VTOK_EAGER_FUNCTIONS": "0"}) is False
    with pytest.raises(ValueError, match="VTOK_EAGER_FUNCTIONS"):
        ops.eager_functions_enabled({"VTOK_EAGER_FUNCTIONS": "no"})
