"""Seeded differential fuzz: random calls of every op on one backend against the float64 reference.

    python3 -m benchmarks.fuzz --backend triton --device cuda --cases 300 --seed 7
    python3 -m benchmarks.fuzz --backend cuda --device cuda --case '{"op": "encode", ...}'

A case is everything a call depends on (op, dtype, shape, memory layout, key, options and the seed
of its data), kept as a small JSON object, so every failure prints as one line that reruns it
alone. Case ``i`` of seed ``s`` is drawn from its own generator: the same (seed, index) gives the
same case on any machine, whatever ran before it.

Each case runs the public API (``vtok_kernels.encode`` / ``encode_varlen`` / ``expand``) forward,
then backward for a random upstream gradient, with every kernel output poisoned (NaN) before
launch, and compares the outputs and the gradients of every input with the reference run in
float64 on the same rounded inputs (``vtok_kernels.testing.TOLERANCE``).

Layouts put the kernels' addressing on trial: frames, patches or videos strided in place,
time-major storage (frames farther apart than videos), rows that start off a 16-byte boundary
(the CUDA scalar path), and a non-unit channel stride (the one copy the API makes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch

import vtok_kernels as vk
from vtok_kernels import backends, reference
from vtok_kernels.testing import TOLERANCE, rel_err

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
OPS = ("encode", "encode_varlen", "expand")
LAYOUTS = {
    "encode": ("contiguous", "frames-strided", "patches-strided", "videos-strided", "time-major",
               "misaligned", "channels-strided"),
    "encode_varlen": ("contiguous", "frames-strided", "patches-strided", "misaligned"),
    "expand": ("contiguous", "videos-strided", "misaligned"),
}


@dataclass
class Case:
    """One call. ``frames`` holds T per video (all equal for the batched ops); ``key`` is an int
    (the same key for every video) or a list (a per-video key tensor)."""

    op: str
    dtype: str
    frames: list
    grid: list  # [H, W]; N = H * W
    channels: int
    pool: str = "mean"
    num_heads: int = 1
    frames_per_token: int = 1
    key: Union[int, list] = 0
    spatial: Optional[list] = None  # [h, w]
    five_d: bool = False  # x passed as [.., H, W, C]; else [.., N, C] (with grid= for spatial)
    layout: str = "contiguous"
    sizes: bool = False  # varlen: pass max_frames / total_tokens (the no-sync path)
    cu_dtype: str = "int64"
    data_seed: int = 0

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        return cls(**json.loads(text))

    def describe(self) -> str:
        parts = [self.op, self.dtype, f"T={self.frames}", f"grid={self.grid[0]}x{self.grid[1]}",
                 f"C={self.channels}", self.pool + (f"/{self.num_heads}h" if self.pool == "attn" else ""),
                 f"fpt={self.frames_per_token}", f"key={self.key}", self.layout]
        if self.spatial:
            parts.append(f"spatial={self.spatial[0]}x{self.spatial[1]}")
        if self.sizes:
            parts.append("sized")
        return " ".join(parts)


def pin_backend(spec: str) -> str:
    """A backend name, ``cuda:<loader>`` (extension, cupy-nvrtc) or ``cuda:<loader>:<design>``
    (tiles, warps): pins the cuda backend's loader through VTOK_CUDA_LOADER, which it reads at its
    first launch, and its forward design through VTOK_CUDA_FWD, which each forward reads. Returns
    the backend name."""
    name, _, pinned = spec.partition(":")
    loader, _, design = pinned.partition(":")
    if loader:
        os.environ["VTOK_CUDA_LOADER"] = loader
    if design:
        os.environ["VTOK_CUDA_FWD"] = design
    return name


def reproducer(case: Case, backend: str, device: str) -> str:
    """One shell line that reruns ``case`` alone; ``backend`` may name a loader (cuda:cupy-nvrtc)."""
    interpreter = "TRITON_INTERPRET=1 " if backend == "triton" and device == "cpu" else ""
    return (f"{interpreter}python3 -m benchmarks.fuzz --backend {backend} --device {device} "
            f"--case '{case.to_json()}'")


# ------------------------------------------------------------------------------- drawing cases
@dataclass(frozen=True)
class Profile:
    """The size of the cases: a GPU takes realistic widths; the Triton interpreter (CI) tiny ones."""

    name: str
    max_batch: int
    max_frames: int
    max_side: int
    mean_channels: tuple
    head_sizes: tuple
    heads: tuple
    max_channels: int
    preset_grids: tuple = ()  # encoders' grids, drawn now and then


PROFILES = {
    "gpu": Profile("gpu", 4, 12, 12, (3, 8, 12, 16, 24, 40, 48, 64, 72, 96, 130, 256, 1024, 1152),
                   (1, 4, 8, 12, 16, 24, 32, 40, 64, 72, 80, 128, 144), (1, 2, 3, 4, 8, 16), 1152,
                   preset_grids=((24, 24), (27, 27))),
    "small": Profile("small", 2, 5, 4, (3, 8, 12, 20, 24), (1, 4, 6, 8, 12), (1, 2, 3), 24),
    # The cuda kernels run by the host emulator (tests/cuda_emulator), which is slow: widths
    # that reach the 16-byte rows with each count of lanes and vectors per lane (heads of 64
    # and 72 among them), and frames of up to 144 patches, several tiles of rows.
    "emulator": Profile("emulator", 3, 9, 12, (8, 24, 40, 64, 72, 136), (8, 16, 24, 40, 64, 72, 80),
                        (1, 2, 3, 4), 216),
}


def draw(seed: int, index: int, backend: str, profile: Profile) -> Case:
    """Case ``index`` of ``seed``: its own generator, so one case is reproducible alone."""
    rng = random.Random(f"{seed}/{index}")
    dtypes = [str(d).removeprefix("torch.") for d in backends.get(backend).dtypes]
    op = rng.choices(OPS, weights=(6, 3, 2))[0]
    dtype = rng.choice(dtypes)
    if rng.random() < 0.1 and profile.preset_grids:
        grid = list(rng.choice(profile.preset_grids))
    else:
        grid = [rng.randint(1, profile.max_side), rng.randint(1, profile.max_side)]
    pool = "mean" if op == "expand" else rng.choice(("mean", "attn"))
    num_heads = 1
    if pool == "attn":
        for _ in range(20):
            num_heads, head = rng.choice(profile.heads), rng.choice(profile.head_sizes)
            if num_heads * head <= profile.max_channels:
                break
        else:
            num_heads, head = 1, profile.head_sizes[0]
        channels = num_heads * head
    else:
        channels = rng.choice(profile.mean_channels)
    fpt = rng.choice((1, 1, 2, 3, 4))
    if op == "encode_varlen":
        frames = [rng.randint(1, profile.max_frames) for _ in range(rng.randint(1, profile.max_batch + 1))]
    else:
        frames = [rng.randint(1, profile.max_frames)] * rng.randint(1, profile.max_batch)
    if rng.random() < 0.3:
        key: Union[int, list] = [rng.randrange(-t, t) for t in frames]
    else:
        shortest = min(frames)
        key = rng.randrange(-shortest, shortest)
    spatial = None
    if op != "expand" and rng.random() < 0.3:
        spatial = [rng.randint(1, grid[0]), rng.randint(1, grid[1])]
    return Case(
        op=op, dtype=dtype, frames=frames, grid=grid, channels=channels, pool=pool,
        num_heads=num_heads, frames_per_token=fpt, key=key, spatial=spatial,
        five_d=rng.random() < 0.5, layout=rng.choice(LAYOUTS[op]),
        sizes=op == "encode_varlen" and rng.random() < 0.5,
        cu_dtype=rng.choice(("int32", "int64")), data_seed=rng.randrange(1 << 31),
    )


def draw_cases(seed: int, count: int, backend: str, profile: Profile) -> Iterator[tuple[int, Case]]:
    for index in range(count):
        yield index, draw(seed, index, backend, profile)


# ------------------------------------------------------------------------------- building inputs
def _laid_out(shape: tuple, layout: str, make: Callable[[tuple], torch.Tensor],
              frame_axis: int = 1) -> torch.Tensor:
    """A tensor of ``shape`` (videos/frames first, channels last) in ``layout``, viewing a larger
    storage where the layout needs one. ``make(storage_shape)`` fills the storage."""
    if layout == "frames-strided":  # every other frame of twice as many
        big = list(shape)
        big[frame_axis] *= 2
        return make(tuple(big))[(slice(None),) * frame_axis + (slice(None, None, 2),)]
    if layout == "patches-strided":  # every other patch row of the frame: dim -2
        big = list(shape)
        big[-2] *= 2
        return make(tuple(big))[..., ::2, :]
    if layout == "videos-strided":  # a batch that starts at the second video of the storage
        big = list(shape)
        big[0] += 1
        return make(tuple(big))[1:]
    if layout == "time-major":  # storage [T, B, ...]: frames of one video farther apart than videos
        return make((shape[1], shape[0]) + tuple(shape[2:])).transpose(0, 1)
    if layout == "misaligned":  # channel rows start one element past a 16-byte boundary
        return make(tuple(shape[:-1]) + (shape[-1] + 1,))[..., 1:]
    if layout == "channels-strided":
        return make(tuple(shape[:-1]) + (2 * shape[-1],))[..., ::2]
    return make(tuple(shape))


def _random(generator: torch.Generator, dtype: torch.dtype, device: str):
    def make(shape):
        # drawn on the host from the case's seed, so a reproducer sees the same values anywhere
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return make


@dataclass
class Inputs:
    args: dict  # tensors the op reads, as the caller passes them
    differentiable: list  # names of the inputs that get a gradient
    options: dict = field(default_factory=dict)


def build_inputs(case: Case, device: str) -> Inputs:
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(case.data_seed)
    make = _random(gen, dtype, device)
    H, W = case.grid
    patch_shape = (H, W) if case.five_d else (case.num_patches,)
    C = case.channels
    options: dict = {}
    if case.op == "expand":
        B, T = len(case.frames), case.frames[0]
        G = reference.num_groups(T, case.frames_per_token)
        key_tokens = _laid_out((B, case.num_patches, C), case.layout, make)
        residual = _laid_out((B, G, C), case.layout, make) if G else make((B, 0, C))
        return Inputs({"key_tokens": key_tokens, "residual_tokens": residual},
                      ["key_tokens", "residual_tokens"], options)
    if case.op == "encode_varlen":
        x = _laid_out((sum(case.frames),) + patch_shape + (C,), case.layout, make, frame_axis=0)
        offsets = [0]
        for t in case.frames:
            offsets.append(offsets[-1] + t)
        cu_frames = torch.tensor(offsets, dtype=getattr(torch, case.cu_dtype), device=device)
        args = {"x": x, "cu_frames": cu_frames}
    else:
        args = {"x": _laid_out((len(case.frames), case.frames[0]) + patch_shape + (C,), case.layout, make)}
    differentiable = ["x"]
    if case.pool == "attn":
        # a unit-normal query gives scores of order one: the softmax neither collapses nor flattens
        args["query"] = torch.randn(C, generator=gen).to(device=device, dtype=torch.float32)
        differentiable.append("query")
    if case.spatial:
        options["spatial"] = tuple(case.spatial)
        if not case.five_d:  # a 5-D x carries its grid
            options["grid"] = tuple(case.grid)
    return Inputs(args, differentiable, options)


def _key(case: Case, device: str):
    if isinstance(case.key, list):
        return torch.tensor(case.key, dtype=torch.int64, device=device)
    return case.key


def _leaves(inputs: Inputs) -> dict:
    """Each differentiable input as a graph input: a view keeps its strides, so the op reads it in
    place, and its gradient comes back in the view's shape."""
    out = dict(inputs.args)
    for name in inputs.differentiable:
        t = out[name]
        if not t.requires_grad:
            out[name] = t.detach().requires_grad_()
    return out


