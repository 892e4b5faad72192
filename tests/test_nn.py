"""VTokEncoder and select_key_frames: the module against a float64 composition written by hand
from the reference, packed against batched, state_dict, initialisation, bad arguments;
torch.compile(fullgraph=True) with dynamic frame counts, autocast, CUDA graphs (gpu); key-frame
selection against a brute-force pairwise computation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vtok_kernels as vk
from vtok_kernels import backends, reference
from vtok_kernels.nn import INIT_STD, VTokEncoder
from tests.utils import TOLERANCE, assert_close, backend_device, rel_err

ALL_BACKENDS = list(backends.KNOWN_BACKENDS)


def _randomize(module: VTokEncoder, seed: int) -> VTokEncoder:
    """Random values everywhere (the default init has zero biases and type embeddings, which
    would hide a missing term)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module


def _expected(module: VTokEncoder, x: torch.Tensor, key) -> tuple[torch.Tensor, dict]:
    """The module's math in float64, composed by hand from reference.encode and F.linear.

    Returns the output and the float64 leaf copies of the parameters (for their gradients)."""
    params = {name: p.detach().double().requires_grad_(True) for name, p in module.named_parameters()}
    query = params.get("query")
    seq = reference.encode(x, key, pool=module.pool, query=query, num_heads=module.num_heads,
                           frames_per_token=module.frames_per_token, spatial=module.spatial,
                           grid=module.grid)
    S = seq.shape[1] - reference.num_groups(x.shape[1], module.frames_per_token)

    def mlp(t, prefix):
        hidden = F.gelu(F.linear(t, params[f"{prefix}.0.weight"], params[f"{prefix}.0.bias"]))
        return F.linear(hidden, params[f"{prefix}.2.weight"], params[f"{prefix}.2.bias"])

    if module.key_projection == "linear":
        keys = F.linear(seq[:, :S], params["key_proj.weight"], params["key_proj.bias"])
    elif module.key_projection == "mlp":
        keys = mlp(seq[:, :S], "key_proj")
    else:
        keys = seq[:, :S]
    residuals = mlp(seq[:, S:], "residual_mlp")
    if "type_embedding" in params:
        keys = keys + params["type_embedding"][0]
        residuals = residuals + params["type_embedding"][1]
    return torch.cat([keys, residuals], dim=1), params


MODULE_CASES = [
    pytest.param(dict(pool="attn", num_heads=3), (2, 5, 7, 12), 0, id="attn-3heads"),
    pytest.param(dict(pool="mean", key_projection="mlp"), (2, 4, 7, 12), -1, id="mean-mlpkeys-lastkey"),
    pytest.param(dict(pool="attn", num_heads=2, frames_per_token=2, spatial=(2, 2)), (2, 6, 3, 5, 12),
                 "tensor", id="attn-fpt2-spatial5d-perkey"),
    pytest.param(dict(pool="attn", num_heads=4, key_projection="identity", type_embeddings=False, out_dim=12,
                      spatial=(1, 2), grid=(3, 3)), (1, 3, 9, 12), "medoid", id="attn-identity-grid-medoid"),
    pytest.param(dict(pool="mean"), (1, 1, 5, 12), 0, id="mean-T1"),
]


def _key_for(key, x, generator):
    if key == "tensor":
        return torch.randint(-x.shape[1], x.shape[1], (x.shape[0],), generator=generator).to(x.device)
    return key


