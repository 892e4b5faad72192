"""What the benchmark suite measures: shape presets, scales, and one callable per implementation.

A row of the suite is (op, mode, implementation, preset, frames) on one device:

* op: ``encode-mean``, ``encode-attn``, ``encode_varlen`` (mean pooling, videos of two lengths)
  and ``expand``;
* mode: ``fwd`` or ``fwd+bwd`` (the forward and the gradient of every input, through
  ``torch.autograd.grad`` so that nothing accumulates between rounds);
* implementation: a backend through the public API (``cuda``, ``triton``, ``cpu``, ``torch``),
  a second design of one (``cuda-warps``: the cuda encode forward split by warps), or a
  baseline: ``reference`` (``vtok_kernels.reference`` called directly, eager), ``compile``
  (``torch.compile`` of the reference), and for batched encode ``naive`` (the vectorised PyTorch a
  user would write, DESIGN section 1: it materialises the residual [B, T-1, N, C]) and
  ``compile-naive``;
* preset: an encoder's patch grid and width, at a frame count of the scale.

Scales keep the suite affordable where it runs: the 2-core CPU runs one video of 16 frames of
CLIP and SigLIP in float32; a GPU runs 8 videos of 16, 32 and 64 frames of every preset in
bfloat16.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import vtok_kernels as vk
from vtok_kernels import reference

try:  # imported as benchmarks.cases (pytest, tests) or run from benchmarks/ as a script
    from benchmarks import roofline
except ImportError:  # pragma: no cover
    import roofline


@dataclass(frozen=True)
class Preset:
    """A vision encoder's output per frame: an H x W patch grid of C channels."""

    name: str
    grid: tuple[int, int]
    channels: int
    description: str

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_heads(self) -> int:
        # attention pooling heads of 64 channels, as the encoders' own attention uses
        return max(1, self.channels // 64)


PRESETS = {
    "clip": Preset("clip", (24, 24), 1024, "CLIP-L/336: 24x24 x 1024"),
    "siglip": Preset("siglip", (27, 27), 1152, "SigLIP-so400m/384: 27x27 x 1152"),
    "vae": Preset("vae", (32, 32), 16, "VAE latent (SD3/FLUX, 256 px): 32x32 x 16"),
    "small": Preset("small", (14, 14), 256, "a small encoder: 14x14 x 256"),
    "tiny": Preset("tiny", (5, 3), 24, "tiny: 5x3 x 24 (tests of the suite itself)"),
}

OPS = ("encode-mean", "encode-attn", "encode_varlen", "expand")
MODES = ("fwd", "fwd+bwd")
BASELINES = ("reference", "compile", "naive", "compile-naive")
NAIVE_OPS = ("encode-mean", "encode-attn")
# A second design of a backend, measured beside its default until a GPU has chosen between them:
# the row's implementation name -> (backend, environment during the call). cuda-warps: the cuda
# encode forward split by warps (VTOK_CUDA_FWD=warps, launch.h FwdDesign); expand has one design.
VARIANTS = {"cuda-warps": ("cuda", {"VTOK_CUDA_FWD": "warps"})}
VARIANT_OPS = ("encode-mean", "encode-attn", "encode_varlen")
DEVICE_BACKENDS = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "cuda-warps", "triton")}