# ------------------------------------------------------------------------------- one case
@dataclass
class Result:
    ok: bool
    errors: dict  # output name -> relative error
    message: str = ""
    seconds: float = 0.0


def _call(case: Case, args: dict, options: dict, backend: Optional[str], device: str):
    """The op (a backend through the public API, or the reference when backend is None) ->
    (differentiable output, extra outputs to compare exactly)."""
    key = _key(case, device)
    common = dict(pool=case.pool, query=args.get("query"), num_heads=case.num_heads,
                  frames_per_token=case.frames_per_token, **options)
    if case.op == "expand":
        T = case.frames[0]
        if backend is None:
            return reference.expand(args["key_tokens"], args["residual_tokens"], key, T,
                                    case.frames_per_token), {}
        return vk.expand(args["key_tokens"], args["residual_tokens"], key, T, case.frames_per_token,
                         backend=backend), {}
    if case.op == "encode_varlen":
        if backend is None:
            seq, cu = reference.encode_varlen(args["x"], args["cu_frames"], key, **common)
            return seq, {"cu_tokens": cu}
        if case.sizes:
            S = case.spatial[0] * case.spatial[1] if case.spatial else case.num_patches
            # max_frames may be any upper bound: a case of its own now and then
            common["max_frames"] = max(case.frames) + case.data_seed % 3
            common["total_tokens"] = sum(S + reference.num_groups(t, case.frames_per_token)
                                         for t in case.frames)
        out = vk.encode_varlen(args["x"], args["cu_frames"], key, backend=backend, **common)
        return out.sequence, {"cu_tokens": out.cu_tokens}
    if backend is None:
        return reference.encode(args["x"], key, **common), {}
    out = vk.encode(args["x"], key, backend=backend, **common)
    return out.sequence, {}


