"""Host time of one call at a tiny shape, through the API's two dispatch paths side by side.

At a tiny shape the kernels take microseconds: a row's time is what the host spends between the
user's call and the last launch (validation, dispatch, autograd, argument marshalling). ``eager``
is the default path, one torch.autograd.Function around the backend; ``ops`` is the
torch.library ops that tracing takes (``VTOK_EAGER_FUNCTIONS=0``). On a GPU each round starts
from an idle device and times the host clock up to the return of the call, kernels not awaited.

    pytest benchmarks/test_bench_host.py --benchmark-only -m "not gpu" --benchmark-json=host-cpu.json
    pytest benchmarks/test_bench_host.py --benchmark-only -m gpu --benchmark-json=OUTDIR/host.json

The rows carry ``extra_info["host_op"]`` (no ``op``), so ``benchmarks.records`` leaves them out of
the throughput records.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import cases, roofline
from vtok_kernels import backends, ops

PATHS = ("eager", "ops")
HOST_BACKENDS = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton")}
HOST_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
ROUNDS = 500


def _params():
    params = []
    for device, names in HOST_BACKENDS.items():
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for backend in names:
            for op in cases.OPS:
                for mode in cases.MODES:
                    for path in PATHS:
                        params.append(pytest.param(device, backend, op, mode, path, marks=marks,
                                                   id=f"host-{device}-{op}-{mode}-{backend}-{path}"))
    return params


def _on_path(call, eager: bool):
    def timed():
        saved = ops.EAGER_FUNCTIONS
        ops.EAGER_FUNCTIONS = eager
        try:
            return call()
        finally:
            ops.EAGER_FUNCTIONS = saved
    return timed


@pytest.mark.parametrize("device, backend, op, mode, path", _params())
def test_host(benchmark, device, backend, op, mode, path):
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable on {device}: {reason}")
    if backend == "triton" and device == "cpu":
        pytest.skip("triton on the CPU is its interpreter, meant for tests")
    case = cases.Case(op, mode, backend, cases.PRESETS["tiny"], 4, 1, HOST_DTYPE[device], device)
    call = _on_path(cases.workload(case).call, path == "eager")
    dev = torch.device(device)
    for _ in range(3):  # compilation, autotuning, the allocator's first blocks
        call()
    roofline.synchronize(dev)
    benchmark.group = f"host {device} {op} {mode} {backend}"
    setup = (lambda: roofline.synchronize(dev)) if dev.type == "cuda" else None
    benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=50, iterations=1)
    roofline.synchronize(dev)
    benchmark.extra_info.update({
        "host_op": op, "mode": mode, "impl": backend, "path": path, "device": device,
        "shape": [case.batch, case.frames, case.preset.num_patches, case.preset.channels],
        "dtype": str(case.dtype).replace("torch.", ""), "timer": "host perf_counter, kernels not awaited",
        "threads": torch.get_num_threads(),
    })