@dataclass(frozen=True)
class Scale:
    """The shapes one device runs: batch, presets, frame counts, dtype, and where the slow
    baselines stop."""

    name: str
    batch: int
    presets: tuple[str, ...]
    frames: tuple[int, ...]
    dtype: torch.dtype
    # torch.compile recompiles for every shape (dynamic=False: the compiled baseline at its best),
    # so the compiled baselines run at the smallest frame count only, and for these ops. Of the
    # reference it unrolls the per-video, per-group Python loops: compile time grows with B * G
    # (for B = 8, T = 16 it took 6 to 8 minutes on the 2-core CI machine), so the GPU scale leaves
    # it out and keeps torch.compile of the naive version as its compiled baseline.
    compile_ops: tuple[str, ...] = OPS
    compile_naive_ops: tuple[str, ...] = NAIVE_OPS
    round_budget_s: float = 2.0  # timed seconds per row, split into rounds
    min_rounds: int = 3
    max_rounds: int = 30
    # Explicit (preset, batch, frames) shapes instead of presets x frames at `batch`; the
    # compiled baselines then run at every shape.
    shapes: tuple[tuple[str, int, int], ...] = ()
    ops: tuple[str, ...] = OPS
    num_heads: Optional[int] = None  # attention heads; None: the preset's (64 channels each)
    baselines: tuple[str, ...] = BASELINES  # the baselines the scale times at all
    # baselines timed at the smallest frame count only: the per-video reference loops over
    # B x G groups in Python, seconds a call at 8 x 64 frames
    at_fewest_frames: tuple[str, ...] = ()

    def shape_list(self) -> list[tuple[str, int, int]]:
        if self.shapes:
            return list(self.shapes)
        return [(preset, self.batch, frames) for preset in self.presets for frames in self.frames]

    def compiled_at(self, frames: int) -> bool:
        return bool(self.shapes) or frames == min(self.frames)


