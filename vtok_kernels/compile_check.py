"""``python -m vtok_kernels compile-check``: compile every GPU kernel ahead of time, no GPU needed.

Each Triton kernel is compiled, for every autotune config and every requested arch, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` at the specialisation a
realistic call gets (bfloat16 features, 16-byte aligned pointers and strides). Registers,
spills and shared memory come from running Triton's own ``ptxas -v`` on the generated PTX
(the compiled kernel only knows them once loaded on a device).

CUDA kernels contribute their rows through ``vtok_kernels.backends.cuda.compile_rows(archs)``
when that module provides it: a list of dicts with the keys of :class:`Row` (``source`` "cuda").

Besides the ptxas figures, each row counts the global loads and stores in the PTX by width
(and, for the Triton kernels, the loads of x's tiles alone): a memory-bound kernel wants 16 bytes
per instruction. The Triton kernels are compiled twice over: at generic specialisations (every
variant, dtype and config), and at the presets (SigLIP, CLIP-L), specialised from the arguments
of the backend's own launches, as the GPU specialises them.

Exit status: 1 on any compile error, on a spill in a default config (the first of each autotune
list, the one used when autotuning is off), or on a spill in any Triton config that survives
the pruning (the autotuner may pick it), else 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Optional

ARCHS = ("sm_80", "sm_90")
# Head sizes of the shapes we serve: SigLIP 1152 / 8 or 16 heads (144, 72), CLIP 1024 / 8 or 16
# heads (128, 64). The attention kernels take the head size as a compile-time constant.
ATTN_HEAD_DIMS = (144, 72, 128, 64)
# The shapes the benchmarks serve, specialised as a real launch specialises them (presets):
# (name, patches, channels), at 8 videos of 16 frames.
PRESETS = (("siglip", 729, 1152), ("clip-l", 576, 1024))
PRESET_BATCH, PRESET_FRAMES = 8, 16


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
    # Global loads and stores in the PTX by bytes per instruction, e.g. {"16": 6, "4": 2}.
    load_widths: dict = dataclasses.field(default_factory=dict)
    store_widths: dict = dataclasses.field(default_factory=dict)
    # The loads of x's tiles alone (what the kernels stream from HBM).
    x_load_widths: dict = dataclasses.field(default_factory=dict)

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def fails(self) -> bool:
        return bool(self.error) or bool(self.spills and (self.default or self.source == "triton"))

    @property
    def status(self) -> str:
        if self.error:
            return "ERROR"
        if self.spills:
            return "SPILL-FAIL" if self.fails else "spill"
        return "ok"


@dataclasses.dataclass
class Case:
    """One kernel at one specialisation and one launch config. ``values``, when set, are the
    arguments of a real launch: the signature, the divisibility hints and the arguments equal
    to 1 (which Triton turns into constants) then come from them, as on the GPU."""

    kernel: str
    label: str
    module: str
    function: str
    constexprs: dict
    num_warps: int
    num_stages: int
    default: bool
    pointer_types: dict
    values: Optional[dict] = None
    maxnreg: Optional[int] = None  # the config's register cap, where it pins one


def _config_label(constexprs: dict, num_warps: int, num_stages: int,
                  maxnreg: Optional[int] = None) -> str:
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()]
    cap = [f"r{maxnreg}"] if maxnreg is not None else []
    return ",".join(parts + [f"w{num_warps}", f"s{num_stages}"] + cap)


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


def _specialised_signature(fn, values: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch with argument ``values``, by Triton's own rule
    (the one its launcher applies on the GPU): pointers and integers divisible by 16 get the
    divisibility hint, an integer equal to 1 becomes a constant."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constants, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, hint = native_specialize_impl(BaseBackend, values[name], False, True, True)
        if kind == "constexpr":
            signature[name] = "constexpr"
            constants[name] = hint
        else:
            signature[name] = kind
            if hint == "D":
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def triton_cases(quick: bool = False) -> list[Case]:
    """Every (kernel, specialisation, config) the Triton backend can launch on a GPU, at the
    divisibility a realistic call gets; then the presets as their launches specialise them."""
    from vtok_kernels.backends.triton import configs
    from vtok_kernels.backends.triton.attention import combine_heads, head_blocks
    from vtok_kernels.backends.triton.encode import combine_warps

    enc = "vtok_kernels.backends.triton.encode"
    att = "vtok_kernels.backends.triton.attention"
    exp = "vtok_kernels.backends.triton.expand"
    fp32 = {name: "*fp32" for name in ("query_ptr", "part_acc_ptr", "part_max_ptr",
                                       "part_sum_ptr", "part_dq_ptr", "delta_ptr",
                                       "residual_ptr", "residual32_ptr", "lse_ptr")}
    ints = {name: "*i64" for name in ("key_ptr", "cu_frames_ptr", "cu_tokens_ptr")}
    types = {**fp32, **ints}
    cases: list[Case] = []

    def add(kernel, module, function, config_list, fixed, pointer_types=types, only_default=False):
        chosen = config_list[:1] if (quick or only_default) else config_list
        for position, config in enumerate(chosen):
            constexprs = {**fixed, **config.kwargs}
            label = _config_label(constexprs, config.num_warps, config.num_stages,
                                  config.maxnreg)
            cases.append(Case(kernel, label, module, function, constexprs, config.num_warps,
                              config.num_stages, position == 0, pointer_types,
                              maxnreg=config.maxnreg))

    stream = configs.STREAM_CONFIGS

    def head(head_dim: int) -> dict:
        hi, lo = head_blocks(head_dim)
        return {"HEAD_DIM": head_dim, "BLOCK_HI": hi, "BLOCK_LO": lo}

    def attn(kind: str, head_dim: int) -> list:
        # What the autotuner's pruning leaves for this head.
        return configs.survivors(kind, configs.CONFIG_LISTS[kind], sum(head_blocks(head_dim)))

    base = {"IS_VARLEN": False}
    # The GPU's kernels take the inline PTX (the interpreter's do not).
    attn_fwd_fixed = {"WRITE_KEY": True, "INLINE_PTX": True}
    no_spatial = {"SPATIAL": False, "BINS_PER_ROW": 1, "BINS_PER_COL": 1}
    mean_fwd = configs.MEAN_FWD_CONFIGS
    add("encode_fwd[mean]", enc, "mean_fwd_kernel", mean_fwd, {**base, "WRITE_KEY": True})
    add("encode_fwd[mean,varlen]", enc, "mean_fwd_kernel", mean_fwd,
        {"IS_VARLEN": True, "WRITE_KEY": True}, only_default=True)
    add("encode_bwd[mean]", enc, "mean_bwd_kernel", stream, {**base, **no_spatial})
    for head_dim in ATTN_HEAD_DIMS[: 1 if quick else None]:  # quick: 144 only
        add(f"encode_fwd[attn,head={head_dim}]", att, "attn_fwd_kernel",
            attn("attn_fwd", head_dim), {**base, **attn_fwd_fixed, **head(head_dim)})
        add(f"encode_bwd[attn,head={head_dim}]", att, "attn_bwd_kernel",
            attn("attn_bwd", head_dim), {**base, **no_spatial, **head(head_dim)})
    widest = max(ATTN_HEAD_DIMS)  # the variants below at the widest head
    add("encode_fwd[attn,varlen]", att, "attn_fwd_kernel", attn("attn_fwd", widest),
        {"IS_VARLEN": True, **attn_fwd_fixed, **head(widest)}, only_default=True)
    add("encode_bwd[attn,spatial]", att, "attn_bwd_kernel", attn("attn_bwd", widest),
        {**base, "SPATIAL": True, "BINS_PER_ROW": 2, "BINS_PER_COL": 2, **head(widest)},
        only_default=True)
    add("encode_bwd[mean,varlen,spatial]", enc, "mean_bwd_kernel", stream,
        {"IS_VARLEN": True, "SPATIAL": True, "BINS_PER_ROW": 2, "BINS_PER_COL": 2},
        only_default=True)
    # The other feature dtypes, at the default configs (bfloat16 above).
    for dtype in ("fp16", "fp32"):
        feature_types = {**types, **{name: f"*{dtype}" for name in (
            "x_ptr", "seq_ptr", "grad_seq_ptr", "grad_x_ptr")}}
        # Every config: each pins its registers, and float32 tiles need the most.
        add(f"encode_fwd[mean,{dtype}]", enc, "mean_fwd_kernel", mean_fwd,
            {**base, "WRITE_KEY": True}, feature_types)
        # The attention configs pin their registers per band of heads: every band's.
        for head_dim in ATTN_HEAD_DIMS[: 1 if quick else None]:
            add(f"encode_fwd[attn,head={head_dim},{dtype}]", att, "attn_fwd_kernel",
                attn("attn_fwd", head_dim), {**base, **attn_fwd_fixed, **head(head_dim)},
                feature_types)
            add(f"encode_bwd[attn,head={head_dim},{dtype}]", att, "attn_bwd_kernel",
                attn("attn_bwd", head_dim), {**base, **no_spatial, **head(head_dim)},
                feature_types)
    single = [configs._config(4, num_stages=1)]
    for block_c in (1024, 128):  # CLIP-L's 1024 channels in one block, SigLIP's 1152 in 9
        add(f"combine[mean,C/{block_c}]", enc, "combine_kernel",
            [configs._config(combine_warps(block_c), num_stages=1)],
            {**base, "DIVIDE": True, "BLOCK_C": block_c})
    # CLIP-L's 16 heads of 64 in one program, SigLIP's 18 of 64 two by two; heads of two
    # blocks (16 of 72, 8 of 144) padded to 128 and 256 channels, 8 and 4 per program.
    for heads, head_dim in ((16, 64), (18, 64), (16, 72), (8, 144)):
        block_heads, block_d = combine_heads(heads, head_dim)
        add(f"attn_combine[{heads}x{head_dim}]", att, "attn_combine_kernel",
            [configs._config(combine_warps(block_heads * block_d), num_stages=1)],
            {**base, "HEAD_DIM": head_dim, "KEEP_RESIDUAL32": True, "BLOCK_HEADS": block_heads,
             "BLOCK_D": block_d})
    add("spatial_key_fwd", enc, "spatial_key_fwd_kernel", single, {**base, "BLOCK_C": 1024})
    add("expand_fwd", exp, "expand_fwd_kernel", stream, {})
    add("expand_bwd", exp, "expand_bwd_kernel", stream, {})
    return cases + preset_cases(quick)


# What a launch through the autotuner runs on the GPU: Triton's default options.
DIRECT_LAUNCH = {"num_warps": 4, "num_stages": 3}


def direct_options(values: dict) -> tuple[int, int]:
    """(num_warps, num_stages) of a plain launch with arguments ``values``: those it passes,
    else Triton's defaults."""
    return (values.get("num_warps", DIRECT_LAUNCH["num_warps"]),
            values.get("num_stages", DIRECT_LAUNCH["num_stages"]))


