"""pytest-benchmark configuration of the suite (see test_bench_vtok.py for the commands).

Options: ``--bench-scale NAME`` (or ``VTOK_BENCH_SCALE``) runs every device at one scale of
``cases.SCALES`` instead of its default (``cpu`` on the CPU, ``gpu`` on a GPU). Rows on a CUDA
device are marked ``gpu`` and skipped where torch sees no GPU.

Every JSON this suite writes carries, under ``machine_info["vtok"]``: versions, the host's load
at the start and the end of the run, NVML's static device facts, and the copy bandwidth measured
on each device in this run (the roofline every row is divided by).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import cases, roofline
from vtok_kernels import telemetry

_RUN: dict = {"copy_bandwidth": {}}


def pytest_addoption(parser):
    group = parser.getgroup("vtok benchmarks")
    group.addoption(
        "--bench-scale",
        default=os.environ.get("VTOK_BENCH_SCALE"),
        choices=sorted(cases.SCALES),
        help="run every device at this scale of benchmarks/cases.py (default: cpu on the CPU, "
        "gpu on a GPU; env VTOK_BENCH_SCALE)",
    )


def _scale(config, device: str) -> cases.Scale:
    name = config.getoption("--bench-scale") or cases.DEFAULT_SCALE[device]
    return cases.SCALES[name]


def pytest_configure(config):
    _RUN["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _RUN["host_at_start"] = telemetry.host_info()


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for case in cases.cases(device, _scale(metafunc.config, device)):
            params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("case", params)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_proof.sh OUTDIR full:bench-encode on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def copy_bandwidth(device: torch.device) -> dict:
    """The device's copy bandwidth, measured once per run at the first row that needs it."""
    key = device.type
    if key not in _RUN["copy_bandwidth"]:
        _RUN["copy_bandwidth"][key] = roofline.copy_bandwidth(device)
    return _RUN["copy_bandwidth"][key]


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def pytest_benchmark_update_machine_info(config, machine_info):
    import vtok_kernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional for the CPU rows
        triton_version = None
    gpu = None
    if torch.cuda.is_available():
        gpu = {
            "name": torch.cuda.get_device_name(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "nvml": telemetry.device_info(),
        }
    machine_info["vtok"] = {
        "started": _RUN.get("started"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scale": {d: _scale(config, d).name for d in ("cpu", "cuda")},
        "versions": {
            "vtok_kernels": vtok_kernels.__version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "git_commit": _git_commit(),
        "host_at_start": _RUN.get("host_at_start"),
        "host_at_end": telemetry.host_info(),
        "uptime_at_end": _uptime(),
        "gpu": gpu,
        "copy_bandwidth": dict(_RUN["copy_bandwidth"]),
    }