SCALES = {
    "cpu": Scale("cpu", 1, ("clip", "siglip"), (16,), torch.float32,
                 compile_ops=("encode-mean", "encode-attn"), round_budget_s=1.5),
    "gpu": Scale("gpu", 8, ("clip", "siglip", "vae"), (16, 32, 64), torch.bfloat16,
                 compile_ops=(), round_budget_s=0.3, min_rounds=10,
                 max_rounds=100, at_fewest_frames=("reference",)),
    "full": Scale("full", 8, ("clip", "siglip", "vae"), (16, 32, 64), torch.bfloat16,
                  round_budget_s=0.5, min_rounds=10, max_rounds=100),
    # The GPU proof's quick stage: the headline rows only, in about a minute; eager PyTorch is
    # the vectorised version (the per-video reference costs seconds a row there).
    "headline": Scale("headline", 8, ("clip", "siglip"), (16,), torch.bfloat16,
                      ops=("encode-mean", "encode-attn"), compile_ops=(), round_budget_s=0.2,
                      min_rounds=10, max_rounds=50, baselines=("naive", "compile-naive")),
    "tiny": Scale("tiny", 1, ("tiny",), (4,), torch.float32, round_budget_s=0.01, min_rounds=2,
                  max_rounds=3),
    # The cpu backend's target shapes: encode with mean and 8-head attention pooling on 4 videos
    # of 16 frames of a small encoder and 2 videos of 32 frames of CLIP-L, float32.
    "cpu-large": Scale("cpu-large", 0, (), (), torch.float32,
                       shapes=(("small", 4, 16), ("clip", 2, 32)),
                       ops=("encode-mean", "encode-attn"), num_heads=8,
                       compile_ops=("encode-mean", "encode-attn"), round_budget_s=1.5,
                       min_rounds=10),
}
DEFAULT_SCALE = {"cpu": "cpu", "cuda": "gpu"}


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    impl: str
    preset: Preset
    frames: int
    batch: int
    dtype: torch.dtype
    device: str
    heads: Optional[int] = None  # attention heads if not the preset's

    @property
    def num_heads(self) -> int:
        return self.heads or self.preset.num_heads

    @property
    def id(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.device}-{self.op}-{self.mode}-{self.impl}-{self.preset.name}-"
                f"B{self.batch}xT{self.frames}-{dtype}")

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def pool(self) -> str:
        return "attn" if self.op == "encode-attn" else "mean"

    @property
    def video_frames(self) -> tuple[int, ...]:
        """Frames per video; varlen packs videos of T and T/2 frames (at least two videos)."""
        if self.op == "encode_varlen":
            videos = max(self.batch, 2)
            return tuple(self.frames if b % 2 == 0 else max(1, self.frames // 2) for b in range(videos))
        return (self.frames,) * self.batch

    def bytes_moved(self) -> int:
        e = torch.empty(0, dtype=self.dtype).element_size()
        if self.op == "expand":
            return roofline.expand_bytes(self.batch, self.frames, self.preset.num_patches,
                                         self.preset.channels, e, backward=self.backward)
        shape = roofline.EncodeShape(
            self.video_frames, self.preset.num_patches, self.preset.channels, e, pool=self.pool,
            num_heads=self.num_heads if self.pool == "attn" else 1,
        )
        return roofline.encode_bytes(shape, backward=self.backward)


def cases(device: str, scale: Scale) -> list[Case]:
    """Every row of ``scale`` on ``device``, in the order they run."""
    impls = DEVICE_BACKENDS[device] + BASELINES
    rows = []
    for preset, batch, frames in scale.shape_list():
        for op in scale.ops:
            for mode in MODES:
                for impl in impls:
                    if impl in BASELINES and impl not in scale.baselines:
                        continue
                    if impl in scale.at_fewest_frames and frames != min(scale.frames or (frames,)):
                        continue
                    if impl == "compile" and not (scale.compiled_at(frames) and op in scale.compile_ops):
                        continue
                    if impl == "compile-naive" and not (scale.compiled_at(frames) and op in scale.compile_naive_ops):
                        continue
                    if impl.endswith("naive") and op not in NAIVE_OPS:
                        continue
                    if impl in VARIANTS and op not in VARIANT_OPS:
                        continue
                    rows.append(Case(op, mode, impl, PRESETS[preset], frames, batch, scale.dtype,
                                     device, scale.num_heads))
    return rows


# ------------------------------------------------------------------------------- callables
@dataclass
class Workload:
    """The inputs of one row and the call that the row times."""

    call: Callable[[], object]
    inputs: dict = field(default_factory=dict)


def _reference_fn(case: Case) -> Callable:
    """The reference as a function of tensors only, so that torch.compile sees one signature."""
    if case.op == "expand":
        T = case.frames
        return lambda key_tokens, residual_tokens: reference.expand(key_tokens, residual_tokens, 0, T)
    if case.op == "encode_varlen":
        return lambda x, cu_frames: reference.encode_varlen(x, cu_frames, 0, pool="mean")[0]
    if case.pool == "attn":
        heads = case.num_heads
        return lambda x, query: reference.encode(x, 0, pool="attn", query=query, num_heads=heads)
    return lambda x: reference.encode(x, 0, pool="mean")


def naive_encode(x: torch.Tensor, query: Optional[torch.Tensor], pool: str, num_heads: int) -> torch.Tensor:
    """x: [B, T, N, C] -> [B, N + T - 1, C] (key frame 0, one frame per token) in whole-tensor
    PyTorch ops: the residual [B, T-1, N, C] is materialised, and autograd keeps it."""
    B, T, N, C = x.shape
    key = x[:, 0]
    residual = x[:, 1:].float() - key[:, None].float()
    if pool == "mean":
        tokens = residual.mean(dim=2)
    else:
        c = C // num_heads
        d = residual.reshape(B, T - 1, N, num_heads, c)
        scores = torch.einsum("btnhc,hc->btnh", d, query.reshape(num_heads, c)) / math.sqrt(c)
        weights = torch.softmax(scores, dim=2)
        tokens = torch.einsum("btnh,btnhc->bthc", weights, d).reshape(B, T - 1, C)
    return torch.cat([key, tokens.to(x.dtype)], dim=1)


def _naive_fn(case: Case) -> Callable:
    if case.pool == "attn":
        heads = case.num_heads
        return lambda x, query: naive_encode(x, query, "attn", heads)
    return lambda x: naive_encode(x, None, "mean", 1)


def _in_environment(fn: Callable, env: dict) -> Callable:
    """fn, called with ``env`` set (and the environment as it was after)."""
    def call(*args):
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return call


def _backend_fn(case: Case) -> Callable:
    name, env = VARIANTS.get(case.impl, (case.impl, {}))
    if env:
        return _in_environment(_backend_fn(dataclasses.replace(case, impl=name)), env)
    if case.op == "expand":
        T = case.frames
        return lambda key_tokens, residual_tokens: vk.expand(key_tokens, residual_tokens, 0, T, backend=name)
    if case.op == "encode_varlen":
        return lambda x, cu_frames: vk.encode_varlen(x, cu_frames, 0, pool="mean", backend=name).sequence
    if case.pool == "attn":
        heads = case.num_heads
        return lambda x, query: vk.encode(x, 0, pool="attn", query=query, num_heads=heads,
                                          backend=name).sequence
    return lambda x: vk.encode(x, 0, pool="mean", backend=name).sequence


def make_inputs(case: Case, generator: Optional[torch.Generator] = None) -> dict:
    """Fresh random inputs of the row (never zeros), on its device, in its dtype."""
    device, dtype, preset = torch.device(case.device), case.dtype, case.preset
    N, C = preset.num_patches, preset.channels

    def randn(*shape, scale=1.0, dtype=dtype):
        # drawn on the device: a GPU row's gigabyte of features would take seconds on the host
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    grad = case.backward
    if case.op == "expand":
        G = case.frames - 1
        return {"key_tokens": randn(case.batch, N, C).requires_grad_(grad),
                "residual_tokens": randn(case.batch, G, C, scale=0.1).requires_grad_(grad)}
    if case.op == "encode_varlen":
        lengths = case.video_frames
        offsets = [0]
        for t in lengths:
            offsets.append(offsets[-1] + t)
        return {"x": randn(offsets[-1], N, C).requires_grad_(grad),
                "cu_frames": torch.tensor(offsets, dtype=torch.int32, device=device)}
    inputs = {"x": randn(case.batch, case.frames, N, C).requires_grad_(grad)}
    if case.pool == "attn":
        # a unit-normal query gives scores <q_j, d_j> / sqrt(c) of order one (d has variance 2):
        # the softmax neither collapses onto one patch nor flattens out
        inputs["query"] = randn(C, dtype=torch.float32).requires_grad_(grad)
    return inputs


def workload(case: Case) -> Workload:
    """The timed call of ``case``: the forward, or the forward and the gradient of every
    differentiable input for a random upstream gradient."""
    inputs = make_inputs(case)
    if case.impl == "reference":
        fn = _reference_fn(case)
    elif case.impl == "naive":
        fn = _naive_fn(case)
    elif case.impl in ("compile", "compile-naive"):
        torch._dynamo.reset()  # each row compiles afresh: no recompilation limits, no dynamic shapes
        fn = torch.compile(_reference_fn(case) if case.impl == "compile" else _naive_fn(case), dynamic=False)
    else:
        fn = _backend_fn(case)
    args = list(inputs.values())
    if not case.backward:
        def call():
            with torch.no_grad():
                return fn(*args)
        return Workload(call, inputs)
    differentiable = [t for t in args if t.requires_grad]
    upstream: list[torch.Tensor] = []  # made on the first call, which may also compile

    def call():
        out = fn(*args)
        if not upstream:
            upstream.append(torch.randn(out.shape, device=out.device).to(out.dtype))
        return torch.autograd.grad(out, differentiable, upstream[0])

    return Workload(call, inputs)


# --------------------------------------------------------------------------------- memory
def peak_memory(call: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """Bytes allocated by one call above what was live before it, and how they were measured.

    On a GPU the caching allocator's peak. On the CPU the profiler's allocation events, summed
    in time order: the peak of live tensor memory at the granularity of one aten op.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        live = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - live, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage),
        key=lambda e: e.time_range.start,
    )
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, "torch.profiler allocation events (per aten op)"
