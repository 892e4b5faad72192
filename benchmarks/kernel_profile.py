"""Where a benchmark row's time goes on a GPU: the kernels, the host, or the gaps between them.

For each row (cases.py) it measures, in one process:

* ``events``: the benchmark's own number (CUDA events around the call, L2 flushed before it);
* ``graph``: the same call captured in a CUDA graph and replayed (no host work between kernels);
* ``host``: host seconds to enqueue the call (no synchronisation), the floor of ``events`` when
  the device waits on the host;
* ``kernels``: every kernel the call launches with its device time (torch.profiler), and their
  sum, the floor of ``events`` when the host keeps ahead;
* ``host ops`` (``--host-ops``): ``host`` again with the API's calls taken through the
  torch.library ops instead of its eager path (vtok_kernels/ops.py), in the same process.

    python -m benchmarks.kernel_profile --preset clip --frames 16 --json out.json
    python -m benchmarks.kernel_profile --host-ops            # what the ops' dispatch costs per call
    python -m benchmarks.kernel_profile --host-profile 50     # where the host time goes (cProfile)
    ncu ... python -m benchmarks.kernel_profile --once       # each row's call once, for a profiler
    python -m benchmarks.kernel_profile --impl triton --op encode-mean \
        --pin mean_fwd=1,BLOCK_N=16,BLOCK_D=128,CHUNK_G=4,maxnreg=240
                                                  # a Triton config tried without a code change

A row whose ``events`` is far above its ``kernels`` sum is host-bound or gap-bound; one whose
kernels are slow next to the bytes they move is a kernel to fix. ``VTOK_EAGER_FUNCTIONS=0`` in
the environment times every column through the torch.library ops instead of the API's eager path.
The JSON is rewritten after each row, so a run stopped from outside keeps the rows it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

try:
    from benchmarks import cases, roofline
except ImportError:  # pragma: no cover
    import cases
    import roofline


def _events(call, device, repeats):
    return statistics.median(roofline.device_time(call, device, repeats))


def _graph(call, device, repeats):
    """Median seconds of a CUDA-graph replay of call, L2 flushed before each, or None where the
    call cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            call()
    except Exception as exc:  # noqa: BLE001: reported, not fatal
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return statistics.median(roofline.device_time(graph.replay, device, repeats)), ""