def run_case(case: Case, backend: str, device: str) -> Result:
    """The backend against the float64 reference, forward and backward, outputs poisoned."""
    start = time.perf_counter()
    dtype = DTYPES[case.dtype]
    try:
        inputs = build_inputs(case, device)
        args = _leaves(inputs)
        poisoned = backends.POISON_OUTPUTS
        backends.POISON_OUTPUTS = True
        try:
            out, extra = _call(case, args, inputs.options, backend, device)
            wrt = [args[name] for name in inputs.differentiable]
            gen = torch.Generator().manual_seed(case.data_seed + 1)
            upstream = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
            grads = torch.autograd.grad(out, wrt, upstream, allow_unused=True)
        finally:
            backends.POISON_OUTPUTS = poisoned

        ref_args = dict(args)
        for name in inputs.differentiable:
            ref_args[name] = args[name].detach().double().requires_grad_()
        ref_out, ref_extra = _call(case, ref_args, inputs.options, None, device)
        ref_wrt = [ref_args[name] for name in inputs.differentiable]
        ref_grads = torch.autograd.grad(ref_out, ref_wrt, upstream.double(), allow_unused=True)

        errors, problems = {}, []
        pairs = [("out", out, ref_out)] + [
            (f"grad_{name}", g, r) for name, g, r in zip(inputs.differentiable, grads, ref_grads)]
        for name, got, want in pairs:
            if want is None:  # an input the output does not depend on (the query of T = 1)
                want = torch.zeros_like(ref_args[name.removeprefix("grad_")])
            if got is None:
                got = torch.zeros_like(want)
            if tuple(got.shape) != tuple(want.shape):
                problems.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
                continue
            if got.dtype != (args[name.removeprefix("grad_")].dtype if name != "out" else dtype):
                problems.append(f"{name}: dtype {got.dtype}")
            if not bool(torch.isfinite(got).all()):
                problems.append(f"{name}: non-finite values (an element left unwritten?)")
                continue
            err = rel_err(got, want)
            errors[name] = err
            # a float32 result (the query's gradient next to float64 features) is held to float32's bound
            tolerance = max(TOLERANCE[dtype], TOLERANCE.get(got.dtype, 0.0))
            if not err <= tolerance:
                problems.append(f"{name}: relative error {err:.3g} > {tolerance:.0e}")
        for name, got in extra.items():
            if not torch.equal(got.cpu(), ref_extra[name].cpu()):
                problems.append(f"{name}: {got.tolist()} != {ref_extra[name].tolist()}")
        message = "; ".join(problems)
        return Result(not problems, errors, message, time.perf_counter() - start)
    except Exception as exc:  # a crash of one case is a failure to report, not the end of the run
        return Result(False, {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                      time.perf_counter() - start)


# ------------------------------------------------------------------------------- a run
def record(check: str, backend: str, device: str, case: Case, result: Result, index=None) -> dict:
    """One JSON line of a proof log."""
    return {"check": check, "backend": backend, "device": device, "index": index,
            "case": asdict(case), "describe": case.describe(), "ok": result.ok,
            "errors": {k: float(f"{v:.3g}") for k, v in result.errors.items()},
            "message": result.message, "seconds": round(result.seconds, 4),
            "repro": None if result.ok else reproducer(case, backend, device)}


def run(backend: str, device: str, cases, check: str = "fuzz", budget_s: float = math.inf,
        emit: Callable[[dict], None] = lambda line: None, out=None) -> dict:
    """Runs ``cases`` (pairs (index, Case)) on ``backend`` (a name, or cuda:<loader> already
    pinned) until done or ``budget_s`` is spent; prints each failure with its reproducer;
    returns the counts."""
    start = time.perf_counter()
    out = out or sys.stdout
    name = backend.partition(":")[0]
    passed = failed = 0
    for index, case in cases:
        if time.perf_counter() - start > budget_s:
            break
        result = run_case(case, name, device)
        line = record(check, backend, device, case, result, index)
        emit(line)
        if result.ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {check} {backend} #{index}: {case.describe()}: {result.message}", file=out)
            print(f"  repro: {line['repro']}", file=out, flush=True)
    return {"passed": passed, "failed": failed, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Differential fuzz of a vtok_kernels backend.")
    parser.add_argument("--backend", required=True,
                        help="cuda, triton, cpu or torch; cuda:extension or cuda:cupy-nvrtc pins a loader")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None, help="default: drawn from the clock (printed)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="case sizes (default: gpu on cuda, small on cpu)")
    parser.add_argument("--budget", type=float, default=math.inf, help="stop after this many seconds")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per case here")
    parser.add_argument("--case", default=None, help="run this one case (a reproducer's JSON)")
    args = parser.parse_args(argv)
    name = pin_backend(args.backend)

    reason = backends.unavailable_reason(name, args.device)
    if reason is not None:
        print(f"fuzz: backend {args.backend} unavailable on {args.device}: {reason}", file=sys.stderr)
        return 2
    sink = open(args.jsonl, "a") if args.jsonl else None

    def emit(line):
        if sink:
            sink.write(json.dumps(line) + "\n")
            sink.flush()

    if args.case:
        case = Case.from_json(args.case)
        result = run_case(case, name, args.device)
        emit(record("fuzz", args.backend, args.device, case, result))
        print(f"{'ok' if result.ok else 'FAIL'}: {case.describe()}: "
              f"{result.message or result.errors}")
        return 0 if result.ok else 1
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    profile = PROFILES[args.profile or ("gpu" if args.device.startswith("cuda") else "small")]
    counts = run(args.backend, args.device, draw_cases(seed, args.cases, name, profile),
                 budget_s=args.budget, emit=emit)
    ran = counts["passed"] + counts["failed"]
    print(f"fuzz: {args.backend} on {args.device}, seed {seed}, profile {profile.name}: "
          f"{ran}/{args.cases} cases in {counts['seconds']:.1f} s, {counts['passed']} passed, "
          f"{counts['failed']} failed")
    return 0 if counts["failed"] == 0 and ran == args.cases else 1


if __name__ == "__main__":
    sys.exit(main())