def record_triton_launches(num_patches: int, channels: int, pool: str, num_heads: int,
                           dtype="bfloat16", batch: int = PRESET_BATCH,
                           frames: int = PRESET_FRAMES, sms: int = 132) -> list[dict]:
    """Every launch the triton backend makes for encode forward and backward of a preset (key
    frame 0, one frame per token), from its own launchers: kernels and tuners are replaced by
    recorders, tensors are meta tensors (null, hence 16-byte aligned, data pointers, as a CUDA
    allocation), the device has ``sms`` SMs. Each launch: ``kernel`` (the JIT function),
    ``kind`` (its config family, None for a plain launch), ``values`` (its arguments),
    ``constexprs``, ``config`` (the default config a tuned launch runs, autotuning off),
    ``grid`` and ``pass`` ("fwd" or "bwd")."""
    from unittest import mock

    import torch

    from vtok_kernels.backends.triton import configs, encode

    recorded: list[dict] = []
    current = {"pass": "fwd"}

    def record(kernel, kind, values, config, grid):
        constexprs = {p.name: values[p.name] for p in kernel.params
                      if p.is_constexpr and p.name in values}
        recorded.append({"kernel": kernel, "kind": kind, "values": values,
                         "constexprs": constexprs, "config": config, "grid": tuple(grid),
                         "pass": current["pass"]})

    def launch(kernel, tuner, kind, grid, *args, **kwargs):
        config = configs.default(kind, configs.head_width(kwargs))
        record(kernel, kind, {**dict(zip(kernel.arg_names, args)), **kwargs}, config,
               grid(config.kwargs))
        return dict(config.kwargs)

    class Direct:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                record(self.kernel, None, {**dict(zip(self.kernel.arg_names, args)), **kwargs},
                       None, grid)
            return run

    meta = torch.device("meta")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    x = torch.empty(batch, frames, num_patches, channels, dtype=dtype, device=meta)
    keys = torch.zeros(batch, dtype=torch.int64, device=meta)
    query = torch.empty(channels, dtype=torch.float32, device=meta) if pool == "attn" else None
    heads = num_heads if pool == "attn" else 1
    with mock.patch.object(encode, "launch", launch), \
            mock.patch.object(encode, "combine_kernel", Direct(encode.combine_kernel)), \
            mock.patch.object(encode, "attn_combine_kernel", Direct(encode.attn_combine_kernel)), \
            mock.patch.object(encode, "spatial_key_fwd_kernel",
                              Direct(encode.spatial_key_fwd_kernel)), \
            mock.patch.object(encode, "attn_delta_kernel", Direct(encode.attn_delta_kernel)), \
            mock.patch.object(encode, "_target_programs", lambda device: 8 * sms), \
            mock.patch.object(encode, "_resident_capacity",
                              lambda device, config: sms * configs.resident_programs(config)), \
            mock.patch.object(encode, "_combine_block", encode.combine_block), \
            mock.patch.object(encode, "_combine_heads", encode.combine_heads), \
            mock.patch.object(configs, "active", lambda kind: configs.CONFIG_LISTS[kind]):
        sequence, lse, *kept = encode.encode_fwd(x, keys, query, pool, heads, 1, (), ())
        current["pass"] = "bwd"
        grad = torch.empty(sequence.shape, dtype=dtype, device=meta)
        encode.encode_bwd(grad, x, keys, query, sequence, lse, pool, heads, 1, (), (), *kept)
    return recorded


