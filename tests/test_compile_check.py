"""``python -m vtok_kernels compile-check``: Triton kernels compile ahead of time for a GPU arch
without a GPU, and the report fails on what it must fail on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vtok_kernels import compile_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_compile_check_sm90(tmp_path):
    """Every Triton kernel's default config compiles for sm_90, with ptxas figures and no spill.
    Run as the CLI runs it, from a process with TRITON_INTERPRET=1 (it must re-run without)."""
    report = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "vtok_kernels", "compile-check", "--arch", "sm_90", "--quick",
         "--source", "triton", "--json", str(report)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    kernels = {row["kernel"] for row in rows}
    for name in ("encode_fwd[mean]", "encode_fwd[attn,head<=128]", "encode_bwd[mean]",
                 "encode_bwd[attn,head<=128]", "encode_fwd[attn,varlen]",
                 "encode_bwd[attn,spatial]", "combine[attn]", "spatial_key_fwd",
                 "expand_fwd", "expand_bwd"):
        assert name in kernels, f"{name} missing from the report"
    for row in rows:
        assert row["arch"] == "sm_90" and row["source"] == "triton"
        assert not row["error"], row
        assert 0 < row["registers"] <= 255, row
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert row["shared_bytes"] >= 0
    assert "encode_fwd[mean]" in proc.stdout and "compiles in" in proc.stdout


def test_bad_arch_is_rejected():
    with pytest.raises(SystemExit):
        compile_check.main(["--arch", "hopper", "--source", "triton"])


def test_failure_rules():
    ok = compile_check.Row("k", "sm_80", "c", True, registers=40, spill_stores=0, spill_loads=0)
    spill_default = compile_check.Row("k", "sm_80", "c", True, registers=255, spill_stores=8,
                                      spill_loads=8)
    spill_other = compile_check.Row("k", "sm_80", "c2", False, registers=255, spill_stores=8,
                                    spill_loads=4)
    broken = compile_check.Row("k", "sm_90", "c", False, error="CompilationError: boom")
    assert compile_check.failed([ok, spill_other]) == []
    assert compile_check.failed([ok, spill_default, spill_other, broken]) == [spill_default, broken]
    assert [r.status for r in (ok, spill_default, spill_other, broken)] == \
        ["ok", "SPILL-FAIL", "spill", "ERROR"]
    table = compile_check.format_table([ok, spill_default, broken])
    assert "SPILL-FAIL" in table and "ERROR CompilationError: boom" in table


def test_cuda_rows_are_merged(monkeypatch):
    """The CUDA backend contributes rows through compile_rows(archs); its errors fail the check."""
    import types

    fake = types.ModuleType("vtok_kernels.backends.cuda")
    fake.compile_rows = lambda archs: [dict(kernel="residual_fwd", arch=a, config="V=8",
                                            default=True, registers=64, spill_stores=0,
                                            spill_loads=0, shared_bytes=0, extra="ignored")
                                       for a in archs]
    monkeypatch.setitem(sys.modules, "vtok_kernels.backends.cuda", fake)
    rows = compile_check.run(["sm_80", "sm_90"], sources=("cuda",))
    assert [(r.source, r.kernel, r.arch) for r in rows] == [
        ("cuda", "residual_fwd", "sm_80"), ("cuda", "residual_fwd", "sm_90")]
    assert compile_check.failed(rows) == []

    def broken(archs):
        raise RuntimeError("nvcc not found")

    fake.compile_rows = broken
    rows = compile_check.run(["sm_80"], sources=("cuda",))
    assert len(rows) == 1 and "nvcc not found" in rows[0].error
    assert compile_check.failed(rows) == rows