@pytest.mark.parametrize("options, shape, key", MODULE_CASES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_and_backward_match_hand_composition(backend, options, shape, key):
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    options = {"out_dim": 10, **options}
    module = _randomize(VTokEncoder(12, hidden_dim=6, backend=backend, **options), seed=1).to(device)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    key = _key_for(key, x, generator)

    out = module(x, key_index=key)
    grad_out = torch.randn(out.shape, generator=generator).to(device)
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_(True)
    key64 = vk.select_key_frames(x64, key) if isinstance(key, str) else key
    expected, params = _expected(module, x64, key64)
    expected.backward(grad_out.double())

    assert_close(out, expected, torch.float32, "tokens")
    assert_close(x.grad, x64.grad, torch.float32, "grad x")
    for name, p in module.named_parameters():
        assert_close(p.grad, params[name].grad, torch.float32, f"grad {name}")


@pytest.mark.parametrize("key", [1, -1, "medoid"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_packed_matches_batched_per_video(backend, key):
    """Packed videos of different lengths give, row block by row block, each video's batched
    tokens; gradients to the packed frames and the parameters agree as well."""
    device = backend_device(backend)
    module = _randomize(VTokEncoder(12, 8, pool="attn", num_heads=2, frames_per_token=2, spatial=(2, 2),
                                    grid=(3, 2), backend=backend), seed=2).to(device)
    lengths = [3, 2, 6] if key == 1 else [3, 1, 6]  # a one-frame video has no frame 1
    frames = torch.randn(sum(lengths), 6, 12, device=device, requires_grad=True)
    cu_frames = torch.tensor([0, 3, 3 + lengths[1], sum(lengths)], device=device, dtype=torch.int32)
    packed = module(frames, cu_frames, key_index=key)
    grad = torch.randn_like(packed.sequence)
    packed.sequence.backward(grad)
    assert packed.sequence.shape == (int(packed.cu_tokens[-1]), 8)
    assert packed.num_key_tokens == 4
    assert packed.max_tokens == max(module.num_tokens(t, 6) for t in lengths)

    reference_module = copy.deepcopy(module)
    reference_module.zero_grad()
    start = 0
    for b, length in enumerate(lengths):
        video = frames.detach()[start:start + length][None].requires_grad_(True)
        tokens = reference_module(video, key_index=key)[0]
        rows = slice(int(packed.cu_tokens[b]), int(packed.cu_tokens[b + 1]))
        assert tokens.shape[0] == module.num_tokens(length, 6)
        assert_close(packed.sequence[rows], tokens, torch.float32, f"video {b} tokens")
        tokens.backward(grad[rows])
        assert_close(frames.grad[start:start + length], video.grad[0], torch.float32, f"video {b} grad")
        start += length
    for (name, p), (_, r) in zip(module.named_parameters(), reference_module.named_parameters()):
        assert_close(p.grad, r.grad, torch.float32, f"grad {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_packed_with_sizes_matches_packed_without(backend):
    """max_frames / total_tokens (the no-sync path of encode_varlen) change nothing but the sync."""
    device = backend_device(backend)
    module = _randomize(VTokEncoder(12, 8, pool="attn", num_heads=2, frames_per_token=2, backend=backend),
                        seed=3).to(device)
    lengths = [4, 1, 5]
    frames = torch.randn(sum(lengths), 6, 12, device=device)
    cu_frames = torch.tensor([0, 4, 5, 10], device=device)
    plain = module(frames, cu_frames, key_index=-1)
    total = sum(module.num_tokens(t, 6) for t in lengths)
    sized = module(frames, cu_frames, key_index=-1, max_frames=5, total_tokens=total)
    assert torch.equal(sized.sequence, plain.sequence) and torch.equal(sized.cu_tokens, plain.cu_tokens)
    if device == "cpu":  # on a GPU a wrong size is a device-side assert, fatal to the process
        with pytest.raises(ValueError, match="total_tokens"):
            module(frames, cu_frames, key_index=-1, max_frames=5, total_tokens=total + 1)


def test_state_dict_round_trip():
    source = _randomize(VTokEncoder(12, 8, pool="attn", num_heads=3, key_projection="mlp"), seed=3)
    target = VTokEncoder(12, 8, pool="attn", num_heads=3, key_projection="mlp")
    state = source.state_dict()
    assert set(state) == {
        "query", "type_embedding", "residual_mlp.0.weight", "residual_mlp.0.bias",
        "residual_mlp.2.weight", "residual_mlp.2.bias", "key_proj.0.weight", "key_proj.0.bias",
        "key_proj.2.weight", "key_proj.2.bias",
    }
    target.load_state_dict(state)
    x = torch.randn(2, 4, 5, 12)
    assert torch.equal(target(x), source(x))
    mean = VTokEncoder(12, 8, pool="mean", type_embeddings=False)
    assert "query" not in mean.state_dict() and "type_embedding" not in mean.state_dict()
    with pytest.raises(RuntimeError, match="query"):
        mean.load_state_dict(state)


def test_initialisation_and_repr():
    torch.manual_seed(0)
    module = VTokEncoder(512, 256, pool="attn", num_heads=8, spatial=(2, 2), key_index="medoid")
    assert module.hidden_dim == 256
    for tensor in (module.query, module.key_proj.weight, module.residual_mlp[0].weight):
        assert 0.8 * INIT_STD < tensor.std().item() < 1.0 * INIT_STD  # truncated at 2 std
        assert tensor.abs().max().item() <= 2 * INIT_STD
    for bias in (module.key_proj.bias, module.residual_mlp[0].bias, module.residual_mlp[2].bias):
        assert torch.equal(bias, torch.zeros_like(bias))
    assert torch.equal(module.type_embedding, torch.zeros(2, 256))
    with torch.no_grad():
        module.query.fill_(1.0)
    module.reset_parameters()
    assert module.query.abs().max().item() <= 2 * INIT_STD
    text = repr(module)
    for part in ("in_dim=512", "out_dim=256", "pool='attn'", "num_heads=8", "spatial=(2, 2)",
                 "key_index='medoid'", "backend='auto'"):
        assert part in text
    assert module.num_tokens(16, 729) == 4 + 15


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(pool="max"), ValueError, "pool"),
    (dict(pool="attn", num_heads=5), ValueError, "num_heads"),
    (dict(pool="mean", num_heads=2), ValueError, "num_heads"),
    (dict(key_projection="identity"), ValueError, "key_projection"),
    (dict(key_projection="conv"), ValueError, "key_projection"),
    (dict(key_index="last"), ValueError, "key_index"),
    (dict(key_index=1.0), TypeError, "key_index"),
    (dict(frames_per_token=0), ValueError, "frames_per_token"),
    (dict(spatial=(0, 2)), ValueError, "spatial"),
    (dict(backend="numpy"), ValueError, "backend"),
    (dict(hidden_dim=0), ValueError, "hidden_dim"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        VTokEncoder(12, 8, **kwargs)


def test_bad_input_reaches_the_api_checks():
    module = VTokEncoder(12, 8, num_heads=3)
    with pytest.raises(ValueError, match="x"):
        module(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="key_index"):
        module(torch.randn(2, 5, 4, 12), key_index=5)
    with pytest.raises(ValueError, match="key_index"):
        module(torch.randn(2, 5, 4, 12), key_index="best")
    with pytest.raises(ValueError, match="in_dim"):
        module(torch.randn(2, 5, 4, 10))


def test_features_of_another_dtype_than_the_module():
    """bfloat16 features feed a float32 module (and float32 features a bfloat16 module) outside
    autocast: the tokens are cast to the parameters' dtype after the fused op."""
    module = _randomize(VTokEncoder(12, 8, num_heads=2), seed=4)
    x = torch.randn(2, 4, 5, 12)
    out = module(x.bfloat16())
    assert out.dtype == torch.float32
    assert rel_err(out, module(x)) < TOLERANCE[torch.bfloat16]
    half_module = copy.deepcopy(module).bfloat16()
    out16 = half_module(x)
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16, module(x)) < 2 * TOLERANCE[torch.bfloat16]


def test_one_fused_op_per_forward_and_backward():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = AotEagerAndRecordGraphs()
    module = VTokEncoder(12, 8, num_heads=2, backend="torch")
    x = torch.randn(2, 4, 5, 12, requires_grad=True)
    torch.compile(module, backend=recorder, fullgraph=True)(x).sum().backward()
    forward_code = "".join(g.code for g in recorder.fw_graphs)
    backward_code = "".join(g.code for g in recorder.bw_graphs)
    assert forward_code.count("torch.ops.vtok.encode.default") == 1
    assert backward_code.count("torch.ops.vtok.encode_backward.default") == 1


# -------------------------------------------------------------------------------- torch.compile
def _compile_params(device_backends):
    params = []
    for name in device_backends:
        marks = [pytest.mark.gpu] if name in ("triton", "cuda") else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("backend", _compile_params(ALL_BACKENDS))
def test_compile_fullgraph_matches_eager(backend, pool):
    device = backend_device(backend)
    torch._dynamo.reset()
    heads = 2 if pool == "attn" else 1
    module = _randomize(VTokEncoder(12, 8, pool=pool, num_heads=heads, frames_per_token=2, spatial=(2, 2),
                                    key_index=-1, backend=backend), seed=5).to(device)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 5, 3, 4, 12, device=device, requires_grad=True)
    out = compiled(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    x_eager = x.detach().requires_grad_(True)
    module.zero_grad()
    eager = module(x_eager)
    eager.backward(grad)
    assert_close(out, eager, torch.float32, "compiled tokens")
    for got, want in zip(grads, [x_eager.grad] + [p.grad for p in module.parameters()]):
        assert_close(got, want, torch.float32, "compiled grad")


@pytest.mark.parametrize("key_index", [0, -1, "medoid"])
@pytest.mark.parametrize("backend", _compile_params(ALL_BACKENDS))
def test_compile_dynamic_frame_count_does_not_recompile(backend, key_index):
    """One graph serves every frame count. Recompiles are decided by dynamo's guards, before
    any code generation: aot_eager checks them without paying for inductor's C++ compiles."""
    device = backend_device(backend)
    torch._dynamo.reset()
    module = VTokEncoder(12, 8, num_heads=2, key_index=key_index, backend=backend).to(device)
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled(torch.randn(2, 5, 6, 12, device=device, requires_grad=True)).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for frames, patches in ((7, 6), (4, 6), (9, 10)):
            x = torch.randn(2, frames, patches, 12, device=device, requires_grad=True)
            out = compiled(x)
            assert out.shape == (2, module.num_tokens(frames, patches), 8)
            out.sum().backward()
            assert_close(out, module(x), torch.float32, f"T={frames}")


def test_compile_dynamic_batch_does_not_recompile():
    torch._dynamo.reset()
    module = VTokEncoder(12, 8, num_heads=2, backend="torch")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled(torch.randn(2, 5, 6, 12))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(torch.randn(3, 5, 6, 12))


def test_compile_packed_input_matches_eager():
    """Packed videos compile too, with a graph break where encode_varlen reads cu_frames on the
    host (to check the offsets and size the output)."""
    torch._dynamo.reset()
    module = _randomize(VTokEncoder(12, 8, num_heads=2, key_index="medoid", backend="torch"), seed=9)
    frames, cu_frames = torch.randn(9, 6, 12), torch.tensor([0, 4, 9])
    compiled = torch.compile(module, backend="aot_eager")(frames, cu_frames)
    eager = module(frames, cu_frames)
    assert torch.equal(compiled.cu_tokens, eager.cu_tokens)
    assert_close(compiled.sequence, eager.sequence, torch.float32, "compiled packed tokens")


# ------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autocast_bfloat16_features_float32_parameters(backend, compiled):
    """Under autocast the fused op runs in the features' bfloat16, the dense layers in autocast's
    bfloat16, the parameters and their gradients stay float32.

    Errors are against float64 and held to the "torch" reference backend's own error in the same
    setting, times 2 (FlashAttention's rule). For gradients the rule is applied to the mean
    relative error over x's and every parameter's gradient: a single small gradient (a bias
    summed over a dozen tokens) has an error that is mostly the luck of a few roundings."""
    device = backend_device(backend)
    if compiled and backend in ("triton", "cuda") and device == "cpu":
        pytest.skip("compiled kernels need a GPU")
    torch._dynamo.reset()
    module = _randomize(VTokEncoder(24, 16, num_heads=3, backend=backend), seed=6).to(device)
    x = torch.randn(2, 6, 17, 24, device=device)

    def run(m, features):
        m.zero_grad()
        features = features.detach().requires_grad_(True)
        # On the CPU, inductor's bfloat16 C++ code takes half a minute to build; aot_eager traces
        # autocast through the op and its fake implementation just the same.
        fn = torch.compile(m, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager") \
            if compiled else m
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fn(features)
        out.float().square().sum().backward()
        return out, [p.grad for p in m.parameters()] + [features.grad]

    out, grads = run(module, x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and g.dtype == torch.float32
               for p, g in zip(module.parameters(), grads))
    assert grads[-1].dtype == torch.bfloat16 and all(torch.isfinite(g).all() for g in grads)
    reference_module = copy.deepcopy(module)
    reference_module.backend = "torch"
    ref_out, ref_grads = run(reference_module, x.bfloat16())
    exact_module = copy.deepcopy(reference_module).double()
    exact_out, exact_grads = run(exact_module, x.double())  # autocast leaves float64 alone

    assert rel_err(out, exact_out) <= TOLERANCE[torch.bfloat16]
    assert rel_err(out, exact_out) <= 2 * rel_err(ref_out, exact_out) + TOLERANCE[torch.float32]
    mean_err = sum(rel_err(g, e) for g, e in zip(grads, exact_grads)) / len(grads)
    ref_mean_err = sum(rel_err(r, e) for r, e in zip(ref_grads, exact_grads)) / len(grads)
    assert mean_err <= 2 * ref_mean_err + TOLERANCE[torch.float32], (mean_err, ref_mean_err)


# ---------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
@pytest.mark.parametrize("key_index", [0, "medoid"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_training_step_replays_like_eager(backend, key_index):
    """A whole forward + backward captured with make_graphed_callables replays, on fresh data,
    what eager computes: nothing in the step syncs with the host. The dense layers may pick other
    cuBLAS kernels under capture, so the module is held to float32 tolerance; the fused op alone
    is held to bit equality below (TransformerEngine's check)."""
    backend_device(backend)
    module = _randomize(VTokEncoder(64, 32, num_heads=4, frames_per_token=2, key_index=key_index,
                                    backend=backend), seed=7).cuda()
    eager_module = copy.deepcopy(module)
    static_x = torch.randn(2, 9, 33, 64, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(module, (static_x,), num_warmup_iters=3)
    for _ in range(2):
        x = torch.randn_like(static_x).requires_grad_(True)
        x_eager = x.detach().clone().requires_grad_(True)
        module.zero_grad()
        eager_module.zero_grad()
        out = graphed(x)
        grad = torch.randn_like(out)
        out.backward(grad)
        eager_out = eager_module(x_eager)
        eager_out.backward(grad)
        torch.cuda.synchronize()
        assert_close(out, eager_out, torch.float32, "graphed tokens")
        assert_close(x.grad, x_eager.grad, torch.float32, "graphed grad x")
        for (name, p), e in zip(module.named_parameters(), eager_module.parameters()):
            assert_close(p.grad, e.grad, torch.float32, f"graphed grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_of_the_fused_op_is_bit_equal(backend):
    backend_device(backend)
    query = torch.randn(64, device="cuda")

    def tokenize(x):
        return vk.encode(x, 0, pool="attn", query=query, num_heads=4, frames_per_token=2,
                         spatial=(2, 3), backend=backend).sequence

    static_x = torch.randn(2, 9, 5, 7, 64, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm up (Triton compiles and autotunes) outside the capture
            tokenize(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = tokenize(static_x)
    for _ in range(2):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            assert torch.equal(static_out, tokenize(x))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compile_reduce_overhead_uses_cuda_graphs(backend):
    backend_device(backend)
    torch._dynamo.reset()
    module = _randomize(VTokEncoder(64, 32, num_heads=4, backend=backend), seed=8).cuda()
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(2, 9, 33, 64, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            out = compiled(x).clone()
            assert_close(out, module(x), torch.bfloat16, "reduce-overhead tokens")


# ---------------------------------------------------------------------------- select_key_frames
def _energies(frames: torch.Tensor) -> torch.Tensor:
    """Brute force: sum over t' of ||x[t] - x[t']||^2, from the [B, T, T] pairwise table, float64."""
    flat = frames.reshape(frames.shape[0], frames.shape[1], -1).double()
    return (flat[:, :, None] - flat[:, None, :]).square().sum(-1).sum(-1)


def _assert_medoid(chosen: torch.Tensor, frames: torch.Tensor) -> None:
    energies = _energies(frames)
    best = energies.min(dim=1).values
    picked = energies.gather(1, chosen.cpu().reshape(-1, 1)).squeeze(1)
    assert torch.all(picked <= best * (1 + 1e-6)), (picked, best)
    # Where the best frame is clearly better than the runner-up, the index itself must match.
    if frames.shape[1] > 1:
        second = energies.topk(2, dim=1, largest=False).values[:, 1]
        clear = second > best * (1 + 1e-4)
        assert torch.equal(chosen.cpu()[clear], energies.argmin(dim=1)[clear])


@pytest.mark.parametrize("shape, dtype", [
    ((3, 7, 5, 12), torch.float32),
    ((2, 6, 3, 4, 20), torch.float32),
    ((4, 9, 11, 3), torch.bfloat16),
    ((1, 1, 5, 8), torch.float32),
    ((2, 3, 1, 1), torch.float64),
])
def test_medoid_matches_brute_force(shape, dtype):
    # Frames close to one another, as in a video: a large shared signal and small motion.
    base = torch.randn(shape[0], 1, *shape[2:]) * 20
    x = (base + torch.randn(shape)).to(dtype)
    chosen = vk.select_key_frames(x, "medoid")
    assert chosen.dtype == torch.int64 and chosen.shape == (shape[0],)
    _assert_medoid(chosen, x)


def test_medoid_reads_strided_views_and_finds_a_planted_medoid():
    x = torch.randn(3, 12, 6, 10)
    view = x[:, ::2, 1::2]  # frames and patches strided, not mergeable into one dim
    _assert_medoid(vk.select_key_frames(view, "medoid"), view.contiguous())
    planted = torch.randn(2, 5, 4, 6)
    planted[:, 3] = planted.mean(dim=1) + 1e-3 * torch.randn(2, 4, 6)  # nearest the mean frame
    assert vk.select_key_frames(planted, "medoid").tolist() == [3, 3]


def test_medoid_in_frame_chunks_matches_one_pass(monkeypatch):
    """Eager selection walks x in chunks of frames to bound its float32 temporaries; chunks of
    one, two and three frames (ragged last chunk) give the one-pass answer, batched and packed."""
    from vtok_kernels import keyframes

    x = torch.randn(3, 7, 5, 6) + torch.randn(3, 1, 5, 6) * 5
    packed, cu = x.reshape(21, 5, 6)[:17], torch.tensor([0, 4, 5, 12, 17])
    expected = vk.select_key_frames(x, "medoid")
    expected_packed = vk.select_key_frames(packed, "medoid", cu)
    frame_bytes = 5 * 6 * 4
    for frames_per_chunk in (1, 2, 3):
        monkeypatch.setattr(keyframes, "_CHUNK_BYTES", frames_per_chunk * frame_bytes * 3)  # B = 3
        assert len(keyframes._frame_chunks(7, frame_bytes // 4 * 3)) == -(-7 // frames_per_chunk)
        assert torch.equal(vk.select_key_frames(x, "medoid"), expected)
        monkeypatch.setattr(keyframes, "_CHUNK_BYTES", frames_per_chunk * frame_bytes)
        assert torch.equal(vk.select_key_frames(packed, "medoid", cu), expected_packed)
    _assert_medoid(expected, x)


def test_first_middle_and_usable_as_key_index():
    x = torch.randn(3, 6, 4, 8)
    assert vk.select_key_frames(x, "first").tolist() == [0, 0, 0]
    assert vk.select_key_frames(x, "middle").tolist() == [3, 3, 3]
    assert vk.select_key_frames(x[:, :5], "middle").tolist() == [2, 2, 2]
    keys = vk.select_key_frames(x, "medoid")
    tokens = vk.encode(x, key_index=keys).sequence
    torch.testing.assert_close(tokens, reference.encode(x, keys))


def test_varlen_matches_each_video():
    lengths = [4, 1, 7, 2]
    frames = torch.randn(sum(lengths), 3, 3, 5) + torch.randn(1, 3, 3, 5) * 10
    cu = torch.tensor([0, 4, 5, 12, 14], dtype=torch.int32)
    chosen = vk.select_key_frames(frames, "medoid", cu_frames=cu)
    assert chosen.dtype == torch.int64
    for b, (start, stop) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        video = frames[start:stop][None]
        assert int(chosen[b]) == int(vk.select_key_frames(video, "medoid")[0])
        _assert_medoid(chosen[b:b + 1], video)
    assert vk.select_key_frames(frames, "middle", cu).tolist() == [2, 0, 3, 1]
    assert vk.select_key_frames(frames, "first", cu).tolist() == [0, 0, 0, 0]


def test_non_finite_features_keep_the_index_in_range():
    x = torch.randn(2, 5, 4, 6)
    x[0, 2, 1, 3] = float("nan")
    x[1, 4, 0, 0] = float("inf")
    chosen = vk.select_key_frames(x, "medoid")
    assert ((chosen >= 0) & (chosen < 5)).all()
    packed = torch.randn(6, 4, 6)
    packed[1, 0, 0] = float("nan")
    chosen = vk.select_key_frames(packed, "medoid", torch.tensor([0, 3, 6]))
    assert ((chosen >= 0) & (chosen < 3)).all()


def test_no_gradient_and_compiles_without_a_break():
    x = torch.randn(2, 5, 4, 6, requires_grad=True)
    assert not vk.select_key_frames(x, "medoid").requires_grad
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: vk.select_key_frames(t, "medoid"), fullgraph=True)
    assert torch.equal(compiled(x.detach()), vk.select_key_frames(x, "medoid"))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 3, 4, 5), "random"), ValueError, "method"),
    ((torch.randn(2, 3, 4, 5), 0), TypeError, "method"),
    ((torch.randn(2, 3, 4), "medoid"), ValueError, "x"),
    ((torch.randint(0, 5, (2, 3, 4, 5)), "medoid"), TypeError, "x"),
    ((torch.randn(2, 0, 4, 5), "medoid"), ValueError, "x"),
    ((torch.randn(5, 4, 3), "medoid", torch.tensor([0.0, 5.0])), TypeError, "cu_frames"),
    ((torch.randn(5, 4, 3), "medoid", torch.tensor([0, 4])), ValueError, "cu_frames"),
    ((torch.randn(5, 4, 3), "medoid", torch.tensor([0, 3, 3, 5])), ValueError, "cu_frames"),
])
def test_select_key_frames_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        vk.select_key_frames(*args)


# ------------------------------------------------------------------------------------- examples
def test_train_step_example_runs_and_learns(capsys):
    """examples/train_step.py, as a user runs it, on the CPU: it trains (the loss falls)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_step.py"
    spec = importlib.util.spec_from_file_location("vtok_train_step_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(["--steps", "40", "--device", "cpu"])
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert "40 steps" in capsys.readouterr().out