def preset_cases(quick: bool = False) -> list[Case]:
    """The encode kernels of each preset (SigLIP, CLIP-L; bfloat16; mean, and attention with 16
    and 8 heads), specialised from the arguments of their real launches, over every config the
    pruning leaves them (quick: the default)."""
    from vtok_kernels.backends.triton import configs

    cases: list[Case] = []
    variants = [("mean", 1)] + [("attn", heads) for heads in (16, 8)]
    for name, num_patches, channels in PRESETS[: 1 if quick else None]:
        for pool, heads in variants:
            tag = f"{name},{pool}" + (f",{heads}h" if pool == "attn" else "")
            for launch in record_triton_launches(num_patches, channels, pool, heads):
                kernel, kind = launch["kernel"], launch["kind"]
                values, constexprs = launch["values"], launch["constexprs"]
                if kind is None:
                    chosen = [(*direct_options(values), {}, None)]
                else:
                    survivors = configs.survivors(kind, configs.CONFIG_LISTS[kind],
                                                  configs.head_width(constexprs))
                    chosen = [(c.num_warps, c.num_stages, c.kwargs, c.maxnreg)
                              for c in survivors[: 1 if quick else None]]
                function = kernel.fn.__name__
                for position, (warps, stages, blocks, maxnreg) in enumerate(chosen):
                    fixed = {**constexprs, **blocks}
                    cases.append(Case(f"{function.removesuffix('_kernel')}@{tag}",
                                      _config_label(blocks, warps, stages, maxnreg),
                                      kernel.__module__, function, fixed, warps, stages,
                                      position == 0, {}, values=values, maxnreg=maxnreg))
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


