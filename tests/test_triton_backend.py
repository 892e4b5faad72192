"""What is specific to the Triton backend, beyond the shared parity suite: every autotune config,
strided inputs read in place, varlen with one-frame videos, the saved log-sum-exp, bitwise
determinism, non-finite propagation, and availability. On the CPU the kernels run under
TRITON_INTERPRET=1 (set by conftest before triton is imported), so shapes stay tiny.

The ``gpu`` tests hold the kernels to the same tolerances at the shapes VTok serves (SigLIP,
CLIP features) with the real autotuner."""
from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

import vtok_kernels as vk
from vtok_kernels import backends, reference
from tests.utils import TOLERANCE, assert_close, backend_device, check_expand, features, rel_err


def _device() -> str:
    return backend_device("triton")


def _triton_modules():
    from vtok_kernels.backends.triton import configs, encode, expand

    return configs, encode, expand


def head_blocks(head_dim: int) -> tuple[int, int]:
    from vtok_kernels.backends.triton.attention import head_blocks

    return head_blocks(head_dim)


def _encode_case(device, dtype, shape=(2, 5, 11, 24), pool="attn", num_heads=3,
                 frames_per_token=2, key_index=1, spatial=None, grid=None):
    """Runs encode forward and backward; returns (sequence, grad x, grad query) and the float64
    reference of each on the same rounded inputs."""
    x = features(shape, dtype, device).requires_grad_(True)
    C = shape[-1]
    query = torch.randn(C, device=device, requires_grad=True) if pool == "attn" else None
    options = dict(pool=pool, num_heads=num_heads, frames_per_token=frames_per_token,
                   spatial=spatial, grid=grid)
    out = vk.encode(x, key_index, query=query, backend="triton", **options)
    grad_seq = torch.randn(out.sequence.shape, device=device).to(dtype)
    out.sequence.backward(grad_seq)

    x64 = x.detach().double().requires_grad_(True)
    q64 = query.detach().double().requires_grad_(True) if query is not None else None
    ref = reference.encode(x64, key_index, query=q64, **options)
    ref.backward(grad_seq.double())
    got = (out.sequence, x.grad, query.grad if query is not None else None)
    want = (ref.detach(), x64.grad, q64.grad if q64 is not None else None)
    return got, want


def _assert_all_close(got, want, dtype, what):
    for name, g, w in zip(("sequence", "grad x", "grad query"), got, want):
        if w is not None:
            assert_close(g, w, dtype, f"{what}: {name}")


# --------------------------------------------------------------------------------------------
# Every autotune config computes the same thing (on a GPU the autotuner may pick any of them).


def _config_params():
    configs, _, _ = _triton_modules()
    for kind, config_list in configs.CONFIG_LISTS.items():
        for index, config in enumerate(config_list):
            label = "-".join(f"{k}{v}" for k, v in config.kwargs.items()) + f"-w{config.num_warps}"
            yield pytest.param(kind, index, id=f"{kind}-{label}")


@pytest.mark.parametrize("kind,index", list(_config_params()))
def test_every_autotune_config(kind, index):
    device = _device()
    configs, encode, expand = _triton_modules()
    config = configs.CONFIG_LISTS[kind][index]
    with configs.pin(kind, config):
        if kind in ("stream", "mean_fwd"):
            # Mean pooling (with spatial key tokens) runs its forward on the mean_fwd configs,
            # its backward and expand on the stream configs.
            got, want = _encode_case(device, torch.float32, shape=(2, 4, 12, 40), pool="mean",
                                     num_heads=1, spatial=(2, 3), grid=(3, 4))
            _assert_all_close(got, want, torch.float32, f"mean {config}")
            check_expand("triton", device, 2, 13, 40, 4, 5, 2, str(config))
        else:
            # A head of 16 channels: a block of 16, so BLOCK_N alone varies with the config.
            got, want = _encode_case(device, torch.float32, shape=(2, 4, 13, 48), pool="attn",
                                     num_heads=3, spatial=(3, 1), grid=(13, 1))
            _assert_all_close(got, want, torch.float32, f"attn {config}")


