"""The static model against a GPU run, kernel by kernel.

``python -m vtok_kernels sass-report`` predicts each kernel's time from its machine code
(``benchmarks/results/static-model.json``); this module sets what Nsight Compute measured for
the same launches beside it, so that one GPU window says where the model holds, where it misses
and by how much (the CUDA issue's goal: within 15 %), and what a missing term would have to
explain: the warp instructions each kernel executes per KiB it moves and the rate it issues them.

    python -m benchmarks.calibrate ncu --out ncu-cuda.txt -- --impl cuda --preset clip --frames 16
        # ncu over ``kernel_profile --once`` (forward+backward rows: every kernel of a pass once)
    python -m benchmarks.calibrate report --ncu ncu-*.txt --profile kernel-profile.json \\
        --txt calibration.txt --json calibration.json

``report`` reads ncu's text output, in which every kernel the run launched follows the line
``==PROF== Profiling "name"`` and every row ends with ``ROW: ran once {key}``
(``kernel_profile --once``), so each measured kernel belongs to one benchmark row. It pairs them
with the model row's kernels in launch order by name, and prints per kernel: the model's time,
HBM and L2 bytes against the measured duration, DRAM and L2-to-SM bytes; and the executed
instructions per KiB of DRAM traffic with the IPC per SM. ``--profile`` adds the rows of
``kernel_profile --json`` (CUDA events, graph replay, kernel sum and host time, eager path and
``--host-ops``) and the goals: forward and forward+backward fractions of the run's copy
bandwidth, and which CUDA forward design is faster per row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
STATIC_MODEL = ROOT / "benchmarks" / "results" / "static-model.json"

# Every kernel of the cuda and triton backends' encode passes: what ncu profiles (-k).
KERNELS = ("residual_fwd_kernel", "warp_pool_kernel", "key_tokens_kernel", "encode_bwd_kernel",
           "attn_delta_kernel", "grad_query_reduce_kernel", "mean_fwd_kernel", "mean_bwd_kernel",
           "attn_fwd_kernel", "attn_bwd_kernel", "combine_kernel", "attn_combine_kernel")
# The sections the committed H100 record used, and the two that count instructions.
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "MemoryWorkloadAnalysis",
            "ComputeWorkloadAnalysis", "InstructionStats")
# Bytes each kernel moves, counted by the hardware: DRAM reads and writes, and the sectors the
# SMs read from L2 (32 bytes each), the model's l2_bytes.
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_sectors_srcunit_tex_op_read.sum")
L2_SECTOR_BYTES = 32
# The CUDA issue's goal for the model: within 15 % of the measurement.
MODEL_TOLERANCE = 0.15
# Goals, as fractions of the run's copy bandwidth (the CUDA and Triton issues).
GOALS = {("cuda", "fwd"): 0.90, ("cuda", "fwd+bwd"): 0.80, ("cuda-warps", "fwd"): 0.90,
         ("cuda-warps", "fwd+bwd"): 0.80, ("triton", "fwd"): 0.85, ("triton", "fwd+bwd"): 0.75}
# Kernels shorter than this are launch-bound on any model: their error is reported, not judged.
JUDGED_US = 5.0
# The exit status of an ncu run stopped at its deadline (benchmarks/proof.py CUT_EXIT).
CUT_EXIT = 124


# ------------------------------------------------------------------------------ ncu's text
_KERNEL = re.compile(r"^  (?:void )?(?P<name>\S.*?) \((?P<grid>\d+, \d+, \d+)\)x\((?P<block>\d+, \d+, \d+)\), "
                     r"Context \d+, Stream \d+")
_SECTION = re.compile(r"^    Section: (?P<name>.+?)\s*$")
_DASHES = re.compile(r"^    -+(?: +-+)+\s*$")
_PROFILING = re.compile(r'^==PROF== Profiling "(?P<name>[^"]+)"')
_RAN = re.compile(r"^(?P<id>\S+): ran once(?: (?P<key>\{.*\}))?\s*$")
# kernel_profile's row id without the key (records written before it printed one)
_ROW_ID = re.compile(r"^(?P<device>cuda|cpu)-(?P<op>encode-mean|encode-attn)-(?P<mode>fwd\+bwd|fwd)-"
                     r"(?P<impl>.+)-(?P<preset>[a-z0-9_]+)-B(?P<batch>\d+)xT(?P<frames>\d+)-(?P<dtype>\w+)$")
_UNITS = {"ns": 1e-9, "nsecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3,
          "s": 1.0, "second": 1.0, "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
          "byte/s": 1, "Kbyte/s": 1e3, "Mbyte/s": 1e6, "Gbyte/s": 1e9, "Tbyte/s": 1e12}


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def short_name(name: str) -> str:
    """A kernel's name without return type, namespaces, arguments or config: what matches across
    ncu, the extension, NVRTC and the model (``residual_fwd_kernel<bf16_t,8,0>``; a bool argument
    as ncu writes it, ``warp_pool_kernel<bf16_t,8,1,2>``)."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch in "([" and depth == 0:
            cut = i
            break
    name = re.sub(r"\b(?:vtok|cuda)::", "", name[:cut]).replace(" ", "")
    # ncu writes a bool template argument as a number, the demangler as a word
    return re.sub(r"(?<=[<,])(true|false)(?=[,>])", lambda m: "1" if m.group(1) == "true" else "0", name)


def base_name(name: str) -> str:
    return short_name(name).split("<")[0]


def parse_ncu(text: str) -> dict:
    """{"kernels": [...], "rows": [...]} from ncu's text output of a ``kernel_profile --once`` run.

    A kernel: name, grid, block, and its metrics by name ({"Duration": (unit, value), ...}; a
    name two sections share is kept as ``Section/Name`` too). A row: its key and the kernels
    ncu profiled for it (``profiled``: the ``==PROF== Profiling`` lines before its ``ran once``)."""
    kernels: list[dict] = []
    rows: list[dict] = []
    profiled: list[str] = []
    current: Optional[dict] = None
    section, state, name_end = "", "", 0
    for line in text.splitlines():
        m = _PROFILING.match(line)
        if m:
            profiled.append(m.group("name"))
            continue
        m = _RAN.match(line)
        if m:
            rows.append({"key": row_key(m.group("id"), m.group("key")), "profiled": profiled})
            profiled = []
            continue
        m = _KERNEL.match(line)
        if m:
            current = {"name": m.group("name"), "grid": [int(v) for v in m.group("grid").split(", ")],
                       "block": [int(v) for v in m.group("block").split(", ")], "metrics": {}}
            kernels.append(current)
            section, state = "", ""
            continue
        if current is None:
            continue
        m = _SECTION.match(line)
        if m:
            section, state = m.group("name"), "section"
            continue
        # A section's table: a rule whose dashes give the columns, the header, a rule, the rows,
        # a rule. Other rules (the boxes around ncu's advice) are not tables.
        rule = bool(_DASHES.match(line))
        if state == "section" and rule:
            name_end, state = re.search(r"-+", line).end(), "header"
        elif state == "header" and line.strip().startswith("Metric Name"):
            state = "header-rule"
        elif state == "header-rule" and rule:
            state = "rows"
        elif state == "rows" and rule:
            state = ""
        elif state == "rows" and line.strip():
            name, tail = line[:name_end].strip(), line[name_end:].split()
            if not name or not tail:
                continue
            if tail[-2:] == ["no", "data"]:
                unit, value = " ".join(tail[:-2]), None
            else:
                unit, value = " ".join(tail[:-1]), _number(tail[-1])
            # a name two sections share (Memory Throughput) is also kept under its section's
            current["metrics"].setdefault(name, (unit, value))
            current["metrics"][f"{section}/{name}"] = (unit, value)
    return {"kernels": kernels, "rows": rows, "unclaimed": profiled}


def row_key(row_id: str, key_json: Optional[str] = None) -> dict:
    if key_json:
        return json.loads(key_json)
    m = _ROW_ID.match(row_id)
    if not m:
        return {"id": row_id}
    key = m.groupdict()
    key.pop("device")
    key["batch"], key["frames"] = int(key["batch"]), int(key["frames"])
    return key


def _scale(unit: str) -> Optional[float]:
    """Seconds, bytes or bytes per second in one of ``unit``; counts (inst, cycle, sector, SM,
    none) as they are; None for a time or size in a unit this does not know."""
    unit = unit.replace("/second", "/s")
    if unit in _UNITS:
        return _UNITS[unit]
    return None if "byte" in unit or "second" in unit else 1.0


def _scaled(metrics: dict, *names: str) -> Optional[float]:
    for name in names:
        if name in metrics:
            unit, value = metrics[name]
            scale = _scale(unit)
            if isinstance(value, float) and scale is not None:
                return value * scale
    return None


def measured(kernel: dict) -> dict:
    """What one profiled kernel did: seconds, DRAM bytes, L2-to-SM bytes, warp instructions
    executed, IPC per SM, achieved warps per SM, registers, blocks."""
    m = kernel["metrics"]
    seconds = _scaled(m, "Duration", "gpu__time_duration.sum")
    sms = _scaled(m, "# SMs")
    active = _scaled(m, "SM Active Cycles")
    warps = _scaled(m, "Achieved Active Warps Per SM")
    dram = None
    read, write = _scaled(m, "dram__bytes_read.sum"), _scaled(m, "dram__bytes_write.sum")
    if read is not None and write is not None:
        dram = read + write
    elif seconds is not None:
        # Memory Workload Analysis' throughput is the DRAM's (dram__bytes.sum.per_second)
        rate = _scaled(m, "Memory Workload Analysis/Memory Throughput")
        dram = rate * seconds if rate is not None else None
    sectors = _scaled(m, "lts__t_sectors_srcunit_tex_op_read.sum")
    inst = _scaled(m, "Executed Instructions")
    derived = False
    if inst is None and None not in (active, warps, sms):
        per_inst = _scaled(m, "Warp Cycles Per Executed Instruction", "Warp Cycles Per Issued Instruction")
        if per_inst:
            # every active warp executes one instruction per per_inst cycles
            inst, derived = active * warps / per_inst * sms, True
    ipc = _scaled(m, "Executed Ipc Active")
    if ipc is None and inst is not None and active and sms:
        ipc = inst / (active * sms)
    blocks = math.prod(kernel["grid"])
    return {"name": short_name(kernel["name"]), "grid": kernel["grid"], "blocks": blocks,
            "seconds": seconds, "dram_bytes": dram,
            "l2_bytes": sectors * L2_SECTOR_BYTES if sectors is not None else None,
            "instructions": inst, "instructions_derived": derived, "ipc": ipc, "warps_per_sm": warps,
            "registers": _scaled(m, "Registers Per Thread"), "waves": _scaled(m, "Waves Per SM")}


def attribute(parsed: dict) -> list[dict]:
    """[{"key": row key, "kernels": [measured kernel, ...], "missing": [...]}]: ncu reports its
    kernels in launch order and each row owns those it had ``Profiling`` lines for, taken in
    that order by name: a kernel profiled but absent from the report is ``missing`` from its
    row and moves no later kernel into it."""
    out, kernels, at = [], parsed["kernels"], 0
    for row in parsed["rows"]:
        taken, missing = [], []
        for name in row["profiled"]:
            if at < len(kernels) and base_name(kernels[at]["name"]) == base_name(name):
                taken.append(measured(kernels[at]))
                at += 1
            else:
                missing.append(name)
        out.append({"key": row["key"], "kernels": taken, "missing": missing, "consistent": not missing})
    return out


# ------------------------------------------------------------------------------ the model beside it
def load_model(path: Path = STATIC_MODEL) -> dict:
    data = json.loads(Path(path).read_text())
    return {model_key(r): r for r in data["rows"]}


def model_key(row: dict) -> tuple:
    return (row["impl"], row["op"], row["mode"], row["preset"], row["dtype"])


def _model_name(kernel: dict) -> str:
    return short_name(kernel.get("name") or kernel["kernel"])


def pair_kernels(model_kernels: Sequence[dict], kernels: Sequence[dict]) -> list[tuple]:
    """(model kernel or None, measured kernel or None) in launch order: each measured kernel with
    the next model kernel of its name (a name match is exact where both carry template
    arguments, else by base name); the model's kernels ncu skipped stand alone."""
    pairs, start = [], 0
    for kernel in kernels:
        found = None
        for index in range(start, len(model_kernels)):
            a, b = _model_name(model_kernels[index]), kernel["name"]
            exact = "<" in a and "<" in b
            if (a == b) if exact else (a.split("<")[0] == b.split("<")[0]):
                found = index
                break
        if found is None:
            pairs.append((None, kernel))
            continue
        pairs.extend((m, None) for m in model_kernels[start:found])
        pairs.append((model_kernels[found], kernel))
        start = found + 1
    pairs.extend((m, None) for m in model_kernels[start:])
    return pairs


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def model_row(model: dict, key: dict) -> Optional[dict]:
    """The model's row for a measured row's key: same backend, op, mode, preset and dtype, and
    the same batch and frames where the key names them (the model is of one shape)."""
    row = model.get((key.get("impl"), key.get("op"), key.get("mode"), key.get("preset"), key.get("dtype")))
    if row is None or any(key.get(n) is not None and row.get(n) is not None and key[n] != row[n]
                          for n in ("batch", "frames")):
        return None
    return row


def compare(attributed: list[dict], model: dict, copy_bytes_per_s: Optional[float] = None) -> list[dict]:
    """One entry per (row, kernel): the model's estimate beside the measurement."""
    out = []
    for row in attributed:
        key = row["key"]
        mrow = model_row(model, key)
        for m, k in pair_kernels(mrow["kernels"] if mrow else [], row["kernels"]):
            entry = {"row": {n: key.get(n) for n in ("impl", "op", "mode", "preset", "dtype", "batch", "frames")},
                     "pass": m["pass"] if m else None, "kernel": (k or {}).get("name") or _model_name(m),
                     "config": m.get("config") if m else None, "model": None, "measured": k}
            if m:
                entry["model"] = {"us": m["time_us"], "hbm_bytes": m["hbm_bytes"], "l2_bytes": m["l2_bytes"],
                                  "blocks": m["blocks"], "bound": m["bound"], "waves": m["waves"],
                                  "instructions": m.get("instructions")}
            if m and k and k["seconds"]:
                us = k["seconds"] * 1e6
                entry["error"] = m["time_us"] / us - 1
                entry["judged"] = us >= JUDGED_US
                entry["grid_matches"] = k["blocks"] == m["blocks"]
                moved = k["dram_bytes"] or m["hbm_bytes"]
                entry["instructions_per_kib"] = _ratio(k["instructions"], moved / 1024) if moved else None
                # the model's instructions over the same bytes: its issue term against the counters
                entry["model_instructions_per_kib"] = (_ratio(m.get("instructions"), moved / 1024)
                                                       if moved else None)
                if copy_bytes_per_s and k["dram_bytes"]:
                    entry["dram_fraction_of_copy"] = k["dram_bytes"] / k["seconds"] / copy_bytes_per_s
            out.append(entry)
    return out


def profile_rows(profile: dict, model: dict) -> list[dict]:
    """kernel_profile's rows with the model's prediction, the fraction of the run's copy
    bandwidth their kernels reach, and the goal of their backend and mode."""
    copy = profile.get("copy_bytes_per_s")
    out = []
    for row in profile.get("rows", []):
        # rows written before kernel_profile recorded their key carry only their id
        key = {n: row[n] for n in ("impl", "op", "mode", "preset", "dtype", "batch", "frames") if n in row} \
            if "impl" in row else row_key(row.get("row", ""))
        if "impl" not in key:
            continue
        mrow = model_row(model, key)
        kernels = row.get("kernel_sum_s")
        fraction = row["bytes_moved"] / kernels / copy if kernels and copy else None
        goal = GOALS.get((key["impl"], key["mode"]))
        out.append({"key": key,
                    "events_us": _us(row.get("events_s")), "graph_us": _us(row.get("graph_s")),
                    "kernels_us": _us(kernels), "host_us": _us(row.get("host_s")),
                    "host_ops_us": _us(row.get("host_ops_s")),
                    "model_us": mrow["predicted_us"] if mrow else None,
                    "model_error": mrow["predicted_us"] / (kernels * 1e6) - 1 if mrow and kernels else None,
                    "fraction_of_copy": fraction, "goal": goal,
                    "meets_goal": fraction >= goal if fraction is not None and goal else None})
    return out


def faster_design(rows: list[dict]) -> list[dict]:
    """Per (op, mode, preset, dtype) measured for both CUDA forward designs: which one's
    kernels took less time, and by how much."""
    by = {}
    for r in rows:
        k = r["key"]
        shape = (k["op"], k["mode"], k["preset"], k["dtype"], k.get("batch"), k.get("frames"))
        by.setdefault(shape, {})[k["impl"]] = r["kernels_us"]
    out = []
    for (op, mode, preset, dtype, batch, frames), impls in by.items():
        tiles, warps = impls.get("cuda"), impls.get("cuda-warps")
        if tiles and warps:
            out.append({"op": op, "mode": mode, "preset": preset, "dtype": dtype, "batch": batch,
                        "frames": frames, "tiles_us": tiles,
                        "warps_us": warps, "faster": "warps" if warps < tiles else "tiles",
                        "speedup": max(tiles, warps) / min(tiles, warps)})
    return out


def _us(seconds: Optional[float]) -> Optional[float]:
    return seconds * 1e6 if seconds else None


# ------------------------------------------------------------------------------ the report
def _f(value, fmt: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:+.0f}%"


def _label(key: dict) -> str:
    frames = f" T{key['frames']}" if key.get("frames") else ""
    return f"{key['impl']} {(key['op'] or '')[7:]} {key['mode']} {key['preset']}{frames}"


def report_text(kernels: list[dict], rows: list[dict], designs: list[dict], notes: Sequence[str] = (),
                model: str = "benchmarks/results/static-model.json") -> str:
    lines = []
    if kernels:
        lines.append(f"Kernels, ncu (one call per row; model: {model}):")
        lines.append(f"  {'row':<34}{'kernel':<38}{'model':>7}{'ncu us':>8}{'err':>6}{'grid':>5}"
                     f"{'HBM MB m/ncu':>14}{'L2 MB m/ncu':>13}{'ins/KiB m/ncu':>14}{'IPC':>5}{'warps':>6}")
        for e in kernels:
            r, k, m = e["row"], e["measured"] or {}, e["model"] or {}
            row = _label(r)
            grid = "-" if "grid_matches" not in e else ("ok" if e["grid_matches"] else "DIFF")
            hbm = f"{_f(m.get('hbm_bytes') and m['hbm_bytes'] / 1e6, '.0f')}/{_f(k.get('dram_bytes') and k['dram_bytes'] / 1e6, '.0f')}"
            l2 = f"{_f(m.get('l2_bytes') and m['l2_bytes'] / 1e6, '.0f')}/{_f(k.get('l2_bytes') and k['l2_bytes'] / 1e6, '.0f')}"
            lines.append(f"  {row:<34}{e['kernel'][:37]:<38}{_f(m.get('us')):>7}"
                         f"{_f(k.get('seconds') and k['seconds'] * 1e6):>8}{_pct(e.get('error')):>6}{grid:>5}"
                         f"{hbm:>14}{l2:>13}"
                         f"{_f(e.get('model_instructions_per_kib'), '.0f') + '/' + _f(e.get('instructions_per_kib'), '.0f'):>14}"
                         f"{_f(k.get('ipc'), '.2f'):>5}{_f(k.get('warps_per_sm'), '.0f'):>6}")
        judged = [e for e in kernels if e.get("judged")]
        within = [e for e in judged if abs(e["error"]) <= MODEL_TOLERANCE]
        lines.append("  err: model / measured - 1; ins/KiB: warp instructions issued (model) and executed (ncu) per "
                     "KiB of DRAM traffic; IPC: per SM (of 4); warps: achieved per SM")
        lines.append(f"  model within {MODEL_TOLERANCE:.0%} of ncu: {len(within)} of {len(judged)} kernels "
                     f"of {JUDGED_US:.0f} us or more")
    if rows:
        lines.append("Rows, kernel_profile (us; of copy: bytes moved over the kernels' time, of the run's copy):")
        lines.append(f"  {'row':<34}{'events':>7}{'graph':>7}{'kernels':>8}{'model':>7}{'err':>5}{'host':>7}"
                     f"{'host ops':>9}{'of copy':>8}{'goal':>6}")
        for r in rows:
            row = _label(r["key"])
            mark = {True: "", False: "!", None: "?"}[r["meets_goal"]]
            goal = "-" if r["goal"] is None else f"{r['goal']:.0%}{mark}"
            lines.append(f"  {row:<34}{_f(r['events_us'], '.0f'):>7}{_f(r['graph_us'], '.0f'):>7}"
                         f"{_f(r['kernels_us']):>8}{_f(r['model_us']):>7}{_pct(r['model_error']):>5}"
                         f"{_f(r['host_us'], '.0f'):>7}{_f(r['host_ops_us'], '.0f'):>9}"
                         f"{_f(r['fraction_of_copy'] and 100 * r['fraction_of_copy'], '.0f'):>7}%{goal:>6}")
        lines.append("  goal: '!' marks a row under its backend's goal, '?' one without a kernel time")
    if designs:
        lines.append("CUDA forward designs (kernels' time, us):")
        for d in designs:
            shape = f"B{d['batch']}xT{d['frames']}" if d.get("frames") else ""
            lines.append(f"  {d['op']:<12}{d['mode']:<8}{d['preset']:<7}{shape:<8}tiles {d['tiles_us']:8.1f}  warps "
                         f"{d['warps_us']:8.1f}  faster: {d['faster']} ({d['speedup']:.2f}x)")
    lines += list(notes)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ running ncu
def find_ncu() -> Optional[str]:
    for candidate in (shutil.which("ncu"), "/usr/local/cuda/bin/ncu"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def ncu_command(ncu: str, python: str, profile_args: Sequence[str], metrics: bool = True) -> list[str]:
    command = [ncu, "--clock-control", "none", "--target-processes", "all",
               "-k", "regex:" + "|".join(KERNELS)]
    for section in SECTIONS:
        command += ["--section", section]
    if metrics:
        command += ["--metrics", ",".join(METRICS)]
    return command + [python, "-m", "benchmarks.kernel_profile", "--once", "--mode", "fwd+bwd", *profile_args]


def run_ncu(out: Path, profile_args: Sequence[str], python: str = sys.executable,
            deadline: Optional[float] = None) -> int:
    """ncu over kernel_profile --once, its whole output in ``out``. Where this ncu lacks one of
    METRICS, runs again without them (the sections still give time, DRAM bytes and
    instructions). Stopped at ``deadline`` (epoch seconds) with the process it profiles, it
    returns 124 (ncu prints its report at the end: a cut run has none)."""
    ncu = find_ncu()
    if ncu is None:
        out.write_text("ncu not found (Nsight Compute: the CUDA toolkit's ncu)\n")
        return 2
    code = 1
    for metrics in (True, False):
        command = ncu_command(ncu, python, profile_args, metrics)
        text, code = _run_until(command, deadline)
        out.write_text(f"$ {' '.join(command)}\n{text}")
        if code == 0 or not (metrics and re.search(r"Failed to find metric|[Uu]nknown metric|invalid metric", text)):
            break
    return code


def _run_until(command: list[str], deadline: Optional[float]) -> tuple[str, int]:
    """(output, exit code) of ``command`` run in a process group of its own, stopped whole at
    ``deadline``: ncu's profiled process is its child, which a kill of ncu alone would leave
    on the GPU."""
    import signal

    # one stream: ncu's Profiling lines and the rows' "ran once" in the order they came
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        timeout = None if deadline is None else max(1.0, deadline - time.time())
        return proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                text = proc.communicate(timeout=5)[0]
                break
            except subprocess.TimeoutExpired:
                text = ""
        return (text or "") + "\ncalibrate: ncu stopped at the deadline\n", CUT_EXIT


# ------------------------------------------------------------------------------ main
# ------------------------------------------------------------------------------ the model, again

def remodel(inputs_path: Path, calibration_path: Path) -> list[dict]:
    """Today's model of the kernels a GPU run profiled, beside that run's counters.

    ``inputs_path`` (model-inputs-<commit>.json, written when the kernels were replaced) holds
    each launch of that commit's kernels as its backend planned it (grid, bytes moved, what the
    pass loop loads) and names the SASS and resource usage of those kernels; the machine code is
    read with today's :mod:`vtok_kernels.machine_code`, so a change of the model is checked
    against a measurement even after the kernels it measured are gone. ``calibration_path`` is
    the ``report --json`` of that run. One entry per launch: the model's time, instructions and
    bound, and ncu's duration and instructions where it profiled the kernel."""
    import gzip

    from vtok_kernels import machine_code as mc

    inputs = json.loads(inputs_path.read_text())
    sass = gzip.decompress((inputs_path.parent / inputs["sass"]).read_bytes()).decode()
    codes = {c.name: c for c in mc.kernel_codes(sass, inputs["res_usage"], "sm_90a")}
    calibration = json.loads(calibration_path.read_text())
    measured_by = {}
    for k in calibration["kernels"]:
        r = k["row"]
        if r["mode"] == "fwd+bwd" and k["measured"]:
            measured_by[(r["impl"], r["op"], k["pass"], k["measured"]["name"])] = k["measured"]
    out, resident = [], {}
    for launch in inputs["launches"]:
        traffic = mc.Traffic(**launch["traffic"])
        seen = resident.setdefault((launch["op"], launch["pass"]), set())
        code = codes.get(launch["kernel"])
        if code is None:  # not profiled: what it leaves in L2 still counts
            seen.update(t for t, b in {**traffic.reads, **traffic.writes}.items() if b <= mc.L2_RESIDENT_BYTES)
            continue
        record = mc.Launch(launch["kernel"], tuple(launch["grid"]), launch["block"], {})
        est = mc.estimate_kernel(record, code, traffic, seen)
        m = measured_by.get(("cuda", launch["op"], launch["pass"], short_name(launch["kernel"])))
        entry = {"op": launch["op"], "pass": launch["pass"], "kernel": short_name(launch["kernel"]),
                 "model_us": est.time_us, "model_instructions": est.instructions, "bound": est.bound,
                 "t_hbm_us": est.t_hbm_us, "t_latency_us": est.t_latency_us, "t_issue_us": est.t_issue_us,
                 "ncu_us": m["seconds"] * 1e6 if m and m["seconds"] else None,
                 "ncu_instructions": m["instructions"] if m else None}
        entry["time_error"] = _ratio(entry["model_us"], entry["ncu_us"]) and entry["model_us"] / entry["ncu_us"] - 1
        entry["instruction_error"] = (_ratio(entry["model_instructions"], entry["ncu_instructions"])
                                      and entry["model_instructions"] / entry["ncu_instructions"] - 1)
        entry["judged"] = entry["ncu_us"] is not None and entry["ncu_us"] >= JUDGED_US
        out.append(entry)
    return out


def remodel_text(entries: Sequence[dict], inputs: str) -> str:
    lines = [f"Today's model of the profiled kernels ({inputs}), beside ncu:",
             f"  {'op':<12}{'pass':<5}{'kernel':<34}{'hbm':>7}{'lat':>7}{'issue':>7}{'model':>7}{'ncu us':>8}"
             f"{'err':>6}{'M ins':>7}{'ncu':>7}{'err':>6}  bound"]
    for e in entries:
        ncu_instructions = _f(e["ncu_instructions"] and e["ncu_instructions"] / 1e6, ".2f")
        lines.append(f"  {e['op']:<12}{e['pass']:<5}{e['kernel'][:33]:<34}{e['t_hbm_us']:>7.1f}"
                     f"{e['t_latency_us']:>7.1f}{e['t_issue_us']:>7.1f}{e['model_us']:>7.1f}{_f(e['ncu_us']):>8}"
                     f"{_pct(e['time_error']):>6}{e['model_instructions'] / 1e6:>7.2f}{ncu_instructions:>7}"
                     f"{_pct(e['instruction_error']):>6}  {e['bound']}")
    judged = [e for e in entries if e["judged"]]
    within = [e for e in judged if abs(e["time_error"]) <= MODEL_TOLERANCE]
    lines.append("  us: the model's bandwidth, latency and issue bounds, its time, ncu's duration; M ins: warp "
                 "instructions, the model's and ncu's")
    lines.append(f"  model within {MODEL_TOLERANCE:.0%} of ncu: {len(within)} of {len(judged)} kernels of "
                 f"{JUDGED_US:.0f} us or more")
    return "\n".join(lines) + "\n"


def build_report(ncu_paths: Sequence[Path], profile_path: Optional[Path], model_path: Path) -> dict:
    model = load_model(model_path)
    kernels, notes, profile = [], [], {}
    if profile_path and profile_path.exists():
        try:
            profile = json.loads(profile_path.read_text())
        except ValueError as exc:
            notes.append(f"{profile_path.name}: not JSON ({exc}): no rows")
    elif profile_path:
        notes.append(f"{profile_path.name}: missing (its job did not run or was stopped)")
    copy = profile.get("copy_bytes_per_s")
    for path in ncu_paths:
        if not path.exists():
            notes.append(f"{path.name}: missing (its job did not run or was stopped)")
            continue
        parsed = parse_ncu(path.read_text(errors="replace"))
        attributed = attribute(parsed)
        for row in attributed:
            if row["missing"]:
                notes.append(f"{path.name}: {row['key']}: profiled but not in the report: {', '.join(row['missing'])}")
            if any(k["seconds"] is None for k in row["kernels"]):
                notes.append(f"{path.name}: {row['key']}: a kernel without a Duration (its sections were not read)")
        if parsed["unclaimed"]:
            notes.append(f"{path.name}: {len(parsed['unclaimed'])} profiled kernels after the last row (cut run)")
        kernels += compare(attributed, model, copy)
    rows = profile_rows(profile, model)
    return {"kernels": kernels, "rows": rows, "designs": faster_design(rows), "notes": notes,
            "copy_bytes_per_s": copy, "device": profile.get("device"), "torch": profile.get("torch")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("ncu", help="ncu over kernel_profile --once (forward+backward rows)")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--deadline", type=float, default=None, help="epoch seconds: ncu is stopped then")
    run.add_argument("profile_args", nargs="*", help="after --: kernel_profile's options (--impl, --preset, ...)")
    rep = sub.add_parser("report", help="the model beside the measurements")
    rep.add_argument("--ncu", type=Path, nargs="*", default=[])
    rep.add_argument("--profile", type=Path, default=None, help="kernel_profile --json output")
    rep.add_argument("--model", type=Path, default=STATIC_MODEL)
    rep.add_argument("--txt", type=Path, default=None)
    rep.add_argument("--json", type=Path, default=None)
    again = sub.add_parser("remodel", help="today's model of a run's kernels (model-inputs-<commit>.json)")
    again.add_argument("--inputs", type=Path, required=True)
    again.add_argument("--calibration", type=Path, required=True, help="that run's report --json")
    again.add_argument("--txt", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "remodel":
        text = remodel_text(remodel(args.inputs, args.calibration), args.inputs.name)
        print(text, end="")
        if args.txt:
            args.txt.write_text(text)
        return 0
    if args.command == "ncu":
        code = run_ncu(args.out, args.profile_args, deadline=args.deadline)
        print(args.out.read_text()[-4000:])
        return code
    report = build_report(args.ncu, args.profile, args.model)
    model = str(args.model.resolve().relative_to(ROOT)) if args.model.resolve().is_relative_to(ROOT) else str(args.model)
    text = report_text(report["kernels"], report["rows"], report["designs"], report["notes"], model)
    print(text, end="")
    if args.txt:
        args.txt.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