# A global load or store in PTX, e.g. "ld.global.L1::evict_last.v4.b32" or "st.global.b16":
# its vector count and element bits.
_PTX_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s")


_PTX_FILE = re.compile(r"^\s*\.file\s+(\d+)\s+\"([^\"]+)\"", re.M)
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")


def access_widths(ptx: str, op: str, lines: Optional[set] = None) -> dict:
    """{bytes per instruction: count} of the global ``op`` ("ld" or "st") instructions in
    ``ptx``, as strings for JSON (a 16-byte load is one ld.global.v4.b32). With ``lines``, a
    set of (file name, line), only the instructions whose source line (the last ``.loc``
    before them, outside inline assembly) is one of those. Triton emits a load as inline
    assembly, and inside it steps the ``.loc`` line once per line of assembly (an unmasked
    16-byte load's four register clears put its ld.global four lines below its source)."""
    files = {index: os.path.basename(path) for index, path in _PTX_FILE.findall(ptx)}
    counts: dict = {}
    where = None
    inline = False
    for text in ptx.splitlines():
        if "// begin inline asm" in text or "// end inline asm" in text:
            inline = "begin" in text
            continue
        loc = _PTX_LOC.match(text)
        if loc:
            if not inline:
                where = (files.get(loc.group(1), ""), int(loc.group(2)))
            continue
        found = _PTX_GLOBAL_ACCESS.search(text + " ")
        if not found or found.group(1) != op or (lines is not None and where not in lines):
            continue
        parts = found.group(2).split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
        width = str(vector * bits // 8)
        counts[width] = counts.get(width, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -int(item[0])))