def test_config_pruning_keeps_registers_bounded():
    configs, _, _ = _triton_modules()
    for kind in ("attn_fwd", "attn_bwd"):
        for head_dim in (16, 64, 72, 128, 144, 256, 512):
            hi, lo = head_blocks(head_dim)
            block_d = hi + lo
            kept = [c for c in configs.CONFIG_LISTS[kind] if configs.fits(kind, c, block_d)]
            pruned = configs.pruner(kind)(configs.CONFIG_LISTS[kind], {}, BLOCK_HI=hi,
                                          BLOCK_LO=lo)
            assert pruned, f"{kind}: no config left for a head of {head_dim}"
            smallest = min(configs.CONFIG_LISTS[kind], key=lambda c: c.kwargs["BLOCK_N"] / c.num_warps)
            assert pruned == (kept or [smallest])
            # autotuning off runs what autotuning would choose among: never a tile that does not fit
            assert configs.survivors(kind, configs.CONFIG_LISTS[kind], block_d)[0] == pruned[0]
    # The stream configs do not depend on a head size.
    assert configs.pruner("stream")(configs.STREAM_CONFIGS, {}) == configs.STREAM_CONFIGS


@pytest.mark.parametrize("head_dim", [9, 11, 20, 40])
def test_heads_that_are_not_powers_of_two(head_dim):
    """A head is two power-of-two channel blocks (SigLIP's 72 = 64 + 8, 144 = 128 + 16): the rest
    block full (9 = 8 + 1, 20 = 16 + 4, 40 = 32 + 8) or with masked lanes (11 = 8 + 4)."""
    hi, lo = head_blocks(head_dim)
    assert hi & (hi - 1) == 0 and lo & (lo - 1) == 0  # powers of two (lo may be 0)
    assert hi <= head_dim <= hi + lo if lo else hi == head_dim
    assert lo < 2 * (head_dim - hi)  # less than half the rest block is padding
    got, want = _encode_case(_device(), torch.float32, shape=(2, 4, 12, 2 * head_dim),
                             pool="attn", num_heads=2, frames_per_token=2, key_index=2,
                             spatial=(2, 2), grid=(3, 4))
    _assert_all_close(got, want, torch.float32, f"attn, heads of {head_dim}")


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("switch", ["VTOK_TRITON_AUTOTUNE=0", "use_deterministic_algorithms"])
def test_fixed_rule_launches_the_default_config_without_benchmarking(monkeypatch, switch):
    """Either switch: the first config that fits the head, and the autotuner (which compiles and
    benchmarks every config, and whose choice may differ between processes) never runs."""
    configs, _, _ = _triton_modules()
    from vtok_kernels.backends.triton import launch as launch_module

    monkeypatch.setattr(configs, "active", lambda kind: configs.CONFIG_LISTS[kind])
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, kwargs))

    class Tuner:
        def __getitem__(self, grid):
            raise AssertionError(f"the autotuner ran with {switch}")

    grid = lambda meta: (meta["BLOCK_N"],)  # noqa: E731
    monkeypatch.setenv("VTOK_TRITON_AUTOTUNE", "0" if switch.startswith("VTOK") else "1")
    with _deterministic_algorithms(switch == "use_deterministic_algorithms"):
        for kind, block_d in (("stream", None), ("mean_fwd", None), ("attn_fwd", 256),
                              ("attn_bwd", 256), ("attn_bwd", 16)):
            extra = {"BLOCK_HI": block_d, "BLOCK_LO": 0} if block_d else {}
            meta = launch_module.launch(Kernel(), Tuner(), kind, grid, **extra)
            expected = configs.default(kind, block_d)
            assert configs.fits(kind, expected, block_d or 0) or block_d is None
            assert meta == dict(expected.kwargs)
            assert launched[-1][0] == (expected.kwargs["BLOCK_N"],)
            assert launched[-1][1]["num_warps"] == expected.num_warps
    # a wide head rules out the default of the list: the first config that fits is taken
    assert configs.default("attn_bwd", 256) != configs.CONFIG_LISTS["attn_bwd"][0]
    # both switches off: the autotuner chooses
    monkeypatch.setenv("VTOK_TRITON_AUTOTUNE", "1")
    with _deterministic_algorithms(False), pytest.raises(AssertionError, match="autotuner ran"):
        launch_module.launch(Kernel(), Tuner(), "stream", grid)


