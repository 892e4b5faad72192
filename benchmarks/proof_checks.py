"""The correctness checks of the GPU proof, for one backend in one process.

    python3 -m benchmarks.proof_checks --backend cuda:extension --device cuda \\
        --checks parity,fuzz,nosync,graphs,loaders --fuzz-cases 300 --seed 7 --shard 0/1 \\
        --deadline EPOCH_SECONDS --jsonl OUTDIR/checks-cuda-extension.jsonl

``--backend`` is a backend name, or ``cuda:<loader>`` to pin the cuda backend's loader
(``extension`` or ``cupy-nvrtc``) before anything is imported. Every result is one JSON line
(written as it happens, so a run cut by its time limit still says what it proved):

* ``parity``: fixed cases, every op x dtype x pass, at the encoders' own sizes (SigLIP, CLIP-L)
  and at odd shapes, against the float64 reference with poisoned outputs (``benchmarks.fuzz``
  runs each case);
* ``fuzz``: seeded random cases (``benchmarks.fuzz``), each failure with its one-line reproducer;
* ``nosync``: encode (batched) and encode_varlen given its sizes, forward and backward, and
  expand, under ``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation through
  torch fails (torch does not see one inside an extension or CuPy: ``graphs`` does);
* ``graphs``: the same calls captured in a CUDA graph and replayed on new inputs give the bits
  of eager calls on those inputs;
* ``loaders``: the cuda backend's two loaders (the extension, CuPy/NVRTC) give the same bits.

On a machine without a GPU the last three run their calls eagerly (no sync mode, no capture) so
that CI exercises them; they prove something only on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from typing import Callable

import torch

CHECKS = ("parity", "fuzz", "nosync", "graphs", "loaders")


# ------------------------------------------------------------------------------- parity cases
def parity_cases(backend: str, sizes: tuple[str, ...] = ("presets", "odd")) -> list:
    """Fixed cases for every dtype of ``backend``: the encoders' grids and widths (SigLIP 27x27 x
    1152 with 16 and 8 heads: head sizes 72 and 144; CLIP-L 24x24 x 1024: 64 and 128), and odd
    shapes (N and C off every block size, T = 1, one video, strided views)."""
    from benchmarks.fuzz import Case
    from vtok_kernels import backends

    dtypes = [str(d).removeprefix("torch.") for d in backends.get(backend).dtypes if str(d) != "torch.float64"]
    cases = []
    seed = 0

    def add(**fields):
        nonlocal seed
        for dtype in dtypes:
            seed += 1
            cases.append(Case(dtype=dtype, data_seed=seed, **fields))

    if "presets" in sizes:
        for grid, C, heads in (([27, 27], 1152, (16, 8)), ([24, 24], 1024, (16, 8))):
            add(op="encode", frames=[5, 5], grid=grid, channels=C)
            for h in heads:
                add(op="encode", frames=[5, 5], grid=grid, channels=C, pool="attn", num_heads=h)
            half = [(grid[0] + 1) // 2, (grid[1] + 1) // 2]  # LLaVA-style 2x2 pooled key frame
            add(op="encode", frames=[6, 6], grid=grid, channels=C, pool="attn", num_heads=heads[0],
                frames_per_token=2, key=[5, -3], spatial=half, five_d=True)
            add(op="encode", frames=[4, 4], grid=grid, channels=C, layout="misaligned", key=-1)
            add(op="encode_varlen", frames=[5, 1, 3], grid=grid, channels=C, pool="attn",
                num_heads=heads[0], key=[2, 0, -1], sizes=True)
            add(op="encode_varlen", frames=[3, 4], grid=grid, channels=C, frames_per_token=2)
            add(op="expand", frames=[5, 5], grid=grid, channels=C, key=[0, 4])
    if "odd" in sizes:
        add(op="encode", frames=[5, 5], grid=[7, 1], channels=12)
        add(op="encode", frames=[5, 5], grid=[7, 1], channels=12, pool="attn", num_heads=3)
        add(op="encode", frames=[6, 6], grid=[7, 1], channels=12, pool="attn", frames_per_token=2)
        add(op="encode", frames=[7], grid=[5, 1], channels=20, frames_per_token=3, key=-1)
        add(op="encode", frames=[4, 4, 4], grid=[13, 1], channels=12, pool="attn", num_heads=2, key=[1, -1, 3])
        add(op="encode", frames=[4, 4], grid=[3, 4], channels=12, spatial=[2, 3], key=1)
        add(op="encode", frames=[4, 4], grid=[3, 5], channels=12, pool="attn", num_heads=4, spatial=[2, 3],
            five_d=True)
        add(op="encode", frames=[1], grid=[5, 1], channels=12, pool="attn", num_heads=2)
        add(op="encode", frames=[3, 3], grid=[1, 1], channels=3)
        add(op="encode", frames=[3, 3], grid=[1, 1], channels=3, pool="attn", num_heads=3, key=-2)
        add(op="encode", frames=[5, 5], grid=[7, 1], channels=12, pool="attn", num_heads=2,
            layout="frames-strided")
        add(op="encode", frames=[4, 4], grid=[7, 1], channels=12, frames_per_token=2, layout="patches-strided")
        add(op="encode", frames=[5, 5], grid=[7, 1], channels=24, pool="attn", num_heads=4, frames_per_token=2,
            layout="videos-strided")
        add(op="encode", frames=[4, 4], grid=[9, 1], channels=40, pool="attn", num_heads=1, layout="time-major")
        add(op="encode", frames=[4, 4], grid=[9, 1], channels=40, layout="misaligned")
        add(op="encode_varlen", frames=[1, 4, 6], grid=[7, 1], channels=12)
        add(op="encode_varlen", frames=[3, 1, 5], grid=[9, 1], channels=12, pool="attn", num_heads=2,
            frames_per_token=2, key=[0, 0, 4])
        add(op="encode_varlen", frames=[5], grid=[3, 3], channels=12, pool="attn", num_heads=3, key=-1,
            spatial=[2, 2], sizes=True)
        add(op="encode_varlen", frames=[2, 7], grid=[2, 5], channels=12, frames_per_token=3, key=1,
            spatial=[1, 2], five_d=True, sizes=True)
        add(op="expand", frames=[5, 5], grid=[7, 1], channels=12)
        add(op="expand", frames=[6, 6, 6], grid=[5, 1], channels=20, frames_per_token=2, key=[0, 5, -2])
        add(op="expand", frames=[7], grid=[1, 1], channels=3, frames_per_token=4, key=-1)
        add(op="expand", frames=[1, 1], grid=[6, 1], channels=12)
        add(op="expand", frames=[5, 5], grid=[7, 1], channels=40, layout="misaligned")
    return cases


# ------------------------------------------------------------------------------- calls on a GPU
# (batch, frames, grid side, channels, heads) of the replayed calls: a GPU takes sizes that give
# every kernel several blocks; the CPU rehearsal (Triton's interpreter) tiny ones.
WORKLOAD_SIZES = {"cuda": (2, 9, 14, 768, 12), "cpu": (2, 5, 4, 24, 3)}


def _workloads(backend: str, device: str, key_tensor: bool = True) -> list[tuple[str, Callable, Callable]]:
    """(name, make inputs, call) for the checks that replay calls: encode mean and attn
    (spatial key, frames_per_token 2, per-video keys), encode_varlen with its sizes, expand;
    each call runs the forward and the gradient of every input.

    ``key_tensor=False`` gives the attn call one int key instead of a key tensor: a tensor key
    is read back to be checked (a ValueError needs its value), except under compile or capture."""
    import vtok_kernels as vk
    from vtok_kernels.reference import num_groups

    B, T, side, C, heads = WORKLOAD_SIZES["cuda" if device.startswith("cuda") else "cpu"]
    N = side * side
    gen = torch.Generator().manual_seed(1234)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def encode_inputs(pool):
        tokens = 4 + num_groups(T, 2) if pool == "attn" else N + T - 1
        return {"x": randn(B, T, N, C).requires_grad_(),
                "query": randn(C, dtype=torch.float32).requires_grad_() if pool == "attn" else None,
                "keys": torch.arange(B, device=device) % T,
                "grad": randn(B, tokens, C)}

    def encode_call(pool):
        def call(inp):
            options = dict(spatial=(2, 2), grid=(side, side), frames_per_token=2, num_heads=heads) \
                if pool == "attn" else {}
            key = inp["keys"] if pool == "attn" and key_tensor else -1 if pool == "attn" else 0
            out = vk.encode(inp["x"], key, pool=pool, query=inp["query"], backend=backend, **options)
            wrt = [inp["x"]] + ([inp["query"]] if inp["query"] is not None else [])
            return (out.sequence,) + torch.autograd.grad(out.sequence, wrt, inp["grad"])
        return call

    lengths = [T, 1, T - 2]
    total_tokens = len(lengths) * N + sum(t - 1 for t in lengths)
    offsets = [0, lengths[0], lengths[0] + 1, sum(lengths)]

    def varlen_inputs():
        return {"x": randn(sum(lengths), N, C).requires_grad_(),
                "cu_frames": torch.tensor(offsets, dtype=torch.int32, device=device),
                "query": randn(C, dtype=torch.float32).requires_grad_(),
                "grad": randn(total_tokens, C)}

    def varlen_call(inp):
        out = vk.encode_varlen(inp["x"], inp["cu_frames"], -1, pool="attn", query=inp["query"], num_heads=heads,
                               backend=backend, max_frames=max(lengths), total_tokens=total_tokens)
        return (out.sequence, out.cu_tokens) + torch.autograd.grad(out.sequence, [inp["x"], inp["query"]],
                                                                   inp["grad"])

    G = num_groups(T, 2)

    def expand_inputs():
        return {"keys": randn(B, N, C).requires_grad_(), "residual": randn(B, G, C).requires_grad_(),
                "grad": randn(B, T, N, C)}

    def expand_call(inp):
        frames = vk.expand(inp["keys"], inp["residual"], T // 2, T, 2, backend=backend)
        return (frames,) + torch.autograd.grad(frames, [inp["keys"], inp["residual"]], inp["grad"])

    return [
        ("encode mean fwd+bwd", lambda: encode_inputs("mean"), encode_call("mean")),
        (f"encode attn spatial fpt2 {'per-video keys' if key_tensor else 'int key'} fwd+bwd",
         lambda: encode_inputs("attn"), encode_call("attn")),
        ("encode_varlen attn with sizes fwd+bwd", varlen_inputs, varlen_call),
        ("expand fwd+bwd", expand_inputs, expand_call),
    ]


def _line(check: str, backend: str, device: str, what: str, ok: bool, message: str = "",
          seconds: float = 0.0) -> dict:
    return {"check": check, "backend": backend, "device": device, "describe": what, "ok": ok,
            "message": message, "seconds": round(seconds, 3)}


def check_nosync(backend: str, spec: str, device: str, emit) -> None:
    """Each workload once to warm up (compilation, autotuning), then again with any host
    synchronisation an error."""
    on_gpu = device.startswith("cuda")
    for what, make, call in _workloads(backend, device, key_tensor=False):
        start = time.perf_counter()
        try:
            inputs = make()
            call(inputs)
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                call(inputs)
            finally:
                if on_gpu:
                    torch.cuda.set_sync_debug_mode("default")
            emit(_line("nosync", spec, device, what, True, seconds=time.perf_counter() - start))
        except Exception as exc:
            emit(_line("nosync", spec, device, what, False, f"{type(exc).__name__}: {exc}"[:400],
                       time.perf_counter() - start))


def _bits(t):
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.is_floating_point() else t


def _bits_equal(a, b) -> str:
    """'' when every tensor of two results holds the same bits (NaNs included), else which differ
    and by how much at most."""
    bad = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            bad.append(f"{i} ({tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype})")
        elif not torch.equal(_bits(x), _bits(y)):
            diff = (x.detach().double() - y.detach().double()).abs().max().item() if x.is_floating_point() else "?"
            bad.append(f"{i} (max |diff| {diff:.3g})" if isinstance(diff, float) else str(i))
    if len(a) != len(b):
        bad.append(f"count {len(a)} != {len(b)}")
    return f"outputs {', '.join(bad)} differ" if bad else ""


def check_graphs(backend: str, spec: str, device: str, emit) -> None:
    """Capture each workload in a CUDA graph, then replay it on new inputs (copied into the
    captured buffers) and compare its bits with an eager call on those inputs."""
    on_gpu = device.startswith("cuda")
    for what, make, call in _workloads(backend, device):
        start = time.perf_counter()
        try:
            static = make()
            if on_gpu:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capturing stream, as capture needs
                    call(static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = call(static)
            else:
                captured = None
            fresh = make()
            with torch.no_grad():
                for name, value in static.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        value.copy_(fresh[name])
            eager = call(static)
            if on_gpu:
                graph.replay()
                torch.cuda.synchronize()
            else:
                captured = call(static)
            problem = _bits_equal(captured, eager)
            emit(_line("graphs", spec, device, what, not problem, problem, time.perf_counter() - start))
        except Exception as exc:
            emit(_line("graphs", spec, device, what, False, f"{type(exc).__name__}: {exc}"[:400],
                       time.perf_counter() - start))


def check_loaders(backend: str, spec: str, device: str, emit) -> None:
    """The cuda backend's loaders on the same inputs: the same kernels, so the same bits."""
    if backend != "cuda":
        return
    from vtok_kernels.backends import cuda

    missing = {name: cuda.loader_reason(name) for name in cuda.LOADERS if cuda.loader_reason(name)}
    if missing:
        emit(_line("loaders", spec, device, "extension vs cupy-nvrtc", False,
                   "; ".join(f"{k}: {v}" for k, v in missing.items())))
        return
    for what, make, call in _workloads(backend, device):
        start = time.perf_counter()
        try:
            inputs = make()
            results = []
            for name in cuda.LOADERS:
                loader = cuda.get_loader(name)
                original = cuda._loader
                cuda._loader = lambda loader=loader: loader
                try:
                    results.append(call(inputs))
                finally:
                    cuda._loader = original
            problem = _bits_equal(*results)
            emit(_line("loaders", spec, device, what, not problem, problem, time.perf_counter() - start))
        except Exception as exc:
            emit(_line("loaders", spec, device, what, False, f"{type(exc).__name__}: {exc}"[:400],
                       time.perf_counter() - start))