@functools.lru_cache(maxsize=None)
def x_load_lines() -> frozenset:
    """(file name, line) of every load of a tile of x in the Triton kernels: the lines that
    load through ``x_tile`` (tiles.load_x, tiles.load_rows and the mean forward)."""
    from vtok_kernels.backends.triton import tiles

    folder = os.path.dirname(tiles.__file__)
    found = set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as handle:
                for number, text in enumerate(handle, start=1):
                    if "tl.load(x_tile(" in text:
                        found.add((name, number))
    return frozenset(found)


def _widths_label(widths: dict) -> str:
    return " ".join(f"{width}B:{count}" for width, count in widths.items()) or "-"


def compile_case(case: Case, arch: str) -> Row:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(case.kernel, arch, case.label, case.default)
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(case.module), case.function)
        if case.values is not None:
            signature, constexprs, attrs = _specialised_signature(fn, case.values,
                                                                  case.constexprs)
        else:
            signature, attrs = _signature(fn, case.constexprs, case.pointer_types)
            constexprs = case.constexprs
        capability = int(arch.split("_")[1])
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages,
                     **({"maxnreg": case.maxnreg} if case.maxnreg is not None else {})},
        )
        arch_name = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        regs, stores, loads, smem = _ptxas_resources(compiled.asm["ptx"], arch_name)
        row.load_widths = access_widths(compiled.asm["ptx"], "ld")
        row.store_widths = access_widths(compiled.asm["ptx"], "st")
        row.x_load_widths = access_widths(compiled.asm["ptx"], "ld", x_load_lines())
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
              "smem B", "x loads", "global loads", "global stores", "sec", "status")
    lines = [header]
    for r in rows:
        lines.append((r.source, r.kernel, r.arch, r.config, "yes" if r.default else "",
                      "-" if r.registers is None else str(r.registers),
                      "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}",
                      "-" if r.shared_bytes is None else str(r.shared_bytes),
                      _widths_label(r.x_load_widths), _widths_label(r.load_widths),
                      _widths_label(r.store_widths),
                      f"{r.seconds:.1f}", r.status + (f" {r.error}" if r.error else "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths)]
        out.append("  ".join(cells + [line[-1]]))
    return "\n".join(out)


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.fails]


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
            f"{r.kernel} {r.arch} {r.config}: {r.error or 'spills'}"
            for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