# --------------------------------------------------------------------------------------------
# Strided inputs: batch, frame and patch dimensions are read in place.


@pytest.mark.parametrize("layout", ["channels-sliced", "frames-reversed-order", "batch-interleaved",
                                    "channel-strided", "5d-patch-window"])
def test_strided_inputs(layout):
    device = _device()
    dtype = torch.float32
    B, T, N, C = 2, 4, 9, 12
    if layout == "channels-sliced":  # rows padded: patch stride C + 4
        base = features((B, T, N, C + 4), dtype, device)
        x = base[..., 2:C + 2]
    elif layout == "frames-reversed-order":  # frames stored last-to-first, then flipped
        base = features((B, T, N, C), dtype, device)
        x = base.flip(1)
    elif layout == "batch-interleaved":  # [T, B, N, C] storage viewed as [B, T, N, C]
        x = features((T, B, N, C), dtype, device).transpose(0, 1)
    elif layout == "channel-strided":  # the one dimension that the API may copy
        x = features((B, T, N, 2 * C), dtype, device)[..., ::2]
    else:  # a window of a larger [B, T, H, W, C] grid
        x = features((B, T, 5, 6, C), dtype, device)[:, :, 1:4, 2:5]
    x = x.detach().requires_grad_(True)
    query = torch.randn(C, device=device, requires_grad=True)
    out = vk.encode(x, -1, pool="attn", query=query, num_heads=2, backend="triton")
    grad_seq = torch.randn_like(out.sequence)
    out.sequence.backward(grad_seq)
    x64 = x.detach().double().requires_grad_(True)
    q64 = query.detach().double().requires_grad_(True)
    ref = reference.encode(x64, -1, pool="attn", query=q64, num_heads=2)
    ref.backward(grad_seq.double())
    assert_close(out.sequence, ref.detach(), dtype, f"{layout} sequence")
    assert_close(x.grad, x64.grad, dtype, f"{layout} grad x")
    assert_close(query.grad, q64.grad, dtype, f"{layout} grad query")


def test_strided_input_is_not_copied(monkeypatch):
    """The kernel receives the caller's storage when only batch/frame/patch strides are odd."""
    device = _device()
    _, encode, _ = _triton_modules()
    seen = []
    original = encode._forward

    def spy(x, *args, **kwargs):
        seen.append((x.data_ptr(), x.stride()))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(encode, "_forward", spy)
    base = features((3, 9, 8, 12), torch.float32, device)
    x = base[1:, ::2, 1::2]
    vk.encode(x, 0, backend="triton")
    assert seen == [(x.data_ptr(), x.stride())]


# --------------------------------------------------------------------------------------------
# Varlen with one-frame videos (G_b = 0 next to longer videos).


@pytest.mark.parametrize("pool,spatial", [("attn", None), ("attn", (2, 1)), ("mean", (1, 3))])
def test_varlen_one_frame_videos(pool, spatial):
    device = _device()
    dtype = torch.float32
    lengths, N, C = [1, 4, 1, 3], 9, 12
    grid = (3, 3) if spatial else None
    x = features((sum(lengths), N, C), dtype, device).requires_grad_(True)
    cu_frames = torch.tensor([0, 1, 5, 6, 9], dtype=torch.int64, device=device)
    keys = torch.tensor([0, -1, 0, 1], device=device)
    query = torch.randn(C, device=device, requires_grad=True) if pool == "attn" else None
    heads = 3 if pool == "attn" else 1
    options = dict(pool=pool, num_heads=heads, frames_per_token=2, spatial=spatial, grid=grid)
    out = vk.encode_varlen(x, cu_frames, keys, query=query, backend="triton", **options)
    grad_seq = torch.randn_like(out.sequence)
    out.sequence.backward(grad_seq)

    x64 = x.detach().double().requires_grad_(True)
    q64 = query.detach().double().requires_grad_(True) if query is not None else None
    ref_seq, ref_cu = reference.encode_varlen(x64, cu_frames, keys, query=q64, **options)
    ref_seq.backward(grad_seq.double())
    S = spatial[0] * spatial[1] if spatial else N
    assert out.cu_tokens.tolist() == ref_cu.tolist()
    assert out.cu_tokens.tolist() == [0, S, 2 * S + 2, 3 * S + 2, 4 * S + 3]
    assert_close(out.sequence, ref_seq.detach(), dtype, "varlen sequence")
    assert_close(x.grad, x64.grad, dtype, "varlen grad x")
    if query is not None:
        assert_close(query.grad, q64.grad, dtype, "varlen grad query")


