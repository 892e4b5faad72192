"""``python -m vtok_kernels compile-check``: compile every GPU kernel ahead of time, no GPU needed.

Each Triton kernel is compiled, for every autotune config and every requested arch, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` at the specialisation a
realistic call gets (bfloat16 features, 16-byte aligned pointers and strides). Registers,
spills and shared memory come from running Triton's own ``ptxas -v`` on the generated PTX
(the compiled kernel only knows them once loaded on a device).

CUDA kernels contribute their rows through ``vtok_kernels.backends.cuda.compile_rows(archs)``
when that module provides it: a list of dicts with the keys of :class:`Row` (``source`` "cuda").

Exit status: 1 on any compile error or on a spill in a default config (the first of each
autotune list, the one used when autotuning is off), else 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Optional

ARCHS = ("sm_80", "sm_90")
# Head sizes of the shapes we serve (SigLIP 1152 / 8 or 16 heads: 144, 72; CLIP 1024 / 8 or
# 16 heads: 128, 64) round up to these power-of-two channel blocks.
ATTN_HEAD_BLOCKS = (128, 256, 64)


@dataclasses.dataclass
class Row:
    kernel: str
    arch: str
    config: str
    default: bool
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared_bytes: Optional[int] = None
    seconds: float = 0.0
    error: str = ""
    source: str = "triton"

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def status(self) -> str:
        if self.error:
            return "ERROR"
        if self.spills:
            return "SPILL-FAIL" if self.default else "spill"
        return "ok"


@dataclasses.dataclass
class Case:
    """One kernel at one specialisation and one launch config."""

    kernel: str
    label: str
    module: str
    function: str
    constexprs: dict
    num_warps: int
    num_stages: int
    default: bool
    pointer_types: dict


def _config_label(constexprs: dict, num_warps: int, num_stages: int) -> str:
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()]
    return ",".join(parts + [f"w{num_warps}", f"s{num_stages}"])


def _signature(fn, constexprs: dict, pointer_types: dict) -> tuple[dict, dict]:
    """Triton's signature for ``fn`` and the divisibility attributes a realistic call gets."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*bf16")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            # Channels (1024, 1152) and every stride of a [.., N, C] tensor are multiples of 16.
            if name == "C" or name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def triton_cases(quick: bool = False) -> list[Case]:
    """Every (kernel, specialisation, config) the Triton backend can launch on a GPU."""
    from vtok_kernels.backends.triton import configs

    enc = "vtok_kernels.backends.triton.encode"
    exp = "vtok_kernels.backends.triton.expand"
    fp32 = {name: "*fp32" for name in ("query_ptr", "part_acc_ptr", "part_max_ptr",
                                       "part_sum_ptr", "part_dq_ptr", "lse_ptr")}
    ints = {name: "*i64" for name in ("key_ptr", "cu_frames_ptr", "cu_tokens_ptr")}
    types = {**fp32, **ints}
    combine_types = {**types, "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32",
                     "part_sum_ptr": "*fp32"}
    cases: list[Case] = []

    def add(kernel, module, function, config_list, fixed, pointer_types=types, only_default=False):
        chosen = config_list[:1] if (quick or only_default) else config_list
        for position, config in enumerate(chosen):
            constexprs = {**fixed, **config.kwargs}
            label = _config_label(constexprs, config.num_warps, config.num_stages)
            cases.append(Case(kernel, label, module, function, constexprs, config.num_warps,
                              config.num_stages, position == 0, pointer_types))

    stream = configs.STREAM_CONFIGS

    def attn(kind: str, block_d: int) -> list:
        # What the autotuner's pruning leaves for this head block.
        listed = configs.CONFIG_LISTS[kind]
        return [c for c in listed if configs.fits(kind, c, block_d)] or listed[:1]

    base = {"IS_VARLEN": False}
    add("encode_fwd[mean]", enc, "encode_fwd_kernel", stream,
        {"POOL_ATTN": False, **base, "WRITE_KEY": True})
    add("encode_fwd[mean,varlen]", enc, "encode_fwd_kernel", stream,
        {"POOL_ATTN": False, "IS_VARLEN": True, "WRITE_KEY": True}, only_default=True)
    add("encode_bwd[mean]", enc, "encode_bwd_kernel", stream,
        {"POOL_ATTN": False, **base, "SPATIAL": False, "BINS_PER_ROW": 1, "BINS_PER_COL": 1})
    for block_d in ATTN_HEAD_BLOCKS[: 1 if quick else None]:  # quick: 128 only
        add(f"encode_fwd[attn,head<={block_d}]", enc, "encode_fwd_kernel",
            attn("attn_fwd", block_d),
            {"POOL_ATTN": True, **base, "WRITE_KEY": True, "BLOCK_D": block_d})
        add(f"encode_bwd[attn,head<={block_d}]", enc, "encode_bwd_kernel",
            attn("attn_bwd", block_d),
            {"POOL_ATTN": True, **base, "SPATIAL": False, "BINS_PER_ROW": 1, "BINS_PER_COL": 1,
             "BLOCK_D": block_d})
    block = max(ATTN_HEAD_BLOCKS)  # the variants below at the heaviest head block
    add("encode_fwd[attn,varlen]", enc, "encode_fwd_kernel", attn("attn_fwd", block),
        {"POOL_ATTN": True, "IS_VARLEN": True, "WRITE_KEY": True, "BLOCK_D": block},
        only_default=True)
    add("encode_bwd[attn,spatial]", enc, "encode_bwd_kernel", attn("attn_bwd", block),
        {"POOL_ATTN": True, **base, "SPATIAL": True, "BINS_PER_ROW": 2, "BINS_PER_COL": 2,
         "BLOCK_D": block}, only_default=True)
    add("encode_bwd[mean,varlen,spatial]", enc, "encode_bwd_kernel", stream,
        {"POOL_ATTN": False, "IS_VARLEN": True, "SPATIAL": True, "BINS_PER_ROW": 2,
         "BINS_PER_COL": 2}, only_default=True)
    # The other feature dtypes, at the default configs (bfloat16 above).
    for dtype in ("fp16", "fp32"):
        feature_types = {**types, **{name: f"*{dtype}" for name in (
            "x_ptr", "seq_ptr", "grad_seq_ptr", "grad_x_ptr")}}
        add(f"encode_fwd[mean,{dtype}]", enc, "encode_fwd_kernel", stream,
            {"POOL_ATTN": False, **base, "WRITE_KEY": True}, feature_types, only_default=True)
        add(f"encode_fwd[attn,{dtype}]", enc, "encode_fwd_kernel", attn("attn_fwd", block),
            {"POOL_ATTN": True, **base, "WRITE_KEY": True, "BLOCK_D": block}, feature_types,
            only_default=True)
        add(f"encode_bwd[attn,{dtype}]", enc, "encode_bwd_kernel", attn("attn_bwd", block),
            {"POOL_ATTN": True, **base, "SPATIAL": False, "BINS_PER_ROW": 1, "BINS_PER_COL": 1,
             "BLOCK_D": block}, feature_types, only_default=True)
    single = [configs._config(4, num_stages=1)]
    for pool in (False, True):
        add(f"combine[{'attn' if pool else 'mean'}]", enc, "combine_kernel", single,
            {"POOL_ATTN": pool, **base, "DIVIDE": True, "BLOCK_C": 1024}, combine_types)
    add("spatial_key_fwd", enc, "spatial_key_fwd_kernel", single,
        {**base, "BLOCK_C": 1024})
    add("expand_fwd", exp, "expand_fwd_kernel", stream, {})
    add("expand_bwd", exp, "expand_bwd_kernel", stream, {})
    return cases


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def _ptxas_resources(ptx: str, arch_name: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, static smem) from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    capability = int(arch_name.split("_")[1].rstrip("a"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        # The flags Triton itself gives ptxas, so the figures are those of the real cubin.
        result = subprocess.run(
            [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={arch_name}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    used = _PTXAS_USED.search(log)
    spill = _PTXAS_SPILL.search(log)
    smem = _PTXAS_SMEM.search(log)
    return (int(used.group(1)) if used else -1,
            int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0,
            int(smem.group(1)) if smem else 0)


def compile_case(case: Case, arch: str) -> Row:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(case.kernel, arch, case.label, case.default)
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(case.module), case.function)
        signature, attrs = _signature(fn, case.constexprs, case.pointer_types)
        capability = int(arch.split("_")[1])
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=case.constexprs, attrs=attrs),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
        arch_name = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        regs, stores, loads, smem = _ptxas_resources(compiled.asm["ptx"], arch_name)
        row.registers, row.spill_stores, row.spill_loads = regs, stores, loads
        # Triton's dynamic shared memory (reductions, pipelining) plus any static smem.
        row.shared_bytes = int(getattr(compiled.metadata, "shared", 0)) + smem
    except Exception as exc:  # reported in the table; the exit status fails the check
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        row.error = f"{type(exc).__name__}: {first_line}"
    row.seconds = time.perf_counter() - start
    return row


def _compile_indexed(args: tuple[int, str, bool]) -> Row:
    index, arch, quick = args
    return compile_case(triton_cases(quick)[index], arch)


def cuda_rows(archs: Iterable[str]) -> list[Row]:
    """Rows contributed by the CUDA backend, if it offers them."""
    try:
        from vtok_kernels.backends.cuda import compile_rows
    except ImportError:
        return []
    try:
        rows = []
        for entry in compile_rows(list(archs)):
            entry = dict(entry)
            entry.setdefault("source", "cuda")
            rows.append(Row(**{k: v for k, v in entry.items()
                               if k in Row.__dataclass_fields__}))
        return rows
    except Exception as exc:
        return [Row("cuda.compile_rows", ",".join(archs), "-", True,
                    error=f"{type(exc).__name__}: {exc}", source="cuda")]


def run(archs: list[str], quick: bool = False, jobs: Optional[int] = None,
        kernel_filter: str = "", sources: tuple = ("triton", "cuda")) -> list[Row]:
    cases = triton_cases(quick) if "triton" in sources else []
    work = [(i, arch, quick) for arch in archs for i, case in enumerate(cases)
            if kernel_filter in case.kernel]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1 and len(work) > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_compile_indexed, work))
    else:
        rows = [_compile_indexed(item) for item in work]
    if "cuda" in sources:
        rows += [r for r in cuda_rows(archs) if kernel_filter in r.kernel]
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("source", "kernel", "arch", "config", "default", "regs", "spill st/ld",
              "smem B", "sec", "status")
    lines = [header]
    for r in rows:
        lines.append((r.source, r.kernel, r.arch, r.config, "yes" if r.default else "",
                      "-" if r.registers is None else str(r.registers),
                      "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}",
                      "-" if r.shared_bytes is None else str(r.shared_bytes),
                      f"{r.seconds:.1f}", r.status + (f" {r.error}" if r.error else "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths)]
        out.append("  ".join(cells + [line[-1]]))
    return "\n".join(out)


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.error or (r.default and r.spills)]


def _environment() -> dict:
    import torch
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0],
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vtok_kernels compile-check",
        description="Compile every GPU kernel and autotune config ahead of time (no GPU needed) "
                    "and report registers, spills and shared memory.")
    parser.add_argument("--arch", default=",".join(ARCHS),
                        help="comma-separated archs, e.g. sm_80,sm_90 (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="only the default config of each kernel, one attention head block")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--source", choices=("all", "triton", "cuda"), default="all",
                        help="which kernels: Triton, CUDA (rows from the cuda backend) or both")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: cores)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--txt", default=None, help="also write the table to this text file")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for arch in archs:
        if not re.fullmatch(r"sm_\d+", arch):
            parser.error(f"--arch: expected names like sm_80, got {arch!r}")

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Compiling needs real JIT functions; under the interpreter triton.jit hands out
        # interpreted ones, so compile in a fresh process without it.
        env = dict(os.environ, TRITON_INTERPRET="0")
        forwarded = list(argv) if argv is not None else sys.argv[1:]
        return subprocess.run([sys.executable, "-m", "vtok_kernels.compile_check", *forwarded],
                              env=env).returncode

    start = time.perf_counter()
    sources = ("triton", "cuda") if args.source == "all" else (args.source,)
    rows = run(archs, quick=args.quick, jobs=args.jobs, kernel_filter=args.kernel,
               sources=sources)
    table = format_table(rows)
    bad = failed(rows)
    summary = (f"{len(rows)} compiles in {time.perf_counter() - start:.0f}s; "
               f"{sum(1 for r in rows if r.error)} errors, "
               f"{sum(1 for r in rows if r.spills)} configs spill "
               f"({sum(1 for r in rows if r.spills and r.default)} of them defaults)")
    print(table)
    print(summary)
    if args.txt:
        with open(args.txt, "w") as handle:
            handle.write(table + "\n" + summary + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": _environment(), "archs": archs,
                       "rows": [dict(dataclasses.asdict(r), status=r.status) for r in rows]},
                      handle, indent=1)
    if bad:
        print("compile-check FAILED: " + "; ".join(
            f"{r.kernel} {r.arch} {r.config}: {r.error or 'spills in a default config'}"
            for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
