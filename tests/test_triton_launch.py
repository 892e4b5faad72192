"""The Triton backend's launchers, beyond what the kernels compute: every grid within CUDA's
limits (65535 programs along axes 1 and 2) whatever the video length, key tokens or batch; the
channel blocks of the combine and spatial-key kernels; no autotuner call when one config
survives the pruning; and a clear error for a new shape under CUDA-graph capture.

The grid tests record what the launchers pass instead of running the kernels (the interpreter
does not enforce CUDA's limits), on meta tensors, so shapes far past 65535 cost nothing."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import vtok_kernels as vk
from vtok_kernels import reference
from tests.utils import assert_close, backend_device, check_expand, features


def _triton_modules():
    from vtok_kernels.backends.triton import configs, encode, expand, launch

    return configs, encode, expand, launch


# --------------------------------------------------------------------------------------------
# Grids: what could pass 65535 is folded (chunked launches, or programs striding over items);
# what stays bounded raises a ValueError before any launch.


class _Recorder:
    """Stands for a jitted kernel or its autotuner: records the grid of each launch (for an
    autotuner, the grid of every config it would benchmark) and runs nothing."""

    def __init__(self, name: str, launches: list, arg_names: list, config_list=(), kind=None):
        self.name, self.launches, self.arg_names = name, launches, arg_names
        self.configs = list(config_list)
        self.kind = kind
        self.cache: dict = {}
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            named = dict(zip(self.arg_names, args))
            if callable(grid):
                # What the autotuner runs: its configs as its pruning leaves them.
                configs, _, _, _ = _triton_modules()
                pruned = configs.pruner(self.kind)(self.configs, {**named, **kwargs})
                for config in pruned:
                    meta = {**named, **kwargs, **config.all_kwargs()}
                    self.launches.append((self.name, tuple(grid(meta)), named))
                self.best_config = pruned[0]
            else:
                self.launches.append((self.name, tuple(grid), named))

        return run


@pytest.fixture
def recorded(monkeypatch):
    """Replaces every Triton kernel and autotuner of the backend with a recorder, with the GPU's
    config lists, combine blocks and split targets (an H100's 132 SMs); yields the launches."""
    configs, encode, expand, _ = _triton_modules()
    monkeypatch.setattr(configs, "active", lambda kind: configs.CONFIG_LISTS[kind])
    monkeypatch.setenv("VTOK_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(encode, "_target_programs", lambda device: 8 * 132)
    monkeypatch.setattr(encode, "_resident_capacity",
                        lambda device, config: 132 * configs.resident_programs(config))
    monkeypatch.setattr(encode, "_combine_block", encode.combine_block)
    monkeypatch.setattr(expand, "_combine_block", encode.combine_block)
    monkeypatch.setattr(encode, "_combine_heads", encode.combine_heads)
    launches: list = []
    # (module, attribute, the kernel it launches, the autotuner's config family or None)
    for module, name, label, kind in (
            (encode, "mean_fwd_kernel", "encode_fwd", None),
            (encode, "attn_fwd_kernel", "encode_fwd", None),
            (encode, "_fwd_mean", "encode_fwd", "mean_fwd"),
            (encode, "_fwd_attn", "encode_fwd", "attn_fwd"),
            (encode, "mean_bwd_kernel", "encode_bwd", None),
            (encode, "attn_bwd_kernel", "encode_bwd", None),
            (encode, "_bwd_stream", "encode_bwd", "stream"),
            (encode, "_bwd_attn", "encode_bwd", "attn_bwd"),
            (encode, "combine_kernel", "combine", None),
            (encode, "attn_combine_kernel", "attn_combine", None),
            (encode, "attn_delta_kernel", "attn_delta", None),
            (encode, "spatial_key_fwd_kernel", "spatial_key_fwd", None),
            (expand, "expand_fwd_kernel", "expand_fwd", None),
            (expand, "_expand_fwd", "expand_fwd", "stream"),
            (expand, "expand_bwd_kernel", "expand_bwd", None),
            (expand, "_expand_bwd", "expand_bwd", "stream"),
            (expand, "combine_kernel", "combine", None)):
        kernel = getattr(module, name)
        arg_names = kernel.arg_names if kind is None else kernel.fn.arg_names
        recorder = _Recorder(label, launches, arg_names,
                             configs.CONFIG_LISTS[kind] if kind else (), kind)
        monkeypatch.setattr(module, name, recorder)
    yield launches


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _encode(x, pool, heads, frames_per_token=1, spatial=(), grid=()):
    _, encode, _, _ = _triton_modules()
    B, C = x.shape[0], x.shape[-1]
    keys = _meta(B, dtype=torch.int64)
    query = _meta(C) if pool == "attn" else None
    sequence, lse, *kept = encode.encode_fwd(x, keys, query, pool, heads, frames_per_token,
                                             spatial, grid)
    encode.encode_bwd(torch.empty_like(sequence), x, keys, query, sequence, lse, pool, heads,
                      frames_per_token, spatial, grid, *kept)


def _encode_varlen(lengths, N, C, pool, heads, spatial=(), grid=()):
    _, encode, _, _ = _triton_modules()
    S = spatial[0] * spatial[1] if spatial else N
    total = sum(S + max(0, length - 1) for length in lengths)
    x = _meta(sum(lengths), N, C)
    cu = _meta(len(lengths) + 1, dtype=torch.int32)
    keys = _meta(len(lengths), dtype=torch.int64)
    query = _meta(C) if pool == "attn" else None
    sequence, lse, *kept = encode.encode_varlen_fwd(x, cu, cu, keys, query, pool, heads, 1,
                                                    spatial, grid, max(lengths), total)
    encode.encode_varlen_bwd(torch.empty_like(sequence), x, cu, cu, keys, query, sequence, lse,
                             pool, heads, 1, spatial, grid, max(lengths), *kept)


def _expand(B, N, C, T):
    _, _, expand, _ = _triton_modules()
    keys = _meta(B, dtype=torch.int64)
    frames = expand.expand_fwd(_meta(B, N, C), _meta(B, T - 1, C), keys, T, 1)
    expand.expand_bwd(frames, keys, T - 1, 1)


LONG = 65538  # frames: 65537 residual tokens, more than grid axis 1 holds

GRID_CASES = {
    # name: (launch, the kernel and the grid-axis-1 items that pass 65535, or None)
    "encode-mean-long-video": (lambda: _encode(_meta(2, LONG, 3, 8), "mean", 1),
                               ("combine", LONG - 1)),
    "encode-attn-long-video": (lambda: _encode(_meta(2, LONG, 3, 8), "attn", 2),
                               ("attn_combine", LONG - 1)),
    "varlen-attn-long-video": (lambda: _encode_varlen([3, LONG, 1], 3, 8, "attn", 2),
                               ("attn_combine", LONG - 1)),
    "varlen-70000-videos": (lambda: _encode_varlen([1, 2] * 35000, 3, 8, "mean", 1), None),
    "spatial-65792-key-tokens": (lambda: _encode(_meta(1, 2, 65792, 2), "mean", 1,
                                                 spatial=(256, 257), grid=(256, 257)),
                                 ("spatial_key_fwd", 65792)),
    "varlen-spatial-65792-key-tokens": (
        lambda: _encode_varlen([2, 1], 65792, 2, "attn", 2, spatial=(256, 257),
                               grid=(256, 257)),
        ("spatial_key_fwd", 65792)),
    "mean-backward-600000-patches": (lambda: _encode(_meta(1, 2, 600_000, 1), "mean", 1),
                                     None),
    "expand-long-video": (lambda: _expand(2, 3, 8, LONG), ("combine", LONG - 1)),
    "expand-600000-patches": (lambda: _expand(1, 600_000, 1, 2), None),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_every_grid_axis_within_cuda_limits(recorded, case):
    """Every launch (every config the autotuner may try) keeps axis 0 within 2**31 - 1 and axes
    1 and 2 within 65535; a kernel chunked along axis 1 covers each of its items once."""
    _, _, _, launch = _triton_modules()
    run, chunked = GRID_CASES[case]
    run()
    assert recorded, f"{case}: nothing launched"
    for name, grid, _ in recorded:
        assert len(grid) == 3 and min(grid) >= 1, f"{case}: {name} grid {grid}"
        assert grid[0] <= launch.MAX_GRID_X, f"{case}: {name} grid {grid}"
        assert max(grid[1:]) <= launch.MAX_GRID_YZ, f"{case}: {name} grid {grid}"
    # The long dimension was really there, and the launches along axis 1 tile it exactly.
    if chunked is not None:
        kernel, items = chunked
        first = "FIRST_GROUP" if kernel in ("combine", "attn_combine") else "FIRST_TOKEN"
        chunks = sorted((named[first], grid[1]) for name, grid, named in recorded
                        if name == kernel)
        assert chunks == [(0, 65535), (65535, items - 65535)], f"{case}: {kernel} {chunks}"
        if "attn" in case:  # the backward's <grad r, r> kernel has the combine's grid
            chunks = sorted((named[first], grid[1]) for name, grid, named in recorded
                            if name == "attn_delta")
            assert chunks == [(0, 65535), (65535, items - 65535)], f"{case}: delta {chunks}"
    if case == "mean-backward-600000-patches":
        splits = [grid[1] for name, grid, _ in recorded if name == "encode_bwd"]
        assert max(splits) == launch.MAX_GRID_YZ  # 75000 patch blocks of 8, capped
    if case == "expand-600000-patches":
        tiles = [grid[0] for name, grid, _ in recorded if name == "expand_fwd"]
        assert max(tiles) == 75_000  # patch blocks of 8, on axis 0


def test_bounded_grids_raise_before_any_launch(recorded):
    """What still bounds a grid (heads, or channel blocks, on axis 2; videos on axis 0) is a
    ValueError naming the argument and the limit, raised before the first launch."""
    with pytest.raises(ValueError, match=r"num_heads: .*65536 programs.*65535"):
        _encode(_meta(1, 2, 1, 65536), "attn", 65536)
    # One channel block more than axis 2 holds at the narrowest config: 128 channels in the
    # mean forward, 64 in its backward and in expand.
    wide = 65535 * 128 + 1
    with pytest.raises(ValueError, match=rf"x: C = {wide} channels in blocks of 128"):
        _encode(_meta(1, 2, 1, wide), "mean", 1)
    wide = 65535 * 64 + 1
    _, encode, _, _ = _triton_modules()
    with pytest.raises(ValueError, match=rf"x: C = {wide} channels in blocks of 64"):
        encode.encode_bwd(_meta(1, 2, wide), _meta(1, 2, 1, wide),
                          _meta(1, dtype=torch.int64), None, _meta(1, 2, wide),
                          _meta(0), "mean", 1, 1, (), ())
    with pytest.raises(ValueError, match=rf"key_tokens: C = {wide} channels in blocks of 64"):
        _expand(1, 1, wide, 2)
    videos = 2**31
    with pytest.raises(ValueError, match=r"cu_frames: videos: .*2147483648 programs"):
        encode.encode_varlen_fwd(_meta(videos, 1, 1), _meta(videos + 1, dtype=torch.int64),
                                 _meta(videos + 1, dtype=torch.int64),
                                 _meta(videos, dtype=torch.int64), None, "mean", 1, 1, (), (),
                                 1, videos)
    with pytest.raises(ValueError, match=r"x: batch: .*2147483648 programs.*2147483647"):
        _encode(_meta(2**31, 2, 1, 1), "mean", 1)
    with pytest.raises(ValueError, match=r"key_tokens: 65536 videos x 65536 patch blocks of 8"):
        _expand(65536, 8 * 65536, 1, 2)
    assert recorded == []


def test_folded_grids_are_bit_identical(monkeypatch):
    """The folds themselves run in the interpreter: with at most 2 programs along axes 1 and 2,
    combine and spatial-key take several launches and the mean backward's splits are capped.
    Same bits as one program per item, and the reference's values."""
    device = backend_device("triton")
    _, encode, _, launch = _triton_modules()
    # One split per video whatever the cap, so the partials' summation order is the same.
    monkeypatch.setattr(encode, "INTERPRET_TARGET_PROGRAMS", 1)

    def run():
        torch.manual_seed(0)
        results = []
        for pool, heads, spatial, grid in (("mean", 1, (2, 3), (4, 5)), ("attn", 3, None, None)):
            x = features((2, 6, 20, 40 if pool == "mean" else 48), torch.float32,
                         device).requires_grad_(True)
            query = (torch.randn(x.shape[-1], device=device, requires_grad=True)
                     if pool == "attn" else None)
            options = dict(pool=pool, num_heads=heads, frames_per_token=1, spatial=spatial,
                           grid=grid)
            out = vk.encode(x, 1, query=query, backend="triton", **options)
            grad = torch.randn(out.sequence.shape, device=device)
            out.sequence.backward(grad)
            x64 = x.detach().double().requires_grad_(True)
            q64 = query.detach().double().requires_grad_(True) if query is not None else None
            ref = reference.encode(x64, 1, query=q64, **options)
            ref.backward(grad.double())
            assert_close(out.sequence, ref.detach(), torch.float32, f"{pool}: sequence")
            assert_close(x.grad, x64.grad, torch.float32, f"{pool}: grad x")
            results += [out.sequence, x.grad] + ([query.grad] if query is not None else [])
        return results + list(check_expand("triton", device, 2, 29, 24, 2, 5, 1, "folded"))

    unfolded = run()
    monkeypatch.setattr(launch, "MAX_GRID_YZ", 2)
    folded = run()
    for index, (a, b) in enumerate(zip(unfolded, folded)):
        assert torch.equal(a, b), f"result {index} changed when the grid is folded"


# --------------------------------------------------------------------------------------------
# Channel blocks of the combine and spatial-key kernels.


@pytest.mark.parametrize("channels,block", [(1024, 1024), (1152, 128), (768, 256), (256, 256)])
def test_combine_block_uses_every_lane_at_the_presets(channels, block):
    _, encode, _, _ = _triton_modules()
    chosen = encode.combine_block(channels)
    blocks = triton.cdiv(channels, chosen)
    assert chosen == block
    assert channels / (blocks * chosen) == 1.0, f"C={channels}: {blocks} blocks of {chosen}"


def test_combine_block_never_pads_more_than_the_next_power_of_two():
    """For every C up to 8192: a power of two, at most 1024 wide, no more idle lanes than the
    former min(1024, next power of two), and at most 1/32 idle where some block allows it."""
    _, encode, _, _ = _triton_modules()
    for channels in range(1, 8193):
        block = encode.combine_block(channels)
        assert block & (block - 1) == 0 and block <= 1024
        padding = triton.cdiv(channels, block) * block - channels
        former = min(1024, triton.next_power_of_2(channels))
        assert padding <= triton.cdiv(channels, former) * former - channels, channels
        if channels > 128 and any(triton.cdiv(channels, b) * b - channels <= channels / 32
                                  for b in encode.COMBINE_BLOCKS):
            assert padding <= channels / 32, channels


def test_combine_block_does_not_change_the_bits(monkeypatch):
    """Each output element sums its own inputs in a fixed order: any block gives the same bits
    (the interpreter's 32 against 16 and 128)."""
    device = backend_device("triton")
    _, encode, expand, _ = _triton_modules()

    def run():
        torch.manual_seed(1)
        x = features((2, 5, 12, 48), torch.float32, device)
        query = torch.randn(48, device=device)
        attn = vk.encode(x, 1, query=query, pool="attn", num_heads=3, frames_per_token=2,
                         backend="triton").sequence
        mean = vk.encode(x, -1, pool="mean", spatial=(3, 2), grid=(4, 3),
                         backend="triton").sequence
        grad = torch.randn(2, 5, 12, 48, device=device)
        _, grad_residual = expand.expand_bwd(grad, torch.tensor([1, 3]), 4, 1)
        return attn, mean, grad_residual

    default = run()
    for block in (16, 128):
        monkeypatch.setattr(encode, "_combine_block", lambda channels: block)
        monkeypatch.setattr(expand, "_combine_block", lambda channels: block)
        for a, b in zip(default, run()):
            assert torch.equal(a, b), f"BLOCK_C={block}"
    # The attention combine's heads per program (the interpreter's 2 against 1 and 4), its
    # head block padded further (16 and 32 against 16 for heads of 16).
    for heads, block_d in ((1, 16), (4, 32)):
        monkeypatch.setattr(encode, "_combine_heads", lambda num_heads, head_dim: (heads, block_d))
        assert torch.equal(default[0], run()[0]), f"BLOCK_HEADS={heads}, BLOCK_D={block_d}"


@pytest.mark.parametrize("heads,head_dim,programs", [(16, 64, 1), (18, 64, 9), (16, 72, 2),
                                                     (8, 144, 2), (12, 64, 3), (1, 1152, 1)])
def test_attention_combine_heads_per_program(heads, head_dim, programs):
    """Whole heads per program, a power of two of them dividing the head count (no idle head
    block), within 1024 channel lanes where a head fits; each head padded to a power of two."""
    _, encode, _, _ = _triton_modules()
    block_heads, block_d = encode.combine_heads(heads, head_dim)
    assert block_d == triton.next_power_of_2(head_dim) and heads % block_heads == 0
    assert block_heads & (block_heads - 1) == 0
    assert block_heads * block_d <= max(1024, block_d)
    assert triton.cdiv(heads, block_heads) == programs


# --------------------------------------------------------------------------------------------
# Autotuning: one surviving config launches directly; capture of an unseen key fails clearly.


class _Kernel:
    def __init__(self, launched: list):
        self.launched = launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((grid, kwargs))


def test_one_surviving_config_launches_without_the_tuner(monkeypatch):
    """With autotuning on, a head that leaves one config after pruning (Triton 3.6 would
    still benchmark it: a device sync per new shape) launches it directly; two or more go
    through the tuner."""
    configs, _, _, launch = _triton_modules()
    monkeypatch.setattr(configs, "active", lambda kind: configs.CONFIG_LISTS[kind])
    monkeypatch.setenv("VTOK_TRITON_AUTOTUNE", "1")
    launched: list = []
    tuned: list = []

    class Tuner:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                tuned.append(kwargs)
                self.best_config = configs.CONFIG_LISTS["attn_fwd"][0]

            return run

    grid = lambda meta: (meta["BLOCK_N"],)  # noqa: E731
    from vtok_kernels.backends.triton.attention import head_blocks

    def head(head_dim):
        hi, lo = head_blocks(head_dim)
        return {"BLOCK_HI": hi, "BLOCK_LO": lo}

    single = [(kind, head_dim) for kind in ("attn_fwd", "attn_bwd")
              for head_dim in (16, 64, 72, 128, 144, 256, 512, 1024)
              if len(configs.pruner(kind)(configs.CONFIG_LISTS[kind], {}, **head(head_dim))) == 1]
    # Attention has one config per band of heads: every head, forward and backward.
    assert len(single) == 16
    for kind, head_dim in single:
        survivor = configs.pruner(kind)(configs.CONFIG_LISTS[kind], {}, **head(head_dim))[0]
        meta = launch.launch(_Kernel(launched), Tuner(), kind, grid, **head(head_dim))
        assert meta == dict(survivor.kwargs)
        assert launched[-1][0] == (survivor.kwargs["BLOCK_N"],)
        assert launched[-1][1]["num_warps"] == survivor.num_warps
        assert launched[-1][1]["num_stages"] == survivor.num_stages
        assert launched[-1][1]["maxnreg"] == survivor.maxnreg  # the registers it is sized for
    assert tuned == [], "the autotuner ran with one config left"
    # Several survivors: the tuner picks.
    launch.launch(_Kernel(launched), Tuner(), "mean_fwd", grid)
    launch.launch(_Kernel(launched), Tuner(), "stream", grid)
    assert len(tuned) == 2


@triton.jit
def _fill_kernel(out_ptr, N, C, NUM_HEADS, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + offs, (offs * 0 + BLOCK_N).to(out_ptr.dtype.element_ty), mask=offs < N)


def test_capture_of_an_unseen_key_raises_before_the_tuner(monkeypatch):
    """A real triton.autotune over two configs: an eager call per shape fills its cache, after
    which a call during capture runs; a shape or dtype it has not seen raises the RuntimeError
    that says how to capture, without benchmarking. VTOK_TRITON_AUTOTUNE=0 captures any
    shape."""
    configs, _, _, launch = _triton_modules()
    two = [triton.Config({"BLOCK_N": 8}, num_warps=1, num_stages=1),
           triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    monkeypatch.setattr(configs, "active", lambda kind: two)
    monkeypatch.setenv("VTOK_TRITON_AUTOTUNE", "1")
    tuner = launch.autotuned(_fill_kernel, "stream")
    benchmarks: list = []
    # The benchmark would time a device sync; count it instead and prefer BLOCK_N=16.
    tuner.do_bench = lambda kernel_call, quantiles: (
        benchmarks.append(1) or [1.0 if len(benchmarks) % 2 == 0 else 2.0] * 3)
    def call(n, dtype=torch.float32):
        out = torch.zeros(n, dtype=dtype)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        launch.launch(_fill_kernel, tuner, "stream", grid, out, n, 4, 1)
        return out

    assert torch.equal(call(20), torch.full((20,), 16.0))  # warm-up: tuned, cached
    assert len(benchmarks) == 2
    capturing = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    assert torch.equal(call(20), torch.full((20,), 16.0))  # seen: no benchmark, no error
    for n, dtype in ((21, torch.float32), (20, torch.float16)):
        with pytest.raises(RuntimeError, match="CUDA graph.*once eagerly.*VTOK_TRITON_AUTOTUNE=0"):
            call(n, dtype)
    assert len(benchmarks) == 2
    monkeypatch.setenv("VTOK_TRITON_AUTOTUNE", "0")
    assert torch.equal(call(21), torch.full((21,), 8.0))  # the default config, no tuner
    capturing["on"] = False
    monkeypatch.setenv("VTOK_TRITON_AUTOTUNE", "1")
    call(21)
    assert len(benchmarks) == 4


# --------------------------------------------------------------------------------------------
# The mean forward's splits: whole waves of the programs the GPU holds, partials small.


def test_wave_splits_take_the_fewest_waves_times_rows():
    """Against every split count allowed: no other takes fewer waves x patch blocks per
    program, and among equals the fewest splits (the fewest partial rows) win."""
    _, encode, _, _ = _triton_modules()

    def cost(rows, items, capacity, splits, block):
        waves = -(-items * splits // capacity)
        blocks = -(-(-(-rows // splits)) // block)  # of the program with the most rows
        return waves * blocks

    for rows, items, capacity, most, block in (
            (576, 256, 2244, 9, 8), (729, 288, 2244, 12, 8), (729, 144, 2112, 92, 8),
            (13, 18, 64, 4, 1), (600_000, 1, 2112, 2000, 4), (7, 5000, 2112, 2, 8),
            (1, 3, 100, 1, 16)):
        splits = encode.wave_splits(rows, items, capacity, most, block)
        assert 1 <= splits <= most
        best = min(cost(rows, items, capacity, s, block) for s in range(1, most + 1))
        assert cost(rows, items, capacity, splits, block) == best
        assert all(cost(rows, items, capacity, s, block) > best for s in range(1, splits))


def test_resident_programs_from_pinned_registers():
    configs, _, _, _ = _triton_modules()
    one_warp = configs._config(1, maxnreg=120, BLOCK_N=8)
    assert configs.resident_programs(one_warp) == 65536 // (120 * 32)  # 17, registers
    assert configs.resident_programs(configs._config(1, maxnreg=64)) == 32  # blocks per SM
    assert configs.resident_programs(configs._config(1, maxnreg=64), (8, 6)) == 16
    # Registers are allocated in units of 8 per thread: 121 costs as much as 128.
    assert configs.resident_programs(configs._config(1, maxnreg=121)) == 65536 // (128 * 32)
    assert configs.resident_programs(configs._config(8, maxnreg=64)) == 4  # threads per SM
    # No cap: counted at the most a thread can hold.
    assert configs.resident_programs(configs._config(4)) == 65536 // (255 * 32 * 4 + 128)


def test_mean_forward_configs_are_told_apart_by_their_parameters():
    """The mean forward's grid depends on a config's registers, but a grid function gets only
    its parameters (configs.holding): no two configs of the list share them."""
    configs, _, _, _ = _triton_modules()
    config_list = configs.MEAN_FWD_CONFIGS
    params = [tuple(sorted(c.kwargs.items())) for c in config_list]
    assert len(set(params)) == len(params)
    for config in config_list:
        assert configs.holding(config_list, {**config.kwargs, "N": 5}) is config


@pytest.mark.parametrize("preset", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pool,heads", [("mean", 1), ("attn", 16), ("attn", 8)])
def test_forward_fills_its_waves_with_small_partials(recorded, preset, dtype, pool, heads):
    """At the benchmark presets on an H100 (132 SMs), every forward config's partial rows stay
    within PARTIAL_SHARE of x's bytes, and its programs fill at least 3/4 of the waves they take
    (the GPU's resident programs per wave) unless one split more would pass that share."""
    configs, encode, _, _ = _triton_modules()
    from benchmarks import cases
    from vtok_kernels.backends.triton.attention import head_blocks

    grid_hw, channels = cases.PRESETS[preset].grid, cases.PRESETS[preset].channels
    batch, frames, patches = 8, 16, grid_hw[0] * grid_hw[1]
    x = _meta(batch, frames, patches, channels, dtype=dtype)
    _encode(x, pool, heads)
    launched = [grid for name, grid, _ in recorded if name == "encode_fwd"]
    if pool == "mean":
        tried = configs.MEAN_FWD_CONFIGS
    else:  # one config per band of heads
        tried = configs.survivors("attn_fwd", configs.ATTN_FWD_CONFIGS,
                                  sum(head_blocks(channels // heads)))
    assert len(launched) == len(tried)
    x_bytes = x.numel() * x.element_size()
    for config, grid in zip(tried, launched):
        programs = grid[0] * grid[1] * grid[2]
        capacity = 132 * configs.resident_programs(config)
        waves = -(-programs // capacity)
        split_bytes = batch * (frames - 1) * channels * 4
        assert grid[1] * split_bytes <= encode.PARTIAL_SHARE * x_bytes, (config, grid)
        assert (programs >= 0.75 * waves * capacity
                or (grid[1] + 1) * split_bytes > encode.PARTIAL_SHARE * x_bytes), (config, grid)


def test_resident_capacity_reads_the_device(monkeypatch):
    """On a CUDA device the capacity is its SMs times the config's resident programs at its
    compute capability (the device's properties stubbed: no GPU here); elsewhere there is none
    (the interpreter's splits)."""
    configs, encode, _, _ = _triton_modules()
    asked = []

    def properties(index):
        asked.append(index)
        return 114, (8, 6)

    monkeypatch.setattr(encode, "_device_capacity", properties)
    config = configs.MEAN_FWD_CONFIGS[0]
    assert encode._resident_capacity(torch.device("cuda", 1), config) == \
        114 * configs.resident_programs(config, (8, 6))
    assert asked == [1]
    assert encode._resident_capacity(torch.device("cpu"), config) is None