def _host(call, device, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def _kernels(call, device, repeats):
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize(device)
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            per_kernel.setdefault(event.name, []).append(event.device_time * 1e-6)
    rows = [{"kernel": name, "calls_per_row": len(t) / repeats, "median_s": statistics.median(t)}
            for name, t in per_kernel.items()]
    rows.sort(key=lambda r: -r["median_s"] * r["calls_per_row"])
    return rows


@contextlib.contextmanager
def _through_ops():
    """The API's calls taken through the torch.library ops, as with VTOK_EAGER_FUNCTIONS=0."""
    from vtok_kernels import ops

    saved, ops.EAGER_FUNCTIONS = ops.EAGER_FUNCTIONS, False
    try:
        yield
    finally:
        ops.EAGER_FUNCTIONS = saved


def _row_key(case: cases.Case) -> dict:
    return {"impl": case.impl, "op": case.op, "mode": case.mode, "preset": case.preset.name,
            "dtype": str(case.dtype).replace("torch.", ""), "batch": case.batch, "frames": case.frames}


def profile_row(case: cases.Case, repeats: int, host_ops: bool = False) -> dict:
    device = torch.device(case.device)
    work = cases.workload(case)
    work.call()
    torch.cuda.synchronize(device)
    moved = case.bytes_moved()
    events = _events(work.call, device, repeats)
    graph, graph_error = _graph(work.call, device, repeats)
    host = _host(work.call, device, repeats)
    ops_host = None
    if host_ops:
        with _through_ops():
            work.call()  # warm-up on the ops' path, as the eager path had one above
            ops_host = _host(work.call, device, repeats)
    kernels = _kernels(work.call, device, repeats)
    kernel_sum = sum(k["median_s"] * k["calls_per_row"] for k in kernels)
    return {"row": case.id, **_row_key(case), "bytes_moved": moved, "events_s": events, "graph_s": graph,
            "graph_error": graph_error, "host_s": host, "host_ops_s": ops_host, "kernel_sum_s": kernel_sum,
            "kernels": kernels}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_profile(case: cases.Case, calls: int, top: int = 25) -> str:
    """cProfile of ``calls`` calls of the row after a warm-up: the host functions by own time."""
    work = cases.workload(case)
    for _ in range(3):
        work.call()
    _sync(case.device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        work.call()
    profiler.disable()
    _sync(case.device)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    # cProfile sees this thread only; the autograd engine runs a CUDA backward on a thread of
    # its own, whose ops torch.profiler records
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            work.call()
        _sync(case.device)
    out.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return out.getvalue()


def pinned_configs(specs: list[str]) -> contextlib.ExitStack:
    """``KIND=WARPS,NAME=VALUE,...`` (e.g. ``stream=8,BLOCK_N=64,BLOCK_D=128``): every launch of
    that Triton kernel family runs this config, autotuner and pruning bypassed."""
    from vtok_kernels.backends.triton import configs

    import triton

    stack = contextlib.ExitStack()
    for spec in specs:
        kind, _, rest = spec.partition("=")
        warps, *blocks = rest.split(",")
        kwargs = {name: int(value) for name, value in (b.split("=") for b in blocks)}
        stages = kwargs.pop("num_stages", 2)
        maxnreg = kwargs.pop("maxnreg", None)
        stack.enter_context(configs.pin(kind, triton.Config(kwargs, num_warps=int(warps), num_stages=stages,
                                                            maxnreg=maxnreg)))
    return stack


def _gbs(moved, seconds):
    return f"{moved / seconds / 1e9:6.0f}" if seconds else "     -"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", default=None, help="clip, siglip, ... (repeatable)")
    parser.add_argument("--frames", type=int, action="append", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--impl", action="append", default=None,
                        help="cuda, cuda-warps, triton, compile-naive, ...")
    parser.add_argument("--op", action="append", default=None, help="encode-mean, encode-attn")
    parser.add_argument("--mode", action="append", default=None, help="fwd, fwd+bwd")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the rows here (rewritten after each row)")
    parser.add_argument("--host-ops", action="store_true",
                        help="also time the host through the torch.library ops (column 'host ops')")
    parser.add_argument("--host-profile", type=int, default=0, metavar="CALLS",
                        help="print a cProfile of CALLS calls per row instead of timing it")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    parser.add_argument("--pin", action="append", default=[], metavar="KIND=WARPS,NAME=VALUE,...",
                        help="run Triton kernels of KIND (mean_fwd, stream, attn_fwd, attn_bwd) with this config "
                        "(num_stages and maxnreg are options, the rest meta-parameters)")
    parser.add_argument("--once", action="store_true",
                        help="run each row's call once and nothing else (under ncu or nsys)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel_profile: no CUDA device", file=sys.stderr)
        return 2
    with pinned_configs(args.pin):
        if args.pin:
            print("pinned: " + "; ".join(args.pin))
        return _run(args)


def _run(args) -> int:
    presets = args.preset or ["clip"]
    rows = [cases.Case(op, mode, impl, cases.PRESETS[preset], frames, args.batch, torch.bfloat16, args.device)
            for preset in presets for frames in args.frames or [16]
            for op in args.op or ["encode-mean", "encode-attn"] for mode in args.mode or ["fwd", "fwd+bwd"]
            for impl in args.impl or ["cuda", "cuda-warps", "triton"]]
    if args.once or args.host_profile:
        for case in rows:
            if args.once:
                cases.workload(case).call()
                _sync(case.device)
                # the row's key, for benchmarks.calibrate to tell whose kernels a profiler saw
                print(f"{case.id}: ran once {json.dumps(_row_key(case))}", flush=True)
            else:
                print(f"==== {case.id}: {args.host_profile} calls\n{host_profile(case, args.host_profile)}", flush=True)
        return 0
    results = []
    bandwidth = roofline.copy_bandwidth(torch.device("cuda"))["bytes_per_s"]
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; GB/s columns: bytes moved over each time")
    ops_column = f" {'host ops':>8s}" if args.host_ops else ""
    print(f"{'row':58s} {'events':>8s} {'graph':>8s} {'host':>8s}{ops_column} {'kernels':>8s}  (us)   "
          f"GB/s ev  graph  kern")
    us = lambda s: f"{s * 1e6:8.1f}" if s else "       -"  # noqa: E731
    for case in rows:
        try:
            row = profile_row(case, args.repeats, args.host_ops)
        except Exception as exc:  # noqa: BLE001: one row's failure is reported
            print(f"{case.id}: {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
            continue
        results.append(row)
        moved = row["bytes_moved"]
        ops_host = f" {us(row['host_ops_s'])}" if args.host_ops else ""
        print(f"{row['row']:58s} {us(row['events_s'])} {us(row['graph_s'])} {us(row['host_s'])}{ops_host} "
              f"{us(row['kernel_sum_s'])}        {_gbs(moved, row['events_s'])} "
              f"{_gbs(moved, row['graph_s'])} {_gbs(moved, row['kernel_sum_s'])}", flush=True)
        if row["graph_error"]:
            print(f"    graph: {row['graph_error']}")
        for k in row["kernels"]:
            print(f"    {k['median_s'] * 1e6:8.1f} us x{k['calls_per_row']:.0f}  {k['kernel'][:110]}")
        if args.json:
            _write_json(args.json, {"copy_bytes_per_s": bandwidth, "rows": results, "torch": torch.__version__,
                                    "device": torch.cuda.get_device_name()})
    return 0


def _write_json(path: str, data: dict) -> None:
    """Whole or not at all: a run stopped while writing keeps the rows of the last write."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
