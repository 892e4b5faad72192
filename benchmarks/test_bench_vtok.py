"""The benchmark suite of vtok_kernels: every op x implementation x mode x shape preset.

Commands (from the repository root)::

    # the CPU rows: 72, one video of 16 frames of CLIP and SigLIP, float32 (100 s on an idle
    # 2-core machine, 6 minutes at a load average of 6)
    pytest benchmarks/ --benchmark-only -m "not gpu" --benchmark-json=bench-cpu.json
    # the cpu backend's target shapes: 4 x 16 frames of 14x14x256 and 2 x 32 frames of CLIP-L,
    # encode with mean and 8-head attention pooling, float32 (48 rows, about 3 minutes)
    pytest benchmarks/ --benchmark-only -m "not gpu" --bench-scale cpu-large --benchmark-json=bench-cpu-large.json
    # the GPU rows: 264, 8 videos x 16/32/64 frames of CLIP, SigLIP and a VAE latent, bfloat16
    # (benchmarks/gpu_proof.sh OUTDIR full:bench-encode and full:bench-other run them in two calls;
    # quick runs the headline rows: --bench-scale headline)
    pytest benchmarks/ --benchmark-only -m gpu --benchmark-json=OUTDIR/bench.json
    # then the record, its markdown table and plot, README-table.md and auto's table
    python -m benchmarks.records bench-cpu.json
    # and what VTok saves downstream: tokens and one attention layer per video
    python -m benchmarks.token_economy --out benchmarks/results

``--bench-scale tiny|cpu|cpu-large|headline|gpu|full`` (or ``VTOK_BENCH_SCALE``) changes the shapes (cases.py).
``-k`` selects rows by id, ``{device}-{op}-{mode}-{impl}-{preset}-B{b}xT{t}-{dtype}``, e.g.
``-k "encode-attn and cpu-"``.

Each row times one call (the forward, or forward and backward) in pytest-benchmark's pedantic
mode. On a GPU the timer reads CUDA events and the L2 cache is flushed before every round; on the
CPU it is the host clock. ``extra_info`` holds what the records need: the bytes the op must move,
the GB/s at the median time, the fraction of the copy bandwidth measured on the same device in
the same run, the peak memory of one call, the first call's time (compilation, autotuning) and
NVML telemetry before and after the timed rounds. With ``VTOK_BENCH_ROWS=FILE`` each row is
also appended to FILE as one JSON line the moment it is measured.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from benchmarks import cases, roofline
from benchmarks.conftest import copy_bandwidth
from vtok_kernels import backends, telemetry


def _skip_unavailable(case: cases.Case) -> None:
    if case.impl in cases.BASELINES:
        return
    if case.impl == "triton" and case.device == "cpu":
        pytest.skip("triton on the CPU is its interpreter, meant for tests")
    reason = backends.unavailable_reason(case.impl, case.device)
    if reason is not None:
        pytest.skip(f"backend {case.impl} unavailable on {case.device}: {reason}")
    if case.dtype not in backends.get(case.impl).dtypes:
        pytest.skip(f"backend {case.impl} has no {case.dtype}")


def _rounds(seconds_per_call: float, scale: cases.Scale) -> int:
    wanted = int(scale.round_budget_s / max(seconds_per_call, 1e-6))
    return max(scale.min_rounds, min(scale.max_rounds, wanted))


def test_bench(benchmark, case: cases.Case, request):
    _skip_unavailable(case)
    device = torch.device(case.device)
    scale_name = request.config.getoption("--bench-scale") or cases.DEFAULT_SCALE[case.device]
    scale = cases.SCALES[scale_name]
    benchmark.group = f"{case.device} {case.op} {case.mode} {case.preset.name} B{case.batch}xT{case.frames}"

    bandwidth = copy_bandwidth(device)
    work = cases.workload(case)
    start = time.perf_counter()
    work.call()  # compilation, autotuning, allocator warm-up
    roofline.synchronize(device)
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    peak_bytes, peak_method = cases.peak_memory(work.call, device)
    estimate = time.perf_counter() - start  # on the CPU a little above one call (the profiler)
    if device.type == "cuda":
        estimate = min(roofline.wall_time(work.call, device, repeats=1))

    if benchmark.disabled:
        return
    setup = None
    if device.type == "cuda":
        # CUDA-event timing; no public API sets a per-test timer, so the fixture's own is replaced
        benchmark._timer = roofline.CudaEventTimer()
        setup = roofline.L2Flush(device)
    gpu_index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    before = telemetry.snapshot(gpu_index)
    # Two calls ran already; a slow row needs no further warm-up round. On the CPU a fast row
    # gets three: on a virtual machine that hands freed memory back to its host, the first
    # fresh allocations after a pause (the previous row) fault their pages in from the host, up
    # to 10x slower, where a training loop reuses the memory it freed a step before.
    warmup_rounds = 0 if estimate > 0.5 else 3 if device.type == "cpu" else 1
    benchmark.pedantic(work.call, setup=setup, rounds=_rounds(estimate, scale),
                       warmup_rounds=warmup_rounds, iterations=1)
    after = telemetry.snapshot(gpu_index)

    seconds = benchmark.stats.stats.median
    moved = case.bytes_moved()
    benchmark.extra_info.update({
        "op": case.op,
        "pool": case.pool,
        "mode": case.mode,
        "impl": case.impl,
        "device": case.device,
        "preset": case.preset.name,
        "preset_description": case.preset.description,
        "grid": list(case.preset.grid),
        "channels": case.preset.channels,
        "num_heads": case.num_heads if case.pool == "attn" else 1,
        "batch": case.batch,
        "frames": case.frames,
        "video_frames": list(case.video_frames),
        "dtype": str(case.dtype).replace("torch.", ""),
        "scale": scale.name,
        "timer": "cuda-events, L2 flushed" if device.type == "cuda" else "host perf_counter",
        "bytes_moved": moved,
        "gb_per_s": moved / seconds / 1e9,
        "copy_gb_per_s": bandwidth["bytes_per_s"] / 1e9,
        "roofline_fraction": moved / seconds / bandwidth["bytes_per_s"],
        "peak_memory_bytes": peak_bytes,
        "peak_memory_method": peak_method,
        "first_call_s": first_call_s,
        "threads": torch.get_num_threads(),
        "telemetry_before": before,
        "telemetry_after": after,
    })
    rows_file = os.environ.get("VTOK_BENCH_ROWS")
    if rows_file:
        # one line per row as it is measured: a run stopped at its time limit (the GPU proof's)
        # loses no row measured before, where pytest-benchmark writes its JSON only at the end
        row = {k: v for k, v in benchmark.extra_info.items() if not k.startswith("telemetry")}
        row.update(name=request.node.name, median_s=seconds, min_s=benchmark.stats.stats.min,
                   rounds=benchmark.stats.stats.rounds)
        with open(rows_file, "a") as sink:
            sink.write(json.dumps(row) + "\n")