# --------------------------------------------------------------------------------------------
# The saved log-sum-exp and the backend functions themselves.


def test_lse_and_float32_residual_tokens_match_reference():
    device = _device()
    _, encode, _ = _triton_modules()
    B, T, N, C, heads = 2, 6, 10, 24, 4
    x = features((B, T, N, C), torch.float32, device)
    query = torch.randn(C, device=device)
    keys = torch.tensor([5, 2], device=device)
    for dtype in (torch.float32, torch.bfloat16):
        sequence, lse, residual32 = encode.encode_fwd(x.to(dtype), keys, query, "attn", heads,
                                                      2, (), ())
        ref_seq, ref_lse = reference.encode(x.to(dtype).double(), keys, "attn",
                                            query.double(), heads, 2, return_lse=True)
        assert lse.shape == (B, 3, heads) and lse.dtype == torch.float32
        assert_close(lse, ref_lse, torch.float32, "lse")
        assert_close(sequence, ref_seq, dtype, "sequence")
        # The residual tokens the backward reads: float32 whatever x's dtype, unrounded.
        assert residual32.shape == (B, 3, C) and residual32.dtype == torch.float32
        assert_close(residual32, ref_seq[:, N:], torch.float32, "residual32")


def test_bins_per_cell_matches_torch_bins():
    _, encode, _ = _triton_modules()
    for size, out in itertools.product(range(1, 12), range(1, 12)):
        if out > size:
            continue
        bins = [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]
        most = max(sum(1 for start, end in bins if start <= cell < end) for cell in range(size))
        assert encode.bins_per_cell(size, out) == most
        assert most <= 2  # what the backward's bin loops are sized for at these sizes


# --------------------------------------------------------------------------------------------
# Determinism: forward and backward twice give the same bits, for every op.


