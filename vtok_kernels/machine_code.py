"""``python -m vtok_kernels sass-report``: the CUDA kernels' machine code, read without a GPU, and
a model of the benchmark presets built on it (bandwidth, Little's law, instruction issue).

Part one reads the SASS. Every ``csrc/cuda/*.cu`` is compiled to a cubin by nvcc with the
extension's own flags (``backends.cuda.nvcc_command``), dumped with ``cuobjdump -sass`` and
``cuobjdump -res-usage``, and each kernel instantiation gets, per arch: its global loads and
stores counted by width (8 to 128 bit), its local-memory accesses (LDL / STL), registers, shared
memory, resident blocks per SM, the most 16-byte loads issued back to back (:func:`load_runs`)
and the loads and runs of loads of its hot loop (:func:`hot_loop`); and, on its control flow
(:class:`FlowGraph`: basic blocks, dominators, natural loops), the instructions a warp issues per
pass of that loop, along the longest path.

Part two is the model. For each preset (the benchmark's shapes) the cuda backend's own launch
path runs on meta tensors with a loader that records each kernel and grid instead of launching
(:func:`record_launches`); each launched kernel gets its bytes (from HBM, from L2, loaded per
thread) and a time from three bounds:

* ``t_hbm = HBM bytes / COPY_BANDWIDTH``;
* ``t_latency = (HBM-served bytes x HBM latency + cache-served bytes x L2 latency) / bytes in
  flight``, with bytes in flight = resident blocks x 256 threads x the bytes a thread keeps in
  flight (its hot loop's bytes per run of loads, from the SASS);
* ``t_issue = warp instructions / (ISSUE_RATE x clock x SMs)``, the instructions from the SASS
  per pass and the passes from the launch plan (:func:`warp_instructions`);

the larger of the first two overlapped with the third (their power mean of order OVERLAP), all
per wave of resident blocks, so that a last, partly full wave counts at its own occupancy
(the tail); ``LL GB/s`` in the report is the whole grid's average, SMs x bytes in flight per SM
/ HBM latency x blocks / (ceil(waves) x capacity).

An op's predicted time is the sum over its kernels, and its predicted GB/s the bytes it must move
(``benchmarks.roofline.encode_bytes``, what the benchmark divides by) over that time. Each
assumption is one line of :data:`ASSUMPTIONS`. The H100 run of 4328726 set its issue rate and
overlap (``benchmarks.calibrate remodel`` holds the model to that run's kernels); the GPU
proof's ``full:profile`` sets every kernel of today's code beside it (DESIGN.md section 5).

cuobjdump and nvdisasm come with the CUDA toolkit or as the PyPI wheels
``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

# ------------------------------------------------------------------------------ the machine

THREADS_PER_BLOCK = 256  # every launcher (launch_utils.cuh kThreads, cuda_nvrtc.THREADS)
WARP = 32


@dataclasses.dataclass(frozen=True)
class SmLimits:
    registers: int  # per SM, split evenly over 4 sub-partitions that each hold whole warps
    threads: int
    blocks: int
    shared_bytes: int  # the largest shared-memory carveout
    sub_partitions: int = 4
    register_unit: int = 256  # registers are allocated per warp in units of 256
    shared_unit: int = 128
    shared_reserved_per_block: int = 1024  # the runtime's own share of each block, sm_80 on


SM_LIMITS = {
    "sm_90": SmLimits(65536, 2048, 32, 228 * 1024),
    "sm_80": SmLimits(65536, 2048, 32, 164 * 1024),
}

# H100 SXM: the device the model describes and the one the GPU proof runs on.
H100_SMS = 132
# Measured copy bandwidth (bytes read + written per second) of an H100 SXM (a device-to-device
# copy through PyTorch on an H100 80GB HBM3, 2026-11-13): the roofline's denominator.
COPY_BANDWIDTH = 3.0e12
H100_SM_CLOCK_HZ = 1.98e9  # H100 SXM boost clock, for turning cycles into seconds
# Load-to-use latency of global memory on an H100 SXM, IDLE (a single-thread pointer chase,
# clocks not locked): 700 cycles from HBM3 and 291 from L2 (markdewing/AI_kernels,
# latency/README.md, beside the 690 / 281 it measured on a GH200). At 1.98 GHz that is about
# 354 ns and 147 ns. Under load the latency grows (queueing near the copy bandwidth), and the
# loaded figure is not in the sources read; with the idle one the Little's-law bandwidth is an
# upper bound, which the first GPU run calibrates.
HBM_LATENCY_CYCLES = 700
# Warp instructions an SM issues per cycle (of its 4 schedulers' 4) when issue is what bounds
# a kernel: the H100 run of 4328726 measured the cuda attention forward and backward, the two
# kernels of the run that issued most per byte (739 and 608 per KiB of DRAM traffic), at 2.62 and
# 2.67 per cycle per SM with ncu's clocks at 1.96-1.98 GHz
# (benchmarks/results/gpu-nvidia-h100-2026-11-27/calibration-4328726.txt).
ISSUE_RATE = 2.65
# How a wave's memory time (the larger of its bandwidth and latency bounds) and its issue time
# combine: their power mean of this order, (t_mem^p + t_issue^p)^(1/p), between their sum (1)
# and their maximum (infinite). 3 puts the four kernels of 5 us or more that the H100 run of
# 4328726 measured beside this model (mean and attention, forward and backward) within 12 % of
# their times; the maximum leaves the mean forward, its two bounds close, 23 % short.
OVERLAP = 3
L2_LATENCY_CYCLES = 291
HBM_LATENCY_S = HBM_LATENCY_CYCLES / H100_SM_CLOCK_HZ
L2_LATENCY_S = L2_LATENCY_CYCLES / H100_SM_CLOCK_HZ
# A tensor that an earlier kernel of the same pass read or wrote is still in L2 when it takes at
# most half the H100's 50 MB L2 (one partition: the L2 is split in two halves).
L2_RESIDENT_BYTES = 25 * 1024 * 1024

ASSUMPTIONS = (
    f"device: H100 SXM, {H100_SMS} SMs, sm_90a machine code, blocks of {THREADS_PER_BLOCK} threads",
    f"bandwidth bound: HBM bytes (compulsory reads + writes) / {COPY_BANDWIDTH / 1e12:.1f} TB/s, "
    "the copy bandwidth measured on the lent H100",
    f"latency: {HBM_LATENCY_CYCLES} cycles from HBM, {L2_LATENCY_CYCLES} from L2 at "
    f"{H100_SM_CLOCK_HZ / 1e9:.2f} GHz ({HBM_LATENCY_S * 1e9:.0f} / {L2_LATENCY_S * 1e9:.0f} ns), idle "
    "pointer-chase figures (markdewing/AI_kernels latency/README.md): under load the latency is longer, "
    "so the Little's-law bandwidth is an upper bound",
    "a thread keeps in flight the bytes per run of loads of its kernel's hot loop nest (the one with "
    "the most 16-byte loads, read from the SASS): each run waits one latency, each instruction of "
    "the nest runs once per pass (frames_per_token 1, every row valid); in the encode kernels only "
    "the share vecs_per_lane / (vectors a lane loads) of those bytes is data, the rest re-reads a "
    "vector on a clamped address",
    "loads served by L1 are charged the L2 latency; stores are not waited on",
    "the forward's blocks hold their key rows in registers across their chunk of groups (the key "
    "frame is read once per chunk); within a kernel every other re-read (grad r per frame, the "
    "partial rows' softmax states per head) hits L1 or L2",
    f"across kernels of one pass a tensor stays in L2 if it is at most {L2_RESIDENT_BYTES >> 20} MiB; "
    "each pass (forward, backward) starts cold",
    "resident blocks per SM from registers, threads, blocks and shared memory with the largest carveout",
    "waves: b blocks over a capacity of c run floor(b / c) full waves and one of b mod c blocks, each "
    "doing its share of the work in the time its bounds give (LL GB/s: the grid's average, "
    "SMs x bytes in flight per SM / HBM latency x b / (ceil(b / c) c))",
    "issue: a warp issues, per pass of its kernel's pass loop (the innermost loop nest member that loads at "
    "the hot width), the longest path through that loop in the SASS (every loop inside it once, the longer "
    "side of each branch; not the out-of-line copies a diverged warp takes), per pass of its parent loop that "
    "loop's own longest path, and once per warp the longest path outside the nest; the passes come from the "
    "launch plan (the bytes the loop loads over what one pass loads). Where the data picks a pass's path, the "
    "longer is counted: the tiles' attention forward takes the shorter at one frame per token (every frame "
    "starts its group), the backward skips the spatial key's gradient, the merge of the partial rows runs "
    "one of its two merges, so their counts are upper bounds there; the key tokens' copy, whose longest "
    "path is the spatial bins', gets no issue time. A loop inside a pass counts once, not once per round. "
    "A branch on a warp vote (VOTE.ANY: warp_pool's lazy rescale of its online softmax) counts its other "
    "side: the vote fires at a group's first rows and then only when a score passes the running maximum by "
    "e^8, a few passes of the tens a warp makes",
    f"issue rate: {ISSUE_RATE} warp instructions per cycle per SM at {H100_SM_CLOCK_HZ / 1e9:.2f} GHz, a wave "
    "as long as its busiest SM (the most blocks) takes, whatever its warps, the rate the H100 run of "
    "4328726 measured in its two most issue-bound kernels (2.62-2.67); a wave's memory time (the larger "
    f"of the bandwidth and latency bounds) and its issue time combine as their power mean of order {OVERLAP}: "
    "on that run's four kernels of 5 us or more (merges aside) the model's instruction counts are within "
    "9 % of ncu's and its times within 12 % (benchmarks/results/gpu-nvidia-h100-2026-11-27/README.md)",
    "no launch gap or synchronisation cost: the merges of the forward's partial rows, measured at 6-8 us on "
    "that run, are modelled at 1-2 us",
)


def sm_limits(arch: str) -> SmLimits:
    key = re.sub(r"a$", "", arch)
    if key not in SM_LIMITS:
        raise ValueError(f"no SM limits for {arch}; known: {', '.join(SM_LIMITS)}")
    return SM_LIMITS[key]


def blocks_per_sm(registers: int, shared_bytes: int, arch: str,
                  threads: int = THREADS_PER_BLOCK) -> dict:
    """Resident blocks per SM and what limits them (``by``: registers, threads, blocks, shared)."""
    lim = sm_limits(arch)
    warps = -(-threads // WARP)
    per_warp = -(-max(registers, 1) * WARP // lim.register_unit) * lim.register_unit
    warps_by_regs = (lim.registers // lim.sub_partitions // per_warp) * lim.sub_partitions
    per_block_shared = -(-(shared_bytes + lim.shared_reserved_per_block) // lim.shared_unit) * lim.shared_unit
    limits = {
        "registers": warps_by_regs // warps,
        "threads": lim.threads // (warps * WARP),
        "blocks": lim.blocks,
        "shared": lim.shared_bytes // per_block_shared,
    }
    by = min(limits, key=lambda k: limits[k])
    return {"blocks": limits[by], "by": by, **{f"by_{k}": v for k, v in limits.items()}}


# ------------------------------------------------------------------------------ the tools

def find_tool(name: str) -> Optional[str]:
    """A CUDA binary utility: on PATH, in /usr/local/cuda/bin, or from its PyPI wheel
    (``nvidia-cuda-cuobjdump`` installs ``nvidia/cu13/bin/cuobjdump``; older ones
    ``nvidia/cuda_cuobjdump/bin/cuobjdump``)."""
    found = shutil.which(name)
    if found:
        return found
    local = Path("/usr/local/cuda/bin") / name
    if local.is_file():
        return str(local)
    try:
        import nvidia  # namespace package of NVIDIA's wheels

        roots = [Path(p) for p in nvidia.__path__]
    except ImportError:
        roots = []
    for root in roots:
        for candidate in sorted(root.glob(f"*/bin/{name}")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def unavailable_reason() -> Optional[str]:
    """None when nvcc, cuobjdump and c++filt are found, else what is missing and how to get it."""
    from vtok_kernels.backends import cuda

    missing = []
    if cuda.find_nvcc() is None:
        missing.append("nvcc (the CUDA toolkit)")
    if find_tool("cuobjdump") is None:
        missing.append("cuobjdump (pip install nvidia-cuda-cuobjdump)")
    if shutil.which("c++filt") is None:
        missing.append("c++filt (binutils), which names the kernels")
    return "not found: " + ", ".join(missing) if missing else None


def tool_version(path: str) -> str:
    proc = subprocess.run([path, "--version"], capture_output=True, text=True)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else "?"


# ------------------------------------------------------------------------------ compiling and dumping

_DUMPS: dict = {}  # (source, mtime, arch) -> (sass text, res-usage text): one compile per process


def dump(source: Path, arch: str) -> tuple[str, str]:
    """(``cuobjdump -sass``, ``cuobjdump -res-usage``) of ``source`` compiled for ``arch``."""
    from vtok_kernels.backends import cuda

    key = (str(source), source.stat().st_mtime_ns, cuda.nvcc_target(arch))
    if key in _DUMPS:
        return _DUMPS[key]
    nvcc, cuobjdump = cuda.find_nvcc(), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"sass-report: {unavailable_reason()}")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (source.stem + ".cubin")
        proc = subprocess.run(cuda.nvcc_command(nvcc, source, arch, cubin, "-cubin"),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name} for {arch}:\n{proc.stderr[-3000:]}")
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    _DUMPS[key] = (sass, res)
    return sass, res


# ------------------------------------------------------------------------------ parsing SASS

@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers: LDG.E.EF.128
    operands: str = ""
    predicate: str = ""

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> tuple[str, ...]:
        return tuple(self.opcode.split(".")[1:])


@dataclasses.dataclass(frozen=True)
class Label:
    """A branch target: a basic block starts here."""

    name: str


Item = Union[Instruction, Label]

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)|^\.text\.(\S+):\s*$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^(@!?U?P[T0-9]+)\s+")
_NVDISASM_LABEL = re.compile(r"^\s*(\.L_\w+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)|\b0x([0-9a-fA-F]+)\b")
# Opcodes whose operand names a branch target (BSSY: the reconvergence point).
_TARGETING = {"BRA", "BSSY", "CALL", "JMP", "BREAK", "BPT"}
# Opcodes that end a basic block.
_BLOCK_ENDS = {"BRA", "BRX", "BRXU", "JMP", "JMX", "JMXU", "EXIT", "RET", "CALL", "BREAK", "BSYNC",
               "KILL", "BPT"}


def parse_instruction(line: str) -> Optional[Instruction]:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    body = m.group(2).strip()
    predicate = ""
    p = _PREDICATE.match(body)
    if p:
        predicate, body = p.group(1), body[p.end():]
    opcode, _, operands = body.partition(" ")
    return Instruction(int(m.group(1), 16), opcode, operands.strip(), predicate)


def parse_sass(text: str) -> dict[str, list[Item]]:
    """{mangled kernel name: its instructions, with a Label before every branch target}, from
    ``cuobjdump -sass`` (targets are addresses) or ``nvdisasm`` (targets are ``.L_x_N`` labels)."""
    functions: dict[str, list[Item]] = {}
    current: Optional[list[Item]] = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = functions.setdefault(m.group(1) or m.group(2), [])
            continue
        if current is None:
            continue
        label = _NVDISASM_LABEL.match(line)
        if label:
            current.append(Label(label.group(1)))
            continue
        ins = parse_instruction(line)
        if ins is not None:
            current.append(ins)
    return {name: label_targets(items) for name, items in functions.items()}


def label_targets(items: list[Item]) -> list[Item]:
    """``items`` with a Label before each instruction that a branch (or BSSY) names by address."""
    targets = set()
    for item in items:
        if isinstance(item, Instruction) and item.base in _TARGETING:
            for m in _TARGET.finditer(item.operands):
                if m.group(2):
                    targets.add(int(m.group(2), 16))
    if not targets:
        return items
    out: list[Item] = []
    for item in items:
        if isinstance(item, Instruction) and item.address in targets:
            out.append(Label(f"0x{item.address:x}"))
        out.append(item)
    return out


def parse_res_usage(text: str) -> dict[str, dict]:
    """{mangled kernel name: {"registers", "shared_bytes", "local_bytes", "stack_bytes"}} from
    ``cuobjdump -res-usage``."""
    out: dict[str, dict] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[name] = {"registers": int(fields.get("REG", 0)), "shared_bytes": int(fields.get("SHARED", 0)),
                         "local_bytes": int(fields.get("LOCAL", 0)), "stack_bytes": int(fields.get("STACK", 0))}
            name = None
    return out


# ------------------------------------------------------------------------------ reading SASS

WIDTHS = (8, 16, 32, 64, 128)
_WIDTH_MODIFIERS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def access_width(ins: Instruction) -> int:
    """Bits one thread moves with a load or store: LDG.E.U16 16, LDG.E 32, LDG.E.EF.128 128
    (cache hints such as .EF, .CONSTANT, .LTC128B, .STRONG.GPU are not widths)."""
    width = 32
    for mod in ins.modifiers:
        width = _WIDTH_MODIFIERS.get(mod, width)
    return width


def is_global_load(ins: Instruction) -> bool:
    # LD is the generic-address load, global whenever a pointer is
    return ins.base in ("LDG", "LD")


def is_global_store(ins: Instruction) -> bool:
    return ins.base in ("STG", "ST")


_REGISTER = re.compile(r"(?<![A-Za-z_])R(\d+)(\.64)?\b")


def registers_of(ins: Instruction) -> set[int]:
    """Every general register an instruction reads or writes: ``R4.64`` and the 64-bit forms
    (.WIDE's last operand, F64 arithmetic) name a pair, a 64 / 128-bit store's data 2 / 4."""
    regs: set[int] = set()
    operands = [o.strip() for o in ins.operands.split(",")]
    pair_all = ins.base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "CS2R")
    store_data = access_width(ins) // 32 if (is_global_store(ins) or ins.base in ("STS", "STL")) else 1
    last_register = max((i for i, o in enumerate(operands) if _REGISTER.search(o)), default=-1)
    for i, operand in enumerate(operands):
        for m in _REGISTER.finditer(operand):
            n, count = int(m.group(1)), 1
            if m.group(2) or pair_all or (".WIDE" in ins.opcode and i == last_register):
                count = 2
            if i == len(operands) - 1 and "[" not in operand:
                count = max(count, store_data)
            regs.update(range(n, n + count))
    return regs


def load_destinations(ins: Instruction) -> set[int]:
    """The registers a global load writes: its first operand, width / 32 of them."""
    m = _REGISTER.match(ins.operands.split(",")[0].strip())
    if not m:
        return set()  # RZ: a prefetch-like load nobody waits for
    n = int(m.group(1))
    return set(range(n, n + max(1, access_width(ins) // 32)))


def load_runs(items: Sequence[Item], counts=is_global_load) -> list[list[Instruction]]:
    """Runs of loads issued back to back: within one basic block (no branch instruction and no
    branch target in between), before any instruction touches a register that a load of the
    run writes. Only loads for which ``counts`` is true join a run; others pass through."""
    runs: list[list[Instruction]] = []
    run: list[Instruction] = []
    pending: set[int] = set()

    def close():
        nonlocal run, pending
        if run:
            runs.append(run)
        run, pending = [], set()

    for item in items:
        if isinstance(item, Label):
            close()
            continue
        if pending and registers_of(item) & pending:
            close()
        if is_global_load(item) and counts(item):
            dest = load_destinations(item)
            if dest:
                run.append(item)
                pending |= dest
        if item.base in _BLOCK_ENDS:
            close()
    close()
    return runs


def max_loads_back_to_back(items: Sequence[Item], width: int = 128) -> int:
    """The most loads of ``width`` bits one thread issues before it waits on any of them."""
    runs = load_runs(items, lambda ins: access_width(ins) == width)
    return max((len(r) for r in runs), default=0)


@dataclasses.dataclass(frozen=True)
class Block:
    """A basic block: its instructions, and the blocks control may pass to (by index)."""

    instructions: tuple
    successors: tuple = ()
    # Successors reached only when a warp vote fires (rare_side): left out of the longest path.
    rare: tuple = ()

    @property
    def address(self) -> int:
        return self.instructions[0].address


def _branch_target(ins: Instruction, labels: dict) -> Optional[int]:
    m = _TARGET.search(ins.operands)
    if not m:
        return None
    return labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)


def control_flow(items: Sequence[Item]) -> list[Block]:
    """The kernel's basic blocks and their edges, as a converged warp runs them.

    ``BRA.DIV`` is taken only by a warp whose threads diverged before a warp-wide collective
    (a shuffle, a vote): it jumps to an out-of-line copy of the collective that then branches
    back. The kernels here call their shuffles with every thread of the warp, so that copy
    never runs, and its branch back is no loop: the edge is left out. A CALL returns to the
    next instruction (its routine, a slow path of a division, is not followed). An indirect
    branch (BRX: here a jump into an unrolled run of shuffle rounds, as many as a row has lanes)
    is followed to the next instruction, as if every round ran."""
    labels, pending = {}, []
    starts = set()
    for item in items:
        if isinstance(item, Label):
            pending.append(item.name)
        else:
            if pending:
                starts.add(item.address)
            labels.update((name, item.address) for name in pending)
            pending = []
    instructions = [i for i in items if isinstance(i, Instruction)]
    if not instructions:
        return []
    starts.add(instructions[0].address)
    for ins, nxt in zip(instructions, instructions[1:]):
        if ins.base in _BLOCK_ENDS:
            starts.add(nxt.address)
    groups: list[list[Instruction]] = []
    for ins in instructions:
        if ins.address in starts or not groups:
            groups.append([])
        groups[-1].append(ins)
    index = {g[0].address: n for n, g in enumerate(groups)}
    position = {ins.address: n for n, ins in enumerate(instructions)}
    blocks = []
    for n, group in enumerate(groups):
        last = group[-1]
        following = [n + 1] if n + 1 < len(groups) else []
        conditional = bool(last.predicate) and last.predicate not in ("@PT", "@UPT")
        rare: list = []
        if last.base in ("BRA", "JMP") and "DIV" not in last.modifiers:
            target = _branch_target(last, labels)
            taken = [index[target]] if target in index else []
            succ = taken + following if conditional or not taken else taken
            side = rare_side(instructions[:position[last.address] + 1]) if conditional else None
            rare = {"taken": taken, "following": following}.get(side, [])
        elif last.base in ("EXIT", "RET", "KILL", "BPT") and not conditional:
            succ = []
        else:
            succ = following
        blocks.append(Block(tuple(group), tuple(dict.fromkeys(succ)), tuple(s for s in rare if s in succ)))
    return blocks


def rare_side(code: Sequence[Instruction]) -> Optional[str]:
    """Which edge of a conditional branch (the last of ``code``, the instructions up to it in
    address order) runs only when a warp vote fires ("taken" or "following"), or None: the
    predicate it tests was last set by a VOTE.ANY (which may sit in a block of its own, the
    branch being the target of the vote's out-of-line copy for a diverged warp). Here that is
    the lazy rescale of warp_pool's online softmax, whose vote fires at a group's first rows
    and then only when a score passes the running maximum by e^8: the model counts the other
    side (ASSUMPTIONS)."""
    branch = code[-1]
    register = branch.predicate.lstrip("@!")
    for ins in reversed(code[:-1]):
        if ins.operands.split(",")[0].strip() == register:
            if ins.base == "VOTE" and "ANY" in ins.modifiers:
                return "following" if branch.predicate.startswith("@!") else "taken"
            return None
    return None


def _dominators(blocks: Sequence[Block]) -> list[Optional[int]]:
    """Immediate dominators (Cooper, Harvey and Kennedy's iteration) of the blocks reachable
    from the first; None for the entry and the unreachable."""
    order: list[int] = []
    seen = set()
    stack = [(0, iter(blocks[0].successors))] if blocks else []
    seen.add(0)
    while stack:
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            order.append(node)
            stack.pop()
        elif nxt not in seen:
            seen.add(nxt)
            stack.append((nxt, iter(blocks[nxt].successors)))
    rpo = order[::-1]
    position = {b: n for n, b in enumerate(rpo)}
    predecessors: dict[int, list[int]] = {b: [] for b in rpo}
    for b in rpo:
        for s in blocks[b].successors:
            predecessors[s].append(b)
    idom: dict[int, int] = {0: 0} if blocks else {}

    def intersect(a, b):
        while a != b:
            while position[a] > position[b]:
                a = idom[a]
            while position[b] > position[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in rpo[1:]:
            done = [p for p in predecessors[b] if p in idom]
            new = done[0]
            for other in done[1:]:
                new = intersect(other, new)
            if idom.get(b) != new:
                idom[b], changed = new, True
    return [None if b == 0 else idom.get(b) for b in range(len(blocks))]


@dataclasses.dataclass(frozen=True)
class Loop:
    """A natural loop: its header (the target of its back edges, which it dominates) and every
    instruction that can reach a back edge without passing the header."""

    header: int  # address
    addresses: frozenset
    blocks: frozenset = frozenset()  # indices into FlowGraph.blocks

    @property
    def first(self) -> int:
        return min(self.addresses)

    @property
    def last(self) -> int:
        return max(self.addresses)

    def __contains__(self, address: int) -> bool:
        return address in self.addresses


@dataclasses.dataclass
class FlowGraph:
    """A kernel's control flow (:func:`control_flow`), its dominators and natural loops."""

    blocks: list
    reachable: set  # block indices a converged warp can reach from the entry
    back_edges: set  # (from, to) block indices: to dominates from
    loops: list  # Loop, ordered by address

    @classmethod
    def of(cls, items: Sequence[Item]) -> "FlowGraph":
        blocks = control_flow(items)
        idom = _dominators(blocks)
        reachable = {n for n in range(len(blocks)) if n == 0 or idom[n] is not None}

        def dominates(a, b):
            while True:
                if a == b:
                    return True
                if b == 0:
                    return False
                b = idom[b]

        predecessors: dict[int, list[int]] = {n: [] for n in range(len(blocks))}
        for n, block in enumerate(blocks):
            for s in block.successors:
                predecessors[s].append(n)
        back_edges, bodies = set(), {}
        for n in sorted(reachable):
            for header in blocks[n].successors:
                if dominates(header, n):
                    back_edges.add((n, header))
                    body = bodies.setdefault(header, {header})
                    work = [n]
                    while work:
                        b = work.pop()
                        if b not in body and b in reachable:
                            body.add(b)
                            work.extend(predecessors[b])
        found = [Loop(blocks[h].address, frozenset(i.address for b in body for i in blocks[b].instructions),
                      frozenset(body)) for h, body in bodies.items()]
        return cls(blocks, reachable, back_edges, sorted(found, key=lambda lp: (lp.first, -len(lp.addresses))))

    def longest_path(self, nodes: set, start: int, weight, ends: Optional[set] = None) -> int:
        """The most instructions (``weight(block)`` each) on a path from ``start`` through
        ``nodes`` that takes no back edge, ending anywhere (or in ``ends``): one trip through a
        loop body, every loop inside it run once, the longer side of every branch but a warp
        vote's rare side (Block.rare)."""
        order, seen, stack = [], {start}, [(start, iter(self.blocks[start].successors))]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                order.append(node)
                stack.pop()
            elif nxt in nodes and nxt not in seen and (node, nxt) not in self.back_edges:
                seen.add(nxt)
                stack.append((nxt, iter(self.blocks[nxt].successors)))
        best: dict[int, int] = {}
        for node in order:  # successors first
            tails = [best[s] for s in self.blocks[node].successors
                     if s in best and (node, s) not in self.back_edges and s not in self.blocks[node].rare]
            if ends is None or node in ends or tails:  # else no path from it ends where it should
                best[node] = weight(node) + max(tails, default=0)
        return best.get(start, 0)

    def nests(self) -> list[Loop]:
        """The outermost loops: those inside no other."""
        return [lp for lp in self.loops if not any(lp.addresses < other.addresses for other in self.loops)]

    def trip(self, loop: Loop, weight) -> int:
        """Instructions of one trip through ``loop``: its longest path from the header to a
        block that branches back to it."""
        header = next(n for n in loop.blocks if self.blocks[n].address == loop.header)
        latches = {n for n, h in self.back_edges if h == header}
        return self.longest_path(set(loop.blocks), header, weight, latches)


def loops(items: Sequence[Item]) -> list[Loop]:
    """The natural loops of the kernel's control flow (:func:`control_flow`), ordered by address.
    An edge back to an earlier address that is no loop (the branch back from an out-of-line
    block) is not one."""
    return FlowGraph.of(items).loops


def loop_nests(items: Sequence[Item]) -> list[Loop]:
    """The outermost loops: those inside no other."""
    return FlowGraph.of(items).nests()


def hot_width(items: Sequence[Item]) -> int:
    """The load width the model follows: 16 bytes if the kernel issues any, else its most
    frequent global-load width (0: no global loads)."""
    counts = memory_counts(items)["loads"]
    if counts.get(128):
        return 128
    return max(counts, key=lambda w: (counts[w], w)) if any(counts.values()) else 0


@dataclasses.dataclass(frozen=True)
class HotLoop:
    """The loop nest a thread spends its time in, as far as the code tells: the one holding the
    most loads of the hot width (the whole kernel when no loop loads); and inside it the pass
    loop, the innermost loop that loads at that width (a frame's rows, once per pass), whose
    instructions per pass set what the kernel issues per byte."""

    first: int
    last: int
    loads: int  # global loads of any width in it
    runs: int  # runs of loads issued back to back (load_runs): each waits one latency
    bytes: int  # loaded per pass through it
    instructions: int = 0  # in it, every path: what the nest costs in code, not per pass
    shuffles: int = 0  # SHFL
    barriers: int = 0  # BAR
    # The pass loop: its instructions (the longest path, a loop inside it once), and the bytes its
    # loads of the hot width bring a thread per pass; the average over its copies where the
    # compiler made several (one per group of a chunk). Its parent loop's own instructions (none
    # of a loop inside it) run once per pass of the parent; the rest, a loop further out
    # included, once per warp.
    pass_instructions: float = 0.0
    pass_bytes: float = 0.0
    outer_instructions: int = 0
    rest_instructions: int = 0

    @property
    def bytes_per_run(self) -> float:
        """What one thread has in flight on average, if every instruction of the nest runs once
        per pass (frames_per_token = 1, every row valid)."""
        return self.bytes / self.runs if self.runs else 0.0


def reachable_addresses(items: Sequence[Item]) -> set[int]:
    """The instructions a converged warp can reach from the kernel's entry (:func:`control_flow`):
    not the out-of-line copies of its collectives, nor the routines it calls."""
    graph = FlowGraph.of(items)
    return {i.address for n in graph.reachable for i in graph.blocks[n].instructions}


def hot_loop(items: Sequence[Item]) -> Optional[HotLoop]:
    width = hot_width(items)
    if not width:
        return None
    instructions = [i for i in items if isinstance(i, Instruction)]
    graph = FlowGraph.of(items)

    def hot(ins):
        return is_global_load(ins) and access_width(ins) == width

    def hot_count(lp):
        return sum(hot(i) for i in instructions if i.address in lp)

    def size(n):
        return len(graph.blocks[n].instructions)

    nests = [lp for lp in graph.nests() if hot_count(lp)]
    if nests:
        nest = max(nests, key=hot_count)  # ties: the first
        inside = nest.addresses
    else:
        nest, inside = None, frozenset(i.address for i in instructions)
    runs = [r for r in load_runs(items) if r[0].address in inside]
    body = [i for i in instructions if i.address in inside]
    loads = [i for i in body if is_global_load(i)]
    outer = rest = 0
    if nest is not None:
        holding = [lp for lp in graph.loops if lp.addresses <= inside and hot_count(lp)]
        passes = [lp for lp in holding if not any(other.addresses < lp.addresses for other in holding)]
        pass_instructions = sum(graph.trip(lp, size) for lp in passes) / len(passes)
        pass_bytes = sum(width // 8 * hot_count(lp) for lp in passes) / len(passes)
        counted = set().union(*(lp.blocks for lp in passes))
        parents = [lp for lp in graph.loops if passes[0].addresses < lp.addresses]
        if parents:
            parent = min(parents, key=lambda lp: len(lp.addresses))
            outer = graph.trip(parent, lambda n: 0 if n in counted else size(n))
            counted |= parent.blocks
        # the code around them, a loop further out included, once
        rest = graph.longest_path(graph.reachable, 0, lambda n: 0 if n in counted else size(n))
    else:  # no loop loads: one pass is one run through the kernel
        pass_instructions = graph.longest_path(graph.reachable, 0, size)
        pass_bytes = width // 8 * sum(hot(i) for i in body)
    return HotLoop(min(inside), max(inside), len(loads), len(runs), sum(access_width(i) // 8 for i in loads),
                   len(body), sum(i.base == "SHFL" for i in body), sum(i.base == "BAR" for i in body),
                   pass_instructions, pass_bytes, outer, rest)


def max_bytes_in_flight(items: Sequence[Item]) -> int:
    """The most bytes of global loads one thread has in flight (a run of any widths)."""
    runs = load_runs(items)
    return max((sum(access_width(i) // 8 for i in r) for r in runs), default=0)


def memory_counts(items: Iterable[Item]) -> dict:
    """Global loads and stores by width in bits, and local-memory accesses."""
    loads = {w: 0 for w in WIDTHS}
    stores = {w: 0 for w in WIDTHS}
    ldl = stl = 0
    for ins in items:
        if not isinstance(ins, Instruction):
            continue
        if is_global_load(ins):
            loads[access_width(ins)] = loads.get(access_width(ins), 0) + 1
        elif is_global_store(ins):
            stores[access_width(ins)] = stores.get(access_width(ins), 0) + 1
        elif ins.base == "LDL":
            ldl += 1
        elif ins.base == "STL":
            stl += 1
    return {"loads": loads, "stores": stores, "ldl": ldl, "stl": stl}


# ------------------------------------------------------------------------------ per kernel

@dataclasses.dataclass
class KernelCode:
    """One kernel instantiation's machine code on one arch."""

    name: str  # as the launchers spell it: vtok::cuda::residual_fwd_kernel<vtok::cuda::bf16_t, 8, 0>
    kernel: str
    config: str
    default: bool  # the 16-byte vector path every aligned input takes
    arch: str
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int
    loads: dict
    stores: dict
    ldl: int
    stl: int
    loads_back_to_back: int  # 16-byte loads, anywhere in the kernel
    hot_loads: int  # global loads in the hot loop nest (HotLoop)
    hot_runs: int  # runs of loads issued back to back there
    bytes_in_flight: float  # per thread, as the model takes it: the hot loop's bytes per run
    blocks_per_sm: int
    occupancy_limit: str
    instructions: int
    hot_instructions: int = 0  # in the hot loop nest (HotLoop.instructions)
    hot_shuffles: int = 0
    hot_barriers: int = 0
    # What a warp issues (HotLoop): per pass of the pass loop and the bytes a thread loads in it,
    # per pass of its parent loop, and once outside the nest.
    pass_instructions: float = 0.0
    pass_bytes: float = 0.0
    outer_instructions: int = 0
    rest_instructions: int = 0

    @property
    def instructions_per_kib(self) -> float:
        """Warp instructions of a pass per KiB its loads bring (every vector counted)."""
        return self.pass_instructions * 1024 / (WARP * self.pass_bytes) if self.pass_bytes else 0.0

    def row(self) -> dict:
        return dataclasses.asdict(self)


def _strip_signature(demangled: str) -> str:
    name = demangled[5:] if demangled.startswith("void ") else demangled
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def kernel_codes(sass: str, res_usage: str, arch: str) -> list[KernelCode]:
    from vtok_kernels.backends import cuda

    functions = parse_sass(sass)
    resources = parse_res_usage(res_usage)
    mangled = list(functions)
    demangled = cuda._demangle(mangled)
    codes = []
    for raw, signature in zip(mangled, demangled):
        items = functions[raw]
        kernel, config, default = cuda._describe(signature)
        res = resources.get(raw, {})
        counts = memory_counts(items)
        hot = hot_loop(items)
        occupancy = blocks_per_sm(res.get("registers", 0), res.get("shared_bytes", 0), arch)
        codes.append(KernelCode(
            name=_strip_signature(signature), kernel=kernel, config=config, default=default, arch=arch,
            registers=res.get("registers", 0), shared_bytes=res.get("shared_bytes", 0),
            local_bytes=res.get("local_bytes", 0), stack_bytes=res.get("stack_bytes", 0),
            loads=counts["loads"], stores=counts["stores"], ldl=counts["ldl"], stl=counts["stl"],
            loads_back_to_back=max_loads_back_to_back(items),
            blocks_per_sm=occupancy["blocks"], occupancy_limit=occupancy["by"],
            instructions=sum(isinstance(i, Instruction) for i in items), **hot_fields(hot)))
    return codes


def hot_fields(hot: Optional[HotLoop]) -> dict:
    """KernelCode's fields read from a kernel's hot loop (none: zeros)."""
    if hot is None:
        return {"hot_loads": 0, "hot_runs": 0, "bytes_in_flight": 0.0}
    return {"hot_loads": hot.loads, "hot_runs": hot.runs, "bytes_in_flight": hot.bytes_per_run,
            "hot_instructions": hot.instructions, "hot_shuffles": hot.shuffles, "hot_barriers": hot.barriers,
            "pass_instructions": hot.pass_instructions, "pass_bytes": hot.pass_bytes,
            "outer_instructions": hot.outer_instructions, "rest_instructions": hot.rest_instructions}


def analyse(archs: Sequence[str], sources: Optional[Sequence[Path]] = None) -> list[KernelCode]:
    """Every kernel instantiation of ``sources`` (default: every csrc/cuda/*.cu) on each arch;
    one row per (name, arch) even when two sources instantiate the same kernel."""
    from vtok_kernels.backends import cuda

    sources = cuda.cuda_sources() if sources is None else sources
    seen, codes = set(), []
    for arch in archs:
        target = cuda.nvcc_target(arch)
        for source in sources:
            sass, res = dump(Path(source), target)
            for code in kernel_codes(sass, res, target):
                if (code.name, code.arch) not in seen:
                    seen.add((code.name, code.arch))
                    codes.append(code)
    return sorted(codes, key=lambda c: (c.arch, c.kernel, c.config))


# ------------------------------------------------------------------------------ the launches

@dataclasses.dataclass
class Launch:
    kernel: str  # NVRTC name expression, as KernelCode.name spells it
    grid: tuple[int, ...]
    block: int
    params: dict  # the params struct it gets, as a dict (nested for EncodeBwdParams)
    extra: tuple = ()  # the other arguments: the row plan as a dict, or an integer

    @property
    def blocks(self) -> int:
        return math.prod(self.grid)


def _struct_dict(value) -> Union[dict, int, float]:
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype.names:
        value = value[0]
    if isinstance(value, np.void) and value.dtype.names:
        return {name: _struct_dict(value[name]) for name in value.dtype.names}
    return value.item() if hasattr(value, "item") else value


def record_launches(batch: int, frames: int, num_patches: int, channels: int, dtype, pool: str,
                    num_heads: int, backward: bool, design: str = "tiles") -> dict[str, list[Launch]]:
    """{"fwd": [...], "bwd": [...]}: the kernels and grids the cuda backend launches for
    ``encode`` (key frame 0, one frame per token) of that shape with the forward ``design``
    (VTOK_CUDA_FWD), from its own launch path: ``backends.cuda`` fills the params from meta
    tensors (no memory; their null data pointers pass the 16-byte checks as a CUDA allocation
    does) and the CuPy loader computes every grid, with its launch replaced by a recorder."""
    from unittest import mock

    import torch

    from vtok_kernels.backends import cuda, cuda_nvrtc

    class Recorder(cuda_nvrtc.NvrtcLoader):
        def __init__(self):
            self.launches: list[Launch] = []

        def _launch(self, device_index, stream, kernel, grid, args):
            self.launches.append(Launch(kernel, tuple(int(g) for g in grid), cuda_nvrtc.THREADS,
                                        _struct_dict(args[0]), tuple(_struct_dict(a) for a in args[1:])))

    meta = torch.device("meta")
    x = torch.empty(batch, frames, num_patches, channels, dtype=dtype, device=meta)
    key_index = torch.zeros(batch, dtype=torch.int64, device=meta)
    query = torch.empty(channels, dtype=torch.float32, device=meta) if pool == "attn" else None
    heads = num_heads if pool == "attn" else 1
    recorder = Recorder()
    out = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(cuda, "_loader", lambda: recorder))
        stack.enter_context(mock.patch.object(cuda, "_stream", lambda t: 0))
        stack.enter_context(mock.patch.object(torch.cuda, "device", lambda d: contextlib.nullcontext()))
        stack.enter_context(mock.patch.dict(os.environ, {"VTOK_CUDA_FWD": design}))
        sequence, lse, *kept = cuda.encode_fwd(x, key_index, query, pool, heads, 1, (), ())
        out["fwd"], recorder.launches = recorder.launches, []
        if backward:
            grad = torch.empty(sequence.shape, dtype=dtype, device=meta)
            cuda.encode_bwd(grad, x, key_index, query, sequence, lse, pool, heads, 1, (), (), *kept)
            out["bwd"] = recorder.launches
    return out


# ------------------------------------------------------------------------------ bytes per kernel

@dataclasses.dataclass
class Traffic:
    """What one kernel moves. ``reads`` / ``writes``: {tensor: bytes} touched (compulsory
    traffic); ``rereads``: further bytes its threads load from what it already read (L1 / L2);
    ``l2_bytes``: bytes the SMs load from L2 (first reads and re-reads that miss L1);
    ``used_in_flight``: the share of the hot loop's loads that bring a thread data it uses
    (:func:`used_vector_share`), by which its bytes in flight are scaled."""

    reads: dict
    writes: dict
    rereads: int
    l2_bytes: int
    used_in_flight: float = 1.0
    # What the warps issue: passes through the kernel's pass loop (None: as many as the bytes its
    # loads bring, ``streamed``, take at the pass's bytes), passes of its parent loop, and
    # ``streamed`` (None: every byte the kernel's threads load). 0 passes: a loop the launch's
    # path does not enter.
    passes: Optional[int] = None
    outer_passes: Optional[int] = None  # None: once per warp
    streamed: Optional[int] = None
    # False where the launch's path is not what the code's longest paths count, and no issue
    # time is modelled
    issue_counted: bool = True


def _template_args(name: str) -> list[str]:
    m = re.search(r"<(.*)>$", name)
    return [a.strip() for a in m.group(1).split(",")] if m else []


_ELEMENT_BYTES = {0: 4, 1: 2, 2: 2}


def used_vector_share(launch: Launch) -> float:
    """The encode kernels load every vector a lane is compiled for (their last template
    argument, K: residual_fwd_kernel<T, V, mode, K>, encode_bwd_kernel<T, V, attn, K>, all in
    one run), those past the row plan's vecs_per_lane on a clamped address, the segment's first
    vector, which the block reads anyway (csrc/cuda/encode.cuh): of a run's bytes, this share
    brings data."""
    args = _template_args(launch.kernel)
    return launch.extra[0]["vecs_per_lane"] / int(args[3])


def kernel_traffic(launch: Launch) -> Traffic:
    """Bytes of one launch of the encode kernels (batched, non-spatial: the benchmark's
    shapes), from its params and grid; what each kernel reads follows csrc/cuda/encode.cuh."""
    kernel = launch.kernel.split("<")[0].split("::")[-1]
    args = _template_args(launch.kernel)
    bwd = "fwd" in launch.params
    p = launch.params["fwd"] if bwd else launch.params
    B, T, N, C = p["batch"], p["num_frames"], p["num_patches"], p["channels"]
    S, G, H = p["num_key_tokens"], p["num_groups"], p["num_heads"]
    e = _ELEMENT_BYTES[p["dtype"]]
    x_key, x_rest = B * N * C * e, B * (T - 1) * N * C * e
    seq_keys, seq_res = B * S * C * e, B * G * C * e
    lse = B * G * H * 4
    query = C * 4
    if kernel == "key_tokens_kernel":
        # Not spatial: a 16-byte copy per thread, where the code's longest paths are the spatial
        # bins' (their loops and divisions): no issue time counted.
        return Traffic({"x.key": x_key}, {"sequence.keys": seq_keys}, 0, x_key, issue_counted=False)
    if kernel == "residual_fwd_kernel" and args[2] == "3":
        # The merge of the tiles' partial rows (kMergeSplits): each thread reads its V channels
        # of every partial row of its group, and its head's softmax state of each (the threads
        # of a head re-read one state).
        attn = p["pool"] == 1
        vec, splits = int(args[1]), launch.extra[0]["splits"]
        partials = B * G * splits * C * 4
        states = B * G * splits * H * 8 if attn else 0
        state_loads = B * G * splits * (C // vec) * 8 if attn else 0
        writes = {"sequence.residual": seq_res, **({"lse": lse} if attn else {})}
        return Traffic({"workspace.partials": partials + states}, writes, state_loads - states,
                       partials + state_loads, streamed=partials)
    if kernel == "residual_fwd_kernel" and int(args[1]) > 1:
        # One block per (segment, tile of rows, chunk of groups, video): a thread loads its key
        # row once and holds it in registers for the chunk's groups, so the key frame is read
        # once per chunk; the query segment once per block. The tiles' partial rows (and, attn,
        # their softmax states) go to the workspace, for the merge.
        attn = args[2] == "1"
        splits, chunks = launch.extra[0]["splits"], launch.grid[1]
        query_loads = B * chunks * splits * C * 4 if attn else 0
        reads = {"x.rest": x_rest, "x.key": x_key, **({"query": query} if attn else {})}
        rereads = (chunks - 1) * x_key + (query_loads - query if attn else 0)
        partials = B * G * splits * (C + (2 * H if attn else 0)) * 4
        # What the frame loop loads: each (segment, split) block's warps load their rows of every
        # group's frame, the rows past N included.
        row_bytes = WARP * launch.extra[0]["vecs_per_lane"] * int(args[1]) * e
        streamed = launch.grid[0] * launch.grid[2] * (THREADS_PER_BLOCK // WARP) * (T - 1) * row_bytes
        return Traffic(reads, {"workspace.partials": partials}, rereads,
                       x_rest + chunks * x_key + query_loads, used_vector_share(launch), streamed=streamed)
    if kernel == "warp_pool_kernel":
        # One warp per (video, segment, split of the rows, chunk of groups), warp items numbered
        # chunk fastest, kWarps to a block: a warp loads its key rows once per chunk (the query
        # segment once, to shared memory); the warps of a block that pool one (video, segment,
        # split) load the same key rows at about the same time, which the model takes from L1
        # after the first: L2 reads the key rows once per such (block, item) pair. The splits'
        # partial rows (and, attn, softmax states) go to the workspace, for the merge.
        attn = args[2] == "true"
        plan = launch.extra[0]
        splits, per_warp = plan["splits"], plan["groups_per_block"]
        chunks = -(-G // per_warp)
        items = B * plan["num_segments"] * splits
        pairs = sum(((i + 1) * chunks - 1) // (THREADS_PER_BLOCK // WARP) - i * chunks // (THREADS_PER_BLOCK // WARP) + 1
                    for i in range(items))
        query_loads = B * chunks * splits * C * 4 if attn else 0
        reads = {"x.rest": x_rest, "x.key": x_key, **({"query": query} if attn else {})}
        rereads = (chunks - 1) * x_key + (query_loads - query if attn else 0)
        partials = B * G * splits * (C + (2 * H if attn else 0)) * 4
        # What the frame loop loads: a warp's 32 / lanes rows of each frame of its chunk (the
        # rows past its split's end included); its parent loop runs once per rows and chunk.
        row_passes = B * plan["num_segments"] * sum(
            -(-((s + 1) * N // splits - s * N // splits) // (WARP // plan["lanes"])) for s in range(splits))
        row_bytes = WARP * plan["vecs_per_lane"] * int(args[1]) * e
        return Traffic(reads, {"workspace.partials": partials}, rereads,
                       x_rest + x_key * pairs // items + query_loads, used_vector_share(launch),
                       outer_passes=row_passes * chunks, streamed=row_passes * (T - 1) * row_bytes)
    if kernel == "residual_fwd_kernel":
        # The scalar path: one block per (segment, group, video) walks every row, so the key
        # frame is read once per group, and the query segment once per block.
        attn = int(args[2]) == 1
        reads = {"x.rest": x_rest, "x.key": x_key, **({"query": query} if attn else {})}
        rereads = (G - 1) * x_key + (B * G * query - query if attn else 0)
        writes = {"sequence.residual": seq_res, **({"lse": lse} if attn else {})}
        return Traffic(reads, writes, rereads, x_rest + G * x_key + (B * G * query if attn else 0),
                       used_vector_share(launch), streamed=x_rest)
    if kernel == "attn_delta_kernel":
        return Traffic({"sequence.residual": seq_res, "grad_sequence.residual": seq_res},
                       {"workspace.delta": lse}, 0, 2 * seq_res)
    if kernel == "encode_bwd_kernel":
        attn = args[2] == "true"
        segments, tiles = launch.grid[0], launch.grid[1]
        lanes = launch.extra[0]["lanes"] if launch.extra else 1
        per_frame_rows = B * (T - 1) * N * C * e  # grad r, per thread row, every non-key frame
        grad_r_l2 = B * (T - 1) * tiles * C * e  # once per block and frame (the block's rows share it)
        reads = {"grad_sequence.residual": seq_res, "grad_sequence.keys": seq_keys}
        rereads = per_frame_rows - seq_res
        l2 = grad_r_l2 + seq_keys
        writes = {"grad_x": B * T * N * C * e}
        if attn:
            # x of every frame; the thread's own key row once (held across the frames); grad r
            # once per frame; lse and delta by every lane of a row; the query segment once per
            # block
            reads.update({"x.rest": x_rest, "x.key": x_key, "lse": lse, "workspace.delta": lse, "query": query})
            scalars = B * (T - 1) * N * segments * lanes * 8
            rereads = per_frame_rows - seq_res + scalars - 2 * lse + B * tiles * C * 4 - query
            l2 = x_rest + x_key + grad_r_l2 + seq_keys + B * tiles * (T - 1) * segments * 8 + B * tiles * C * 4
            writes["workspace.partials"] = B * tiles * C * 4
        # A pass: a warp's rows of one frame (those past N included), grad r (and, attn, x)
        row_bytes = WARP * (launch.extra[0]["vecs_per_lane"] * int(args[1]) if launch.extra else 1) * e
        streamed = launch.blocks * (THREADS_PER_BLOCK // WARP) * (T - 1) * row_bytes * (2 if attn else 1)
        return Traffic(reads, writes, rereads, l2, used_vector_share(launch), streamed=streamed)
    if kernel == "grad_query_reduce_kernel":
        partials = launch.extra[0] * C * 4
        return Traffic({"workspace.partials": partials}, {"grad_query": query}, 0, partials)
    raise ValueError(f"no traffic model for {launch.kernel}")


# ------------------------------------------------------------------------------ the model

@dataclasses.dataclass
class KernelEstimate:
    kernel: str
    config: str
    grid: tuple
    blocks: int
    blocks_per_sm: int
    waves: float
    tail: float
    bytes_in_flight_per_sm: int
    littles_law_gb_per_s: float  # SMs x bytes in flight / HBM latency x tail, at most the copy bandwidth
    hbm_bytes: int
    l2_bytes: int
    thread_hbm_bytes: int
    thread_cached_bytes: int
    t_hbm_us: float
    t_latency_us: float
    time_us: float
    bound: str
    name: str = ""  # as the launch names it (KernelCode.name): what a profiler's report matches
    instructions: float = 0.0  # warp instructions issued (:func:`warp_instructions`)
    t_issue_us: float = 0.0

    @property
    def instructions_per_kib(self) -> float:
        """Warp instructions per KiB of HBM traffic, as ncu's counters give it."""
        return self.instructions * 1024 / self.hbm_bytes if self.hbm_bytes else 0.0


def warp_instructions(launch: Launch, code: KernelCode, traffic: Traffic) -> float:
    """What the launch's warps issue: each pass through the pass loop, each pass of its parent
    loop and, once per warp, the code outside the nest (HotLoop), each the longest path."""
    if not traffic.issue_counted:
        return 0.0
    passes = traffic.passes
    if passes is None:
        streamed = traffic.streamed
        if streamed is None:
            streamed = sum(traffic.reads.values()) + traffic.rereads
        per_pass = WARP * code.pass_bytes * traffic.used_in_flight
        passes = streamed / per_pass if per_pass else 0
    warps = launch.blocks * -(-launch.block // WARP)
    # a warp that reaches the pass loop has run its parent's code at least once
    outer = traffic.outer_passes if traffic.outer_passes is not None else warps
    return passes * code.pass_instructions + outer * code.outer_instructions + warps * code.rest_instructions


def estimate_kernel(launch: Launch, code: KernelCode, traffic: Traffic, resident: set,
                    sms: int = H100_SMS) -> KernelEstimate:
    """One launch's time (``resident``: tensors already in L2, updated with this launch's).

    The blocks run in waves of the GPU's resident capacity, the last one partly full; each wave
    does its share of the work (every block does the same) in a time made of three: its HBM
    bytes at the copy bandwidth; its loads at the bytes that its resident threads keep in
    flight, a latency per run (Little's law: bandwidth = bytes in flight / latency); and its
    warp instructions at ISSUE_RATE per cycle on each SM, for as long as the SM that holds the
    most of its blocks takes. The larger of the first two is its memory time, which the issue
    time overlaps (OVERLAP)."""
    capacity = sms * code.blocks_per_sm
    waves = launch.blocks / capacity if capacity else math.inf
    tail = launch.blocks / (math.ceil(waves) * capacity) if capacity else 0.0
    threads = -(-launch.block // WARP) * WARP
    per_thread = code.bytes_in_flight * traffic.used_in_flight
    in_flight_sm = code.blocks_per_sm * threads * per_thread
    hbm_reads = sum(b for t, b in traffic.reads.items() if t not in resident)
    thread_cached = sum(b for t, b in traffic.reads.items() if t in resident) + traffic.rereads
    hbm = hbm_reads + sum(traffic.writes.values())
    waiting = hbm_reads * HBM_LATENCY_S + thread_cached * L2_LATENCY_S  # byte-seconds of loads
    instructions = warp_instructions(launch, code, traffic)
    full, last = divmod(launch.blocks, capacity) if capacity else (0, launch.blocks)
    t_hbm = t_lat = t_issue = total = 0.0
    bounds = []
    for blocks, count in ((capacity, full), (last, 1 if last else 0)):
        if not count:
            continue
        share = blocks / launch.blocks
        in_flight = blocks * threads * per_thread
        wave_hbm = share * hbm / COPY_BANDWIDTH
        wave_lat = share * waiting / in_flight if in_flight else math.inf
        # the wave lasts as long as its busiest SM: ceil(blocks / SMs) blocks' instructions
        busiest = blocks / -(-blocks // sms)
        wave_issue = share * instructions / (ISSUE_RATE * H100_SM_CLOCK_HZ * busiest)
        t_hbm, t_lat, t_issue = t_hbm + count * wave_hbm, t_lat + count * wave_lat, t_issue + count * wave_issue
        times = {"bandwidth": wave_hbm, "latency": wave_lat, "issue": wave_issue}
        total += count * (max(wave_hbm, wave_lat) ** OVERLAP + wave_issue ** OVERLAP) ** (1 / OVERLAP)
        bounds.append(max(times, key=times.get))
    bound = bounds[0] if len(set(bounds)) == 1 else f"{bounds[0]}, tail {bounds[-1]}"
    littles = min(COPY_BANDWIDTH, sms * in_flight_sm * tail / HBM_LATENCY_S)
    for tensor, size in {**traffic.reads, **traffic.writes}.items():
        if size <= L2_RESIDENT_BYTES:
            resident.add(tensor)
    return KernelEstimate(
        kernel=code.kernel, config=code.config, grid=launch.grid, blocks=launch.blocks,
        blocks_per_sm=code.blocks_per_sm, waves=waves, tail=tail, bytes_in_flight_per_sm=in_flight_sm,
        littles_law_gb_per_s=littles / 1e9, hbm_bytes=hbm, l2_bytes=traffic.l2_bytes,
        thread_hbm_bytes=hbm_reads, thread_cached_bytes=thread_cached, t_hbm_us=t_hbm * 1e6,
        t_latency_us=t_lat * 1e6, time_us=total * 1e6, bound=bound, name=launch.kernel,
        instructions=instructions, t_issue_us=t_issue * 1e6)


# The benchmark's GPU scale: 8 videos of 16 frames (benchmarks/cases.py SCALES["gpu"], the
# frame count the headline rows use).
MODEL_BATCH, MODEL_FRAMES = 8, 16
MODEL_PRESETS = ("siglip", "clip")
MODEL_DTYPES = ("bfloat16", "float32")
MODEL_OPS = ("encode-mean", "encode-attn")
MODEL_MODES = ("fwd", "fwd+bwd")


def _cases():
    """benchmarks.cases: the presets and the bytes each row must move, as the benchmark counts them."""
    try:
        from benchmarks import cases
    except ImportError:  # run from outside the repository root
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks import cases
    return cases


# The cuda backend's forward designs (launch.h FwdDesign), by the name of their benchmark rows
# (benchmarks/cases.py): the default, and the warp-split forward measured beside it.
MODEL_DESIGNS = (("cuda", "tiles"), ("cuda-warps", "warps"))


def model_rows(codes: Sequence[KernelCode], presets: Sequence[str] = MODEL_PRESETS,
               dtypes: Sequence[str] = MODEL_DTYPES, batch: int = MODEL_BATCH,
               frames: int = MODEL_FRAMES, designs: Sequence[tuple[str, str]] = MODEL_DESIGNS) -> list[dict]:
    """One row per (design, op, mode, preset, dtype), keyed as the benchmark rows are
    (benchmarks/proof.py load_model), with the kernels behind its estimate."""
    import torch

    by_name = {c.name: c for c in codes if c.arch.startswith("sm_90")}
    if not by_name:
        raise ValueError("the model reads the sm_90a machine code: analyse sm_90a first")
    cases = _cases()
    rows = []
    for (impl, design), preset_name in itertools.product(designs, presets):
        preset = cases.PRESETS[preset_name]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for op in MODEL_OPS:
                pool = "attn" if op == "encode-attn" else "mean"
                launches = record_launches(batch, frames, preset.num_patches, preset.channels, dtype, pool,
                                           preset.num_heads, backward=True, design=design)
                passes = {}
                for name, pass_launches in launches.items():
                    resident: set = set()
                    estimates = []
                    for launch in pass_launches:
                        code = by_name.get(launch.kernel)
                        if code is None:
                            raise KeyError(f"{launch.kernel} is launched but not in the sm_90a machine code")
                        estimates.append(estimate_kernel(launch, code, kernel_traffic(launch), resident))
                    passes[name] = estimates
                for mode in MODEL_MODES:
                    used = ["fwd"] if mode == "fwd" else ["fwd", "bwd"]
                    estimates = [k for name in used for k in passes[name]]
                    seconds = sum(k.time_us for k in estimates) / 1e6
                    moved = cases.Case(op, mode, "cuda", preset, frames, batch, dtype, "cuda").bytes_moved()
                    element = torch.empty(0, dtype=dtype).element_size()
                    x_bytes = batch * frames * preset.num_patches * preset.channels * element
                    gbps = moved / seconds / 1e9
                    rows.append({
                        "impl": impl, "op": op, "mode": mode, "preset": preset_name, "dtype": dtype_name,
                        "batch": batch, "frames": frames, "num_heads": preset.num_heads if pool == "attn" else 1,
                        "bytes_moved": moved, "x_bytes": x_bytes, "predicted_us": seconds * 1e6,
                        "predicted_gb_per_s": gbps, "fraction_of_copy": gbps * 1e9 / COPY_BANDWIDTH,
                        "l2_bytes": sum(k.l2_bytes for k in estimates),
                        "hbm_bytes": sum(k.hbm_bytes for k in estimates),
                        "kernels": [dict(dataclasses.asdict(k), grid=list(k.grid),
                                         **{"pass": name}) for name in used for k in passes[name]],
                    })
    return rows


# ------------------------------------------------------------------------------ the report

def _widths(counts: dict) -> str:
    return "/".join(str(counts.get(w, 0)) for w in WIDTHS)


def format_code_table(codes: Sequence[KernelCode]) -> str:
    header = (f"{'kernel':<25}{'config':<29}{'arch':<7}{'regs':>5}{'smem':>7}{'blk/SM':>8}  "
              f"{'loads 8/16/32/64/128':<22}{'stores 8/16/32/64/128':<23}{'b2b16':>6}{'hot':>8}{'B/run':>6}"
              f"{'ins':>6}{'SHFL':>5}{'BAR':>4}{'LDL/STL':>8}{'pass':>6}{'/KiB':>6}")
    lines = [header, "-" * len(header)]
    for c in codes:
        config = c.config + ("" if c.default else " *")
        hot = f"{c.hot_loads}/{c.hot_runs}"
        lines.append(f"{c.kernel:<25}{config:<29}{c.arch:<7}{c.registers:>5}{c.shared_bytes:>7}"
                     f"{c.blocks_per_sm:>4} {c.occupancy_limit[:3]:<3}  {_widths(c.loads):<22}{_widths(c.stores):<23}"
                     f"{c.loads_back_to_back:>6}{hot:>8}{c.bytes_in_flight:>6.1f}{c.hot_instructions:>6}"
                     f"{c.hot_shuffles:>5}{c.hot_barriers:>4}{f'{c.ldl}/{c.stl}':>8}"
                     f"{c.pass_instructions:>6.0f}{c.instructions_per_kib:>6.0f}")
    lines += [
        "* the scalar fallback (V=1): only misaligned views and C not a multiple of 16 bytes take it.",
        "blk/SM: resident blocks of 256 threads and what limits them (reg, thr, sha: registers, threads, shared).",
        "loads / stores: global accesses in the code by width in bits. b2b16: the most 16-byte loads one",
        "thread issues back to back (one basic block, before any use of what they load). hot: loads / runs",
        "of loads issued back to back in the loop nest with the most 16-byte loads (else of the most",
        "frequent width); B/run: its bytes per run, what a thread keeps in flight in the model.",
        "ins / SHFL / BAR: instructions, shuffles and barriers in that nest, on every path through it (code",
        "size, not what one pass issues: a plan takes one of several paths).",
        "pass: instructions a warp issues per pass of the innermost loop that loads at the hot width (the",
        "longest path through it, a loop inside it once); /KiB: those per KiB its loads bring.",
    ]
    return "\n".join(lines)


def format_model_table(rows: Sequence[dict]) -> str:
    lines = [f"Little's-law and issue model, H100 SXM ({H100_SMS} SMs), copy bandwidth {COPY_BANDWIDTH / 1e12:.1f} "
             f"TB/s, {ISSUE_RATE} warp instructions per cycle per SM, B={MODEL_BATCH} T={MODEL_FRAMES} "
             "(ins/KiB: warp instructions per KiB of HBM traffic; issue: their time, us):"]
    for row in rows:
        lines.append("")
        lines.append(f"{row['impl']}: {row['op']} {row['mode']} {row['preset']} {row['dtype']}: "
                     f"{row['predicted_us']:.0f} us, {row['predicted_gb_per_s']:.0f} GB/s = "
                     f"{100 * row['fraction_of_copy']:.0f}% of {COPY_BANDWIDTH / 1e12:.1f} TB/s; "
                     f"L2->SM {row['l2_bytes'] / row['x_bytes']:.2f} x bytes of x, HBM {row['hbm_bytes'] / 1e6:.0f} MB")
        lines.append(f"  {'pass':<4} {'kernel':<25}{'config':<27}{'blocks':>7}{'blk/SM':>7}{'waves':>6}"
                     f"{'KB fly/SM':>10}{'LL GB/s':>8}{'L2/x':>6}{'HBM MB':>8}{'ins/KiB':>8}{'issue':>7}{'us':>7}"
                     "  bound")
        for k in row["kernels"]:
            lines.append(f"  {k['pass']:<4} {k['kernel']:<25}{k['config']:<27}{k['blocks']:>7}{k['blocks_per_sm']:>7}"
                         f"{k['waves']:>6.2f}{k['bytes_in_flight_per_sm'] / 1024:>10.1f}"
                         f"{k['littles_law_gb_per_s']:>8.0f}{k['l2_bytes'] / row['x_bytes']:>6.2f}"
                         f"{k['hbm_bytes'] / 1e6:>8.1f}"
                         f"{k['instructions'] * 1024 / k['hbm_bytes'] if k['hbm_bytes'] else 0:>8.0f}"
                         f"{k['t_issue_us']:>7.1f}{k['time_us']:>7.1f}  {k['bound']}")
    return "\n".join(lines)


def summary_table(rows: Sequence[dict]) -> str:
    header = (f"{'impl':<11}{'op':<12}{'mode':<8}{'preset':<8}{'dtype':<10}{'us':>7}{'GB/s':>7}{'of copy':>8}"
              f"{'L2/x':>6}  kernels (blocks, blk/SM, waves, KB in flight/SM)")
    lines = [header, "-" * len(header)]
    for r in rows:
        kernels = "; ".join(f"{k['pass'][0]}:{k['kernel'].replace('_kernel', '')} {k['blocks']}, {k['blocks_per_sm']}, "
                            f"{k['waves']:.2f}, {k['bytes_in_flight_per_sm'] / 1024:.0f}" for k in r["kernels"])
        lines.append(f"{r['impl']:<11}{r['op']:<12}{r['mode']:<8}{r['preset']:<8}{r['dtype']:<10}{r['predicted_us']:>7.0f}"
                     f"{r['predicted_gb_per_s']:>7.0f}{100 * r['fraction_of_copy']:>7.0f}%"
                     f"{r['l2_bytes'] / r['x_bytes']:>6.2f}  {kernels}")
    return "\n".join(lines)


def report_text(codes: Sequence[KernelCode], rows: Sequence[dict], tools: dict,
                triton_codes: Sequence[KernelCode] = (), assumptions: Sequence[str] = ASSUMPTIONS) -> str:
    parts = [f"sass-report: {', '.join(sorted({c.arch for c in codes}))}; "
             + ", ".join(f"{k} {v}" for k, v in tools.items()),
             "", format_code_table(codes)]
    if triton_codes:
        parts += ["", "Triton kernels at the presets (the default config of each launch; blk/SM: "
                  "programs of 32 x num_warps threads):", format_code_table(triton_codes).split("\n* ")[0]]
    if rows:
        parts += ["", "Presets (f: forward kernels, b: backward kernels):", summary_table(rows),
                  "", format_model_table(rows), "", "Assumptions:"]
        parts += [f"  - {a}" for a in assumptions]
    return "\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtok_kernels sass-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90a,sm_80",
                        help="comma-separated archs (sm_90 means sm_90a); the model needs sm_90a")
    parser.add_argument("--json", type=Path, help="write the kernels and the model rows here")
    parser.add_argument("--txt", type=Path, help="write the text report here")
    parser.add_argument("--model-json", type=Path,
                        help="write the model rows here, as benchmarks/proof.py load_model reads them "
                             "(benchmarks/results/static-model.json)")
    parser.add_argument("--no-triton", action="store_true",
                        help="leave the Triton kernels out of the model (they need triton installed)")
    args = parser.parse_args(argv)
    from vtok_kernels.backends import cuda

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for arch in archs:
        if re.sub(r"a$", "", arch) not in SM_LIMITS:
            parser.error(f"--arch: unknown arch {arch!r}; expected some of {', '.join(SM_LIMITS)}")
    reason = unavailable_reason()
    if reason is not None:
        print(f"sass-report: {reason}", file=sys.stderr)
        return 1
    targets = [cuda.nvcc_target(a) for a in archs]
    try:
        codes = analyse(targets)
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    rows = []
    triton_codes: list = []
    assumptions = list(ASSUMPTIONS)
    tools = {"nvcc": tool_version(cuda.find_nvcc()), "cuobjdump": tool_version(find_tool("cuobjdump"))}
    if any(t.startswith("sm_90") for t in targets):
        try:
            rows = model_rows(codes)
        except ImportError as exc:  # an installed package: the presets live in the repository
            print(f"sass-report: no model without the repository's benchmarks/ ({exc})", file=sys.stderr)
        if rows and not args.no_triton:
            from vtok_kernels import triton_model

            reason = triton_model.available()
            if reason is None:
                snapshot = triton_model.snapshot_anywhere(MODEL_PRESETS, MODEL_DTYPES)
                rows += snapshot["rows"]
                triton_codes = triton_model.distinct_codes(snapshot)
                assumptions += triton_model.ASSUMPTIONS
                tools["triton"] = snapshot["triton"]
            else:
                print(f"sass-report: no Triton rows ({reason})", file=sys.stderr)
    text = report_text(codes, rows, tools, triton_codes, assumptions)
    print(text, end="")
    if args.txt:
        args.txt.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"tools": tools, "kernels": [c.row() for c in codes], "rows": rows,
                                         "assumptions": assumptions}, indent=1) + "\n")
    if args.model_json and not rows:
        print("sass-report: --model-json needs the model, which needs sm_90a in --arch and benchmarks/",
              file=sys.stderr)
        return 1
    if args.model_json:
        args.model_json.write_text(json.dumps({
            "source": "python -m vtok_kernels sass-report (vtok_kernels/machine_code.py)",
            "device": f"H100 SXM, {H100_SMS} SMs, sm_90a (modelled, no GPU run)",
            "copy_gb_per_s": COPY_BANDWIDTH / 1e9, "hbm_latency_ns": HBM_LATENCY_S * 1e9,
            "l2_latency_ns": L2_LATENCY_S * 1e9, "tools": tools, "assumptions": assumptions,
            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
