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
    for name in ("encode_fwd[mean]", "encode_fwd[attn,head=144]", "encode_bwd[mean]",
                 "encode_bwd[attn,head=144]", "encode_fwd[attn,varlen]",
                 "encode_bwd[attn,spatial]", "attn_combine[18x64]", "spatial_key_fwd",
                 "expand_fwd", "expand_bwd", "attn_fwd@siglip,attn,16h",
                 "attn_bwd@siglip,attn,8h", "mean_fwd@siglip,mean"):
        assert name in kernels, f"{name} missing from the report"
    # SigLIP's heads of 72 and 144 channels, as a real launch specialises them: x is read 16
    # bytes at a time (a run-time head size of 72 left 2-byte loads), as the mean reads it.
    for name in ("attn_fwd@siglip,attn,16h", "attn_fwd@siglip,attn,8h", "mean_fwd@siglip,mean"):
        (row,) = [r for r in rows if r["kernel"] == name]
        assert row["x_load_widths"].get("16", 0) >= 2, row
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
    # Every Triton config that survives the pruning may be picked by the autotuner: a spill in
    # any fails. A CUDA instantiation fails on a spill where it is the default (vector) path.
    spill_other = compile_check.Row("k", "sm_80", "c2", False, registers=255, spill_stores=8,
                                    spill_loads=4)
    spill_cuda = compile_check.Row("k", "sm_80", "V=1", False, registers=255, spill_stores=8,
                                   spill_loads=4, source="cuda")
    broken = compile_check.Row("k", "sm_90", "c", False, error="CompilationError: boom")
    assert compile_check.failed([ok, spill_cuda]) == []
    assert compile_check.failed([ok, spill_default, spill_other, spill_cuda, broken]) == \
        [spill_default, spill_other, broken]
    assert [r.status for r in (ok, spill_default, spill_other, spill_cuda, broken)] == \
        ["ok", "SPILL-FAIL", "SPILL-FAIL", "spill", "ERROR"]
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


def test_access_widths_read_the_ptx():
    """Bytes per global access from PTX, and the source line that attributes a load to x."""
    ptx = "\n".join([
        '\t.file\t1 "/src/vtok_kernels/backends/triton/tiles.py"',
        '\t.file\t2 "/src/vtok_kernels/backends/triton/attention.py"',
        "\t.loc\t1 51 12",
        "\t@%p3 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd67 + 0 ];",
        "\t@%p5 ld.global.b32 { %r5 }, [ %rd69 + 0 ];",
        "\t.loc\t2 90 8",
        "\tld.global.L1::evict_last.v2.b32 { %r6, %r7 }, [ %rd1 + 0 ];",
        "\tld.global.b16 { %rs1 }, [ %rd2 + 0 ];",
        "\tst.global.v4.b32 [ %rd3 + 0 ], { %r1, %r2, %r3, %r4 };",
        "\tst.global.b16 [ %rd4 + 0 ], { %rs1 };",
    ])
    assert compile_check.access_widths(ptx, "ld") == {"16": 1, "8": 1, "4": 1, "2": 1}
    assert compile_check.access_widths(ptx, "st") == {"16": 1, "2": 1}
    assert compile_check.access_widths(ptx, "ld", {("tiles.py", 51)}) == {"16": 1, "4": 1}
    # An unmasked load, as Triton emits it: inline assembly whose .loc steps once per line
    # (its register clears); the load is its source's, the .loc before the assembly.
    unmasked = "\n".join([
        '\t.file\t1 "/src/vtok_kernels/backends/triton/tiles.py"',
        "\t.loc\t1 108 16",
        "\t// begin inline asm",
        "\t.loc\t1 108 16",
        "\tmov.u32 %r1, 0x0;",
        "\t.loc\t1 109 16",
        "\tmov.u32 %r2, 0x0;",
        "\t.loc\t1 110 16",
        "\tld.global.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];",
        "\t// end inline asm",
    ])
    assert compile_check.access_widths(unmasked, "ld", {("tiles.py", 108)}) == {"8": 1}
    assert compile_check.access_widths(unmasked, "ld", {("tiles.py", 110)}) == {}
    # the real kernels: the lines that load x's tiles are found in the sources
    lines = compile_check.x_load_lines()
    assert {name for name, _ in lines} == {"tiles.py", "encode.py"}