# ------------------------------------------------------------------------------- main
def _shard(spec: str) -> tuple[int, int]:
    index, _, count = spec.partition("/")
    index, count = int(index), int(count or 1)
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard: expected k/n with 0 <= k < n, got {spec!r}")
    return index, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, help="triton, cuda:extension, cuda:cupy-nvrtc, cpu, torch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--parity", default="presets,odd", help="parity sizes: presets, odd")
    parser.add_argument("--fuzz-cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--profile", default=None, help="fuzz case sizes (benchmarks.fuzz.PROFILES)")
    parser.add_argument("--shard", type=_shard, default=(0, 1),
                        help="k/n: run parity and fuzz cases i with i %% n == k (the replay checks in shard 0)")
    parser.add_argument("--deadline", type=float, default=math.inf,
                        help="wall-clock time (seconds since the epoch) by which every check has ended")
    parser.add_argument("--jsonl", required=True)
    args = parser.parse_args(argv)

    from benchmarks import fuzz

    name = fuzz.pin_backend(args.backend)
    from vtok_kernels import backends

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checks = [c for c in args.checks.split(",") if c]
    unknown = set(checks) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; expected some of {CHECKS}")
    shard, shards = args.shard
    if shard != 0:
        checks = [c for c in checks if c in ("parity", "fuzz")]
    sink = open(args.jsonl, "a")

    def emit(line: dict) -> None:
        sink.write(json.dumps(line) + "\n")
        sink.flush()
        if not line["ok"] and not line.get("repro"):  # fuzz.run prints its own failures
            print(f"FAIL {line['check']} {args.backend}: {line.get('describe')}: {line['message']}", flush=True)

    def plan(check: str, count: int, what: str) -> None:
        """How many results ``check`` owes: the summary tells a cut run from a complete one."""
        emit({**_line("planned", args.backend, device, what, True), "for": check, "count": count})

    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        emit(_line("available", args.backend, device, f"backend {name} on {device}", False, reason))
        return 1
    loader = getattr(backends.get(name), "loader", "")
    emit(_line("available", args.backend, device, f"backend {name} on {device} (loader {loader})", True))

    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    replays = [c for c in checks if c in ("nosync", "graphs", "loaders")]
    # the replay checks are short; parity and the fuzz stop in time to leave them this much
    reserve = 15.0 * len(replays)

    def left() -> float:
        return args.deadline - time.time()

    mine = lambda indexed: ((i, case) for i, case in indexed if i % shards == shard)  # noqa: E731
    if "parity" in checks:
        cases = list(mine(enumerate(parity_cases(name, tuple(args.parity.split(","))))))
        plan("parity", len(cases), f"{len(cases)} parity cases (shard {shard}/{shards})")
        counts = fuzz.run(args.backend, device, cases, check="parity",
                          budget_s=max(0.0, left() - reserve), emit=emit)
        print(f"parity {args.backend}: {counts['passed']} passed, {counts['failed']} failed, "
              f"{len(cases) - counts['passed'] - counts['failed']} not run", flush=True)
    if "fuzz" in checks:
        profile = fuzz.PROFILES[args.profile or ("gpu" if device.startswith("cuda") else "small")]
        count = len(range(shard, args.fuzz_cases, shards))
        plan("fuzz", count, f"{count} fuzz cases of seed {seed}, profile {profile.name} (shard {shard}/{shards})")
        counts = fuzz.run(args.backend, device, mine(fuzz.draw_cases(seed, args.fuzz_cases, name, profile)),
                          budget_s=max(0.0, left() - reserve), emit=emit)
        print(f"fuzz {args.backend} seed {seed}: {counts['passed']} passed, {counts['failed']} failed of "
              f"{count} in {counts['seconds']:.1f} s", flush=True)
    for check, fn in (("nosync", check_nosync), ("graphs", check_graphs), ("loaders", check_loaders)):
        if check not in checks:
            continue
        if left() < 10:
            emit(_line(check, args.backend, device, "not run: no time left before the deadline", False))
            continue
        fn(name, args.backend, device, emit)
    sink.close()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
