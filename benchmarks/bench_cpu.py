"""CPU benchmarks: the cpu backend against eager PyTorch and torch.compile, in one run.

    pytest benchmarks/bench_cpu.py --benchmark-only \
        --benchmark-json benchmarks/results/cpu-<cpu>-<date>.json

Rows: (B, T, N, C) in {(4, 16, 196, 256), (2, 32, 576, 1024)}, float32, pool in {attn (8 heads),
mean}, forward and forward+backward, for
  cpu               vk.encode(..., backend="cpu") (the public API: torch.library op + autograd)
  eager-reference   vtok_kernels.reference.encode, the contract code (one group at a time)
  eager-naive       the naive vectorised PyTorch version of DESIGN section 1 (materialises the
                    residual [B, T-1, N, C])
  compile-reference / compile-naive   torch.compile of the two
Each row's extra_info: bytes that must move (x read once per pass that needs it, tokens
written; backward adds grad_x written and grad tokens read), GB/s at the median time (and at the
best time, the figure least disturbed by other work on a shared machine), and that as a fraction
of the memcpy bandwidth (a large tensor copy_, 2 bytes moved per byte copied) measured in the same
run.
"""
from __future__ import annotations

import os
import platform
import time

import pytest
import torch

import vtok_kernels as vk
from benchmarks.cases import naive_encode  # the same vectorised baseline as the main suite
from vtok_kernels import _extension, reference

SHAPES = {"4x16x196x256": (4, 16, 196, 256), "2x32x576x1024": (2, 32, 576, 1024)}
POOLS = {"attn": 8, "mean": 1}
IMPLS = ("cpu", "eager-reference", "eager-naive", "compile-reference", "compile-naive")
KEY = 0


def _reference(x, query, pool, num_heads):
    return reference.encode(x, KEY, pool=pool, query=query, num_heads=num_heads)


def _cpu(x, query, pool, num_heads):
    return vk.encode(x, KEY, pool=pool, query=query, num_heads=num_heads, backend="cpu").sequence


_COMPILED = {}


def _function(impl: str):
    if impl == "cpu":
        return _cpu
    if impl == "eager-reference":
        return _reference
    if impl == "eager-naive":
        return naive_encode
    if impl not in _COMPILED:
        base = _reference if impl == "compile-reference" else naive_encode
        _COMPILED[impl] = torch.compile(base, dynamic=False)
    return _COMPILED[impl]


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="session")
def memcpy_bandwidth() -> float:
    """Bytes per second of a 256 MiB float32 copy_ (read + write), median of 7."""
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = _median(lambda: dst.copy_(src), 7)
    return 2 * src.numel() * src.element_size() / seconds


def _bytes_moved(shape, pool: str, backward: bool, element_size: int = 4) -> int:
    B, T, N, C = shape
    x = B * T * N * C * element_size
    tokens = B * (N + T - 1) * C * element_size
    moved = x + tokens
    if backward:
        # grad tokens read, grad_x written; attn also reads x again (mean's gradient does not
        # depend on x)
        moved += tokens + x + (x if pool == "attn" else 0)
    return moved


def _environment() -> dict:
    ext = _extension.status()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_isa": ext.get("cpu_isa"),
        "openmp": ext.get("openmp"),
        "processor": platform.processor() or platform.machine(),
        # A shared machine's other work shows up here; compare rows of one run only.
        "load_average_1min": os.getloadavg()[0],
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_encode_cpu(benchmark, memcpy_bandwidth, impl, pool, passes, shape_id):
    if impl == "cpu" and _extension.get() is None:
        pytest.skip(f"cpu backend: {_extension.unavailable_reason()}")
    shape = SHAPES[shape_id]
    num_heads = POOLS[pool]
    backward = passes == "fwd+bwd"
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=backward)
    query = torch.randn(shape[-1]) if pool == "attn" else None
    fn = _function(impl)
    grad = torch.randn(shape[0], shape[2] + shape[1] - 1, shape[3])

    def run():
        if backward:
            x.grad = None
            fn(x, query, pool, num_heads).backward(grad)
        else:
            with torch.no_grad():
                fn(x, query, pool, num_heads)

    run()  # warm-up (and compilation for the compiled rows)
    large = shape[-1] >= 1024
    slow = impl.endswith("reference") or impl == "eager-naive"
    rounds = 3 if large and slow else 5 if slow else 15 if large else 20
    # Every forward+backward allocates a fresh x-sized gradient. On a virtual machine that hands
    # freed memory back to its host, the first allocations after a pause (the previous row)
    # fault their pages in from the host, up to 10x slower; three warm-up rounds measure the
    # steady state of a training loop, which reuses the memory it freed a step before.
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1 if slow else 3)

    stats = benchmark.stats.stats
    moved = _bytes_moved(shape, pool, backward)
    benchmark.extra_info.update(
        impl=impl, pool=pool, passes=passes, shape=list(shape), dtype="float32",
        num_heads=num_heads, bytes_moved=moved, gbps=moved / stats.median / 1e9,
        gbps_best=moved / stats.min / 1e9, memcpy_gbps=memcpy_bandwidth / 1e9,
        roofline_fraction=moved / stats.median / memcpy_bandwidth,
        roofline_fraction_best=moved / stats.min / memcpy_bandwidth,
        **_environment(),
    )