def test_deterministic_varlen_spatial_and_expand():
    device = _device()
    x = features((7, 12, 20), torch.float32, device).requires_grad_(True)
    cu_frames = torch.tensor([0, 3, 7], device=device)
    query = torch.randn(20, device=device, requires_grad=True)
    grad_seq, runs = None, []
    for _ in range(2):
        out = vk.encode_varlen(x, cu_frames, 1, pool="attn", query=query, num_heads=2,
                               spatial=(2, 3), grid=(3, 4), backend="triton")
        grad_seq = torch.randn_like(out.sequence) if grad_seq is None else grad_seq
        runs.append((out.sequence.detach(),
                     *torch.autograd.grad(out.sequence, [x, query], grad_seq)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)

    key_tokens = features((2, 12, 20), torch.float32, device).requires_grad_(True)
    residual = features((2, 3, 20), torch.float32, device).requires_grad_(True)
    grad, runs = None, []
    for _ in range(2):
        frames = vk.expand(key_tokens, residual, 0, 7, 2, backend="triton")
        grad = torch.randn_like(frames) if grad is None else grad
        runs.append((frames.detach(), *torch.autograd.grad(frames, [key_tokens, residual], grad)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Non-finite values propagate where the reference propagates them.


@pytest.mark.parametrize("pool", ["mean", "attn"])
@pytest.mark.parametrize("where", ["non-key", "key"])
def test_non_finite_values_propagate(pool, where):
    device = _device()
    B, T, N, C = 1, 4, 6, 8
    x = features((B, T, N, C), torch.float32, device)
    x[0, 0 if where == "key" else 2, 3, 5] = float("nan")
    query = torch.randn(C, device=device) if pool == "attn" else None
    heads = 2 if pool == "attn" else 1
    out = vk.encode(x, 0, pool=pool, query=query, num_heads=heads, backend="triton")
    ref = reference.encode(x, 0, pool, query, heads)
    assert torch.equal(torch.isnan(out.sequence), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    assert rel_err(out.sequence[finite], ref[finite]) <= TOLERANCE[torch.float32]


# --------------------------------------------------------------------------------------------
# torch.library: opcheck of every op on this backend, and torch.compile(fullgraph=True).


def _op_cases(device):
    x = features((2, 4, 6, 12), torch.float32, device).requires_grad_(True)
    q = torch.randn(12, device=device, requires_grad=True)
    keys = torch.tensor([1, 3], device=device)
    frames = features((5, 6, 12), torch.float32, device).requires_grad_(True)
    cu_frames = torch.tensor([0, 1, 5], device=device)
    cu_tokens = torch.tensor([0, 4, 4 + 4 + 2], device=device)
    vkeys = torch.tensor([0, 2], device=device)
    key_tokens = features((2, 6, 12), torch.float32, device).requires_grad_(True)
    residual = features((2, 3, 12), torch.float32, device).requires_grad_(True)
    ops = torch.ops.vtok
    return {
        "encode-attn": (ops.encode.default, (x, keys, q, "attn", 3, 1, [], [], "triton")),
        "encode-mean-spatial": (ops.encode.default,
                                (x, keys, None, "mean", 1, 2, [1, 2], [2, 3], "triton")),
        "encode_varlen-attn-spatial": (ops.encode_varlen.default,
                                       (frames, cu_frames, cu_tokens, vkeys, q, "attn", 2, 2,
                                        [2, 2], [2, 3], 4, 10, "triton")),
        "expand": (ops.expand.default, (key_tokens, residual, keys, 4, 1, "triton")),
    }


@pytest.mark.parametrize("sample", ["encode-attn", "encode-mean-spatial",
                                    "encode_varlen-attn-spatial", "expand"])
def test_opcheck(sample):
    device = _device()
    op, args = _op_cases(device)[sample]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_compile_fullgraph_matches_eager(pool):
    device = _device()
    torch._dynamo.reset()
    x = features((2, 5, 3, 4, 12), torch.float32, device).requires_grad_(True)
    q = torch.randn(12, device=device, requires_grad=True) if pool == "attn" else None
    heads = 3 if pool == "attn" else 1

    def step(x, q):
        out = vk.encode(x, key_index=-1, pool=pool, query=q, num_heads=heads, frames_per_token=2,
                        spatial=(2, 2), backend="triton")
        return out.residual_tokens.square().sum() + out.key_tokens.sum()

    inputs = [x] + ([q] if q is not None else [])
    loss = torch.compile(step, fullgraph=True)(x, q)
    grads = torch.autograd.grad(loss, inputs)
    loss_ref = step(x, q)
    grads_ref = torch.autograd.grad(loss_ref, inputs)
    # The same kernels run in both; only the loss around them is fused differently.
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


# --------------------------------------------------------------------------------------------
# Availability.


def test_availability_reasons(monkeypatch):
    from vtok_kernels.backends import triton as triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_backend.availability("cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert "not 'mps'" in triton_backend.availability("mps")
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available()" in triton_backend.availability("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.availability("cpu") is None
    assert set(backends.get("triton").dtypes) == {torch.float16, torch.bfloat16, torch.float32}


# --------------------------------------------------------------------------------------------
# GPU: the shapes VTok serves, with the real autotuner.

GPU_CASES = [
    pytest.param((8, 16, 729, 1152), "attn", 8, torch.bfloat16, id="siglip-attn8-bf16"),
    pytest.param((8, 16, 729, 1152), "mean", 1, torch.bfloat16, id="siglip-mean-bf16"),
    pytest.param((4, 32, 576, 1024), "attn", 16, torch.float16, id="clip-attn16-fp16"),
    pytest.param((4, 32, 576, 1024), "attn", 16, torch.float32, id="clip-attn16-fp32"),
    pytest.param((4, 32, 576, 1024), "mean", 1, torch.bfloat16, id="clip-mean-bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,pool,heads,dtype", GPU_CASES)
def test_gpu_realistic_shapes(shape, pool, heads, dtype):
    device = "cuda"
    B, T, N, C = shape
    x = features(shape, dtype, device).requires_grad_(True)
    query = (torch.randn(C, device=device) / math.sqrt(C)).requires_grad_(True) \
        if pool == "attn" else None
    options = dict(pool=pool, num_heads=heads, frames_per_token=2)
    keys = torch.randint(0, T, (B,), device=device)
    out = vk.encode(x, keys, query=query, backend="triton", **options)
    grad_seq = torch.randn_like(out.sequence)
    out.sequence.backward(grad_seq)
    # The float32 reference on the same rounded inputs; the error budget is the dtype's.
    x32 = x.detach().float().requires_grad_(True)
    q32 = query.detach().requires_grad_(True) if query is not None else None
    ref = reference.encode(x32, keys, query=q32, **options)
    ref.backward(grad_seq.float())
    assert_close(out.sequence, ref.detach(), dtype, "sequence")
    assert_close(x.grad, x32.grad, dtype, "grad x")
    if query is not None:
        assert_close(query.grad, q32.grad, dtype, "grad query")
    # Backward twice: the same bits.
    again = torch.autograd.grad(vk.encode(x, keys, query=query, backend="triton",
                                          **options).sequence, [x], grad_seq)[0]
    assert torch.equal(again, x.grad)


@pytest.mark.gpu
def test_gpu_varlen_and_expand_realistic():
    device = "cuda"
    lengths, N, C = [16, 1, 9, 32], 729, 1152
    x = features((sum(lengths), N, C), torch.bfloat16, device).requires_grad_(True)
    cu_frames = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
    query = torch.randn(C, device=device, requires_grad=True)
    out = vk.encode_varlen(x, cu_frames, 0, pool="attn", query=query, num_heads=16,
                           spatial=(14, 14), grid=(27, 27), backend="triton")
    grad_seq = torch.randn_like(out.sequence)
    out.sequence.backward(grad_seq)
    x32 = x.detach().float().requires_grad_(True)
    q32 = query.detach().requires_grad_(True)
    ref, _ = reference.encode_varlen(x32, cu_frames, 0, pool="attn", query=q32, num_heads=16,
                                     spatial=(14, 14), grid=(27, 27))
    ref.backward(grad_seq.float())
    assert_close(out.sequence, ref.detach(), torch.bfloat16, "varlen sequence")
    assert_close(x.grad, x32.grad, torch.bfloat16, "varlen grad x")
    assert_close(query.grad, q32.grad, torch.bfloat16, "varlen grad query")

    key_tokens = features((8, N, C), torch.bfloat16, device).requires_grad_(True)
    residual = features((8, 15, C), torch.bfloat16, device).requires_grad_(True)
    frames = vk.expand(key_tokens, residual, 3, 16, backend="triton")
    grad = torch.randn_like(frames)
    frames.backward(grad)
    k32 = key_tokens.detach().float().requires_grad_(True)
    r32 = residual.detach().float().requires_grad_(True)
    ref = reference.expand(k32, r32, 3, 16)
    ref.backward(grad.float())
    assert_close(frames, ref.detach(), torch.bfloat16, "expand")
    assert_close(key_tokens.grad, k32.grad, torch.bfloat16, "expand grad key")
    assert_close(residual.grad, r32.grad, torch.bfloat16, "expand grad residual")


# --------------------------------------------------------------------------------------------
# Patch-block splits: a program merging many patch blocks, or owning a single one.


@pytest.mark.parametrize("target", [1, 10**6], ids=["merge-all-blocks", "block-per-program"])
def test_split_extremes(monkeypatch, target):
    device = _device()
    _, encode, _ = _triton_modules()
    monkeypatch.setattr(encode, "INTERPRET_TARGET_PROGRAMS", target)
    # The mean forward: one split of every video's rows, or as many as it has patch blocks.
    monkeypatch.setattr(encode, "INTERPRET_CAPACITY", target)
    got, want = _encode_case(device, torch.float32, shape=(2, 5, 29, 24), pool="attn",
                             num_heads=3, frames_per_token=2)
    _assert_all_close(got, want, torch.float32, f"attn, target {target}")
    got, want = _encode_case(device, torch.float32, shape=(1, 4, 29, 40), pool="mean",
                             num_heads=1, frames_per_token=1, key_index=-1)
    _assert_all_close(got, want, torch.float32, f"mean, target {target}")
    key_tokens = features((2, 29, 24), torch.float32, device).requires_grad_(True)
    residual = features((2, 3, 24), torch.float32, device).requires_grad_(True)
    frames = vk.expand(key_tokens, residual, 2, 4, 1, backend="triton")
    grad = torch.randn_like(frames)
    frames.backward(grad)
    k64 = key_tokens.detach().double().requires_grad_(True)
    r64 = residual.detach().double().requires_grad_(True)
    reference.expand(k64, r64, 2, 4, 1).backward(grad.double())
    assert_close(key_tokens.grad, k64.grad, torch.float32, "expand grad key")
    assert_close(residual.grad, r64.grad, torch.float32, "expand grad residual")


@pytest.mark.gpu
@pytest.mark.parametrize("kind,index", list(_config_params()))
@pytest.mark.parametrize("heads", [8, 16], ids=["head144", "head72"])
def test_gpu_every_config_at_siglip_width(kind, index, heads):
    """Each config the autotuner may pick, compiled for the real device, at SigLIP's width."""
    configs, _, _ = _triton_modules()
    config = configs.CONFIG_LISTS[kind][index]
    head_width = sum(head_blocks(1152 // heads))
    if not configs.fits(kind, config, head_width):
        pytest.skip(f"pruned for heads of {head_width} channels")
    pool = "mean" if kind in ("stream", "mean_fwd") else "attn"
    with configs.pin(kind, config):
        got, want = _encode_case("cuda", torch.bfloat16, shape=(2, 9, 729, 1152), pool=pool,
                                 num_heads=heads if pool == "attn" else 1, frames_per_token=2,
                                 spatial=(14, 14), grid=(27, 27))
    _assert_all_close(got, want, torch.bfloat16, f"{pool} {config}")


@pytest.mark.gpu
@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_gpu_deterministic_algorithms_ignore_what_the_autotuner_chose(pool):
    """Under torch.use_deterministic_algorithms(True) a process gives the default config's bits
    even where its autotuner already chose another config for the shape (as a DDP rank that
    timed differently would), and every config stays within the dtype's tolerance."""
    configs, encode, _ = _triton_modules()
    kind = "attn_fwd" if pool == "attn" else "mean_fwd"
    shape, heads = (2, 9, 729, 1152), 8 if pool == "attn" else 1
    x = features(shape, torch.bfloat16, "cuda")
    query = torch.randn(shape[-1], device="cuda") if pool == "attn" else None
    options = dict(pool=pool, num_heads=heads, frames_per_token=2)
    head_width = sum(head_blocks(shape[-1] // heads)) if pool == "attn" else None
    default = configs.default(kind, head_width)
    with configs.pin(kind, default):
        want = vk.encode(x, 1, query=query, backend="triton", **options).sequence
    tuner = encode._fwd_attn if pool == "attn" else encode._fwd_mean
    others = [c for c in configs.survivors(kind, configs.CONFIG_LISTS[kind], head_width)
              if c is not default]
    # attention has one config per head: nothing a tuner could choose differently
    assert bool(others) == (pool == "mean")
    for other in others:
        with configs.pin(kind, other):
            got = vk.encode(x, 1, query=query, backend="triton", **options).sequence
        assert_close(got, want.float(), torch.bfloat16, f"{pool} {other}")
        vk.encode(x, 1, query=query, backend="triton", **options)  # fills the tuner's cache
        for key in tuner.cache:
            tuner.cache[key] = other
        with _deterministic_algorithms(True):
            got = vk.encode(x, 1, query=query, backend="triton", **options).sequence
        assert torch.equal(got, want), f"{pool}: {other} chosen by the tuner changed the bits"
