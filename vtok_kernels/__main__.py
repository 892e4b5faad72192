"""``python -m vtok_kernels [run|info|compile-check|sass-report]``.

``run`` (the default) encodes a realistic batch with every backend available on this machine's
best device, checks each against the reference and prints error, time and throughput.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import vtok_kernels as vk
from vtok_kernels import backends, reference
from vtok_kernels.info import format_info

# CLIP-L/336 features: 24 x 24 patches of 1024 channels.
GRID, CHANNELS = (24, 24), 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, allocator
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def run(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, T = (8, 32) if device.type == "cuda" else (2, 16)
    x = torch.randn(B, T, *GRID, CHANNELS, device=device, dtype=dtype)
    query = torch.randn(CHANNELS, device=device)
    options = dict(key_index=0, pool="attn", query=query, num_heads=8, frames_per_token=1)
    bytes_moved = x.numel() * x.element_size()  # the forward must read x once; the tokens are tiny
    N = GRID[0] * GRID[1]
    print(f"vtok_kernels {vk.__version__} on {device.type}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"))
    print(f"batch: {B} videos x {T} frames x {GRID[0]}x{GRID[1]} patches x {CHANNELS} channels, {dtype}, "
          f"attn pooling with 8 heads: {T * N} -> {N + T - 1} tokens per video\n")

    reference_out = reference.encode(x.float(), **{k: v for k, v in options.items()}).float()
    header = f"{'backend':8s} {'rel. error':>11s} {'forward':>10s} {'GB/s':>8s} {'videos/s':>9s}  note"
    print(header)
    print("-" * len(header))
    failures = 0
    for name in backends.KNOWN_BACKENDS:
        reason = backends.unavailable_reason(name, device.type)
        if reason is not None:
            print(f"{name:8s} {'-':>11s} {'-':>10s} {'-':>8s} {'-':>9s}  unavailable: {reason}")
            continue
        if name == "triton" and backends.triton_interpreted():
            print(f"{name:8s} {'-':>11s} {'-':>10s} {'-':>8s} {'-':>9s}  skipped: the interpreter is for tests")
            continue
        if dtype not in backends.get(name).dtypes:
            print(f"{name:8s} skipped: no {dtype}")
            continue
        out = vk.encode(x, backend=name, **options).sequence
        err = ((out.float() - reference_out).norm() / reference_out.norm()).item()
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        seconds = _time(lambda: vk.encode(x, backend=name, **options), device, args.repeats)
        ok = err <= tolerance
        failures += not ok
        print(f"{name:8s} {err:11.2e} {seconds * 1e3:8.2f}ms {bytes_moved / seconds / 1e9:8.1f} "
              f"{B / seconds:9.1f}  {'ok' if ok else f'ERROR above {tolerance:.0e}'}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtok_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    run_parser = sub.add_parser("run", help="encode a realistic batch with every available backend (default)")
    run_parser.add_argument("--repeats", type=int, default=3)
    sub.add_parser("info", help="versions, the compiled extension and each backend's status")
    sub.add_parser("compile-check", help="compile every GPU kernel ahead of time and report resources",
                   add_help=False)
    sub.add_parser("sass-report", help="read the CUDA kernels' machine code (no GPU) and model the "
                   "benchmark presets' bandwidth with Little's law", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compile-check":
        from vtok_kernels import compile_check

        return compile_check.main(argv[1:])
    if argv and argv[0] == "sass-report":
        from vtok_kernels import machine_code

        return machine_code.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        print(format_info(vk.info()))
        return 0
    if args.command is None:
        args.repeats = 3
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
