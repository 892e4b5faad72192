"""The GPU proof: everything the CPU cannot prove, in short stages that fit one call each.

    bash benchmarks/gpu_proof.sh OUTDIR quick          # <= 5 minutes from a fresh checkout
    bash benchmarks/gpu_proof.sh OUTDIR full:tests     # one stage of the rest, <= 9 minutes
    bash benchmarks/gpu_proof.sh OUTDIR full:profile   # where the time goes, against the model
    bash benchmarks/gpu_proof.sh OUTDIR full           # every full stage back to back (more
                                                       # than one call holds: a machine to spare)
    bash benchmarks/gpu_proof.sh OUTDIR quick --plan   # what would run, and its time budget

A stage is a set of jobs, each a command with a log, a deadline (seconds from the stage's
start) and the jobs it waits for; jobs that do not wait for each other run at the same time (the
GPU machine has 16 cores: Triton and NVRTC compile while nvcc builds the extension; the
benchmarks run alone). A job past its deadline is stopped and reported as such, so a stage ends
on time and says what it proved. ``quick`` proves, in this order: parity of every op x backend x
dtype x pass, a seeded differential fuzz, no host sync, CUDA-graph replay, the two CUDA loaders'
bits, memcheck and racecheck, then the headline benchmark rows.

OUTDIR receives at most 8 files (all a GPU call brings back): ``summary.txt`` (one screen, also
printed last), ``proof.json`` (every job and every check line), ``machine.txt``, ``logs.tar.gz``
(every log), and ``bench.json`` (the stage's pytest-benchmark rows, for ``benchmarks.records``)
where the stage benchmarks; ``full:profile`` adds ``calibration.txt`` and ``calibration.json``
(``benchmarks.calibrate``: each kernel's model estimate beside what ncu measured, the rows' host
time through the eager path and the ops, which CUDA forward design is faster). They are rewritten
after every job, so a run killed from outside still leaves what it had proved.

Without a GPU, ``--rehearse`` runs the same scheduler, files and summary on the CPU (the cpu
backend and Triton's interpreter, tiny benchmark rows; no build, no sanitizer): CI runs it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8
QUICK_BUDGET_S = 300
FULL_STAGE_BUDGET_S = 540
STAGES = ("quick", "full:profile", "full:tests", "full:sanitize", "full:bench-encode", "full:bench-other",
          "full:bench-compiled")
FULL_STAGES = tuple(s for s in STAGES if s.startswith("full:"))
STATIC_MODEL = ROOT / "benchmarks" / "results" / "static-model.json"
BASELINES = ("reference", "compile", "naive", "compile-naive")
BENCH_ROWS = "bench-rows.jsonl"


# ------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    """One command of a stage. ``after``: jobs that must have ended before it starts;
    ``deadline_s``: when it is stopped, in seconds from the stage's start; ``kind`` tells the
    summary how to read its outputs."""

    name: str
    command: list
    deadline_s: float
    after: tuple = ()
    kind: str = "command"  # build | checks | sanitize | bench | command
    env: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # role -> path in the work folder
    skip: Optional[str] = None  # why it does not run here
    optional: bool = False  # its failure or absence does not count against the stage
    # stopped at its deadline, it still leaves every result it had (streamed lines): the stage
    # is INCOMPLETE rather than FAIL
    partial_ok: bool = False
    returns: tuple = ()  # files of the work folder that come back in OUTDIR, when it writes them


@dataclass
class Machine:
    """What the stage is planned for: a GPU of compute capability ``arch`` (e.g. "90a"), or the
    CPU rehearsal."""

    gpu: bool
    arch: str = ""
    python: str = sys.executable
    jobs: int = os.cpu_count() or 2
    seed: int = 0
    sanitizer: Optional[str] = None
    ncu: Optional[str] = None
    extension_ready: bool = False
    # Triton compiles one kernel per new specialisation, single-threaded: its parity and fuzz
    # cases are split over this many processes. Three took 133-161 s of the 195 s on an H100
    # (2026-11-27), the first, which also runs nosync and graphs, leaving 3 fuzz cases unrun.
    triton_shards: int = 4


def _py(*args: str) -> list:
    return ["{python}", *args]


def _checks_job(backend: str, machine: Machine, deadline: float, after=(), fuzz_cases: int = 300,
                parity: str = "presets,odd", shard: tuple = (0, 1)) -> Job:
    k, n = shard
    name = f"checks:{backend}" + (f":{k}" if n > 1 else "")
    jsonl = name.replace(":", "-") + ".jsonl"
    checks = "parity,fuzz,nosync,graphs" + (",loaders" if backend.startswith("cuda:extension") else "")
    profile = [] if machine.gpu else ["--profile", "small", "--device", "cpu"]
    command = _py("-m", "benchmarks.proof_checks", "--backend", backend, "--checks", checks,
                  "--parity", parity, "--fuzz-cases", str(fuzz_cases), "--seed", str(machine.seed),
                  "--shard", f"{k}/{n}", "--deadline", "{deadline}", "--jsonl", "{work}/" + jsonl, *profile)
    # correctness does not need the fastest config: a benchmark per config and new shape would
    # cost the fuzz most of its time (every config is checked by the GPU tests of full:tests)
    return Job(name, command, deadline, after, "checks", env={"VTOK_TRITON_AUTOTUNE": "0"},
               outputs={"jsonl": jsonl}, partial_ok=True)


def _sanitize_job(tool: str, loader: str, machine: Machine, deadline: float, after=()) -> Job:
    log = f"sanitize-{tool}-{loader}.log"
    job = Job(f"{tool}:{loader}", [machine.sanitizer or "compute-sanitizer", "--tool", tool,
                                    "--error-exitcode", "1", "--print-limit", "50", "--log-file",
                                    "{work}/" + log, *_py("-m", "benchmarks.sanitize_driver", "--loader", loader)],
              deadline, after, "sanitize", outputs={"log": log}, partial_ok=True)
    if not machine.gpu:
        job.skip, job.optional = "no GPU (rehearsal)", True
    elif machine.sanitizer is None:
        job.skip = "compute-sanitizer not found (CUDA toolkit, or pip install nvidia-cuda-sanitizer-api)"
    return job


def _bench_job(name: str, machine: Machine, deadline: float, after, select: str, scale: str) -> Job:
    json_name = f"bench-{name}.json"
    if machine.gpu:
        marker, scale_args = "gpu", ["--bench-scale", scale]
    else:
        marker, scale_args = "not gpu", ["--bench-scale", "tiny"]
        select = "encode-attn and not compile and not torch"
    command = _py("-m", "pytest", "benchmarks/test_bench_vtok.py", "-m", marker, "--benchmark-only", "-q",
                  "-p", "no:cacheprovider", *scale_args, "-k", select, "--benchmark-json",
                  "{work}/" + json_name)
    return Job(name, command, deadline, after, "bench", env={"VTOK_BENCH_ROWS": "{work}/" + BENCH_ROWS},
               outputs={"json": json_name}, partial_ok=True)


def _host_job(machine: Machine, deadline: float, after) -> Job:
    """benchmarks/test_bench_host.py: the host time of one call through the API's eager path and
    through the torch.library ops, where a small GPU row spends most of its time."""
    marker = "gpu" if machine.gpu else "not gpu"
    command = _py("-m", "pytest", "benchmarks/test_bench_host.py", "-m", marker, "--benchmark-only", "-q",
                  "-p", "no:cacheprovider", "--benchmark-json", "{work}/bench-host.json")
    return Job("host", command, deadline, after, "bench", env={"VTOK_TRITON_AUTOTUNE": "0"},
               outputs={"json": "bench-host.json"}, partial_ok=True)


def _warm_job(machine: Machine, deadline: float) -> Job:
    """Runs the headline Triton rows and the compiled baselines once (--benchmark-disable) while
    the checks run: every autotune config and inductor's graphs land in the on-disk caches, so
    the timed jobs after the checks spend their minute measuring, not compiling."""
    job = Job("warm-up", _py("-m", "pytest", "benchmarks/test_bench_vtok.py", "-m", "gpu", "-q", "-p",
                             "no:cacheprovider", "--bench-scale", "headline", "-k", "triton or compile-naive",
                             "--benchmark-disable"), deadline, optional=True)
    if not machine.gpu:
        job.skip = "no GPU (rehearsal)"
    return job


def _build_job(machine: Machine) -> Job:
    """The offline editable install for the GPU's arch, then a check that it holds CUDA code for
    that arch: setup.py falls back to a CPU-only build rather than fail, so pip's exit status
    alone does not say."""
    install = ("{python} -m pip install --no-build-isolation --no-deps --no-index -v -e . && "
               f"{{python}} -m benchmarks.proof --check-extension {machine.arch}")
    build = Job("build", ["bash", "-c", install], 150, kind="build",
                env={"VTOK_CUDA_ARCHS": machine.arch, "MAX_JOBS": str(max(2, machine.jobs - 6)),
                     "VTOK_REQUIRE_EXTENSION": "1"})
    if not machine.gpu:
        build.skip, build.optional = "no GPU (rehearsal): the installed extension is used", True
    elif machine.extension_ready:
        build.skip, build.optional = f"vtok_kernels._C already holds CUDA code for sm_{machine.arch}", True
    return build


# The rows full:profile measures: the headline presets at the GPU scale's 16 frames (the static
# model's shape, benchmarks/results/static-model.json).
PROFILE_ROWS = ("--preset", "clip", "--preset", "siglip", "--frames", "16")
PROFILE_IMPLS = ("cuda", "cuda-warps", "triton")


def _profile_jobs(machine: Machine, after: tuple) -> list[Job]:
    """kernel_profile over the rows (events, graph, host through both paths, kernels), then ncu
    over them one backend per process (ncu prints its report when its process ends: a cut run
    loses one backend's), then the calibration report of both against the static model."""
    profile = Job("profile", _py("-m", "benchmarks.kernel_profile", *PROFILE_ROWS, "--host-ops",
                                 "--json", "{work}/kernel-profile.json"),
                  240, after, "profile", env={"VTOK_TRITON_AUTOTUNE": "0"},
                  outputs={"json": "kernel-profile.json"}, partial_ok=True)
    jobs, last = [profile], "profile"
    for index, impl in enumerate(PROFILE_IMPLS):
        log = f"ncu-{impl}.txt"
        job = Job(f"ncu:{impl}", _py("-m", "benchmarks.calibrate", "ncu", "--out", "{work}/" + log,
                                     "--deadline", "{deadline}", "--", "--impl", impl, *PROFILE_ROWS),
                  330 + 75 * index, (last,), "profile", env={"VTOK_TRITON_AUTOTUNE": "0"},
                  outputs={"log": log}, partial_ok=True)
        if machine.gpu and machine.ncu is None:
            job.skip = "ncu not found (Nsight Compute, part of the CUDA toolkit)"
        jobs.append(job)
        last = job.name
    report = Job("calibration", _py("-m", "benchmarks.calibrate", "report", "--ncu",
                                    *["{work}/" + j.outputs["log"] for j in jobs[1:]],
                                    "--profile", "{work}/kernel-profile.json", "--txt", "{work}/calibration.txt",
                                    "--json", "{work}/calibration.json"),
                 525, tuple(j.name for j in jobs), "calibration",
                 outputs={"txt": "calibration.txt", "json": "calibration.json"},
                 returns=("calibration.txt", "calibration.json"))
    if not machine.gpu:
        for job in jobs:
            job.skip, job.optional = "no GPU (rehearsal)", True
    return jobs + [report]


def plan(stage: str, machine: Machine) -> list[Job]:
    """The jobs of ``stage`` on ``machine``, in the order the summary lists them."""
    build = _build_job(machine)
    if stage == "quick":
        if machine.gpu:
            workers = [("triton", (k, machine.triton_shards)) for k in range(machine.triton_shards)]
            # the warp-split forward beside the default, so that one window compares the two
            workers += [("cuda:cupy-nvrtc", (0, 1)), ("cuda:extension", (0, 1)), ("cuda:extension:warps", (0, 1))]
            fuzz_cases, parity = 300, "presets,odd"
        else:
            # two Triton shards, so that the rehearsal splits cases as the GPU run does
            workers = [("triton", (0, 2)), ("triton", (1, 2)), ("cpu", (0, 1))]
            fuzz_cases, parity = 12, "odd"
        # Triton and NVRTC compile while nvcc builds; only the extension's checks wait for it
        checks = [_checks_job(backend, machine, 195, ("build",) if backend.startswith("cuda:extension") else (),
                              fuzz_cases, parity, shard) for backend, shard in workers]
        sanitize = [_sanitize_job(tool, "extension", machine, 195, ("build",))
                    for tool in ("memcheck", "racecheck")]
        warm = _warm_job(machine, 195)
        warm.after = ("build",)  # its compiles would slow nvcc's; after the build it has 16 cores
        gate = tuple(j.name for j in [build] + checks + sanitize + [warm])
        bench = _bench_job("kernels", machine, 250, gate, "not compile", "headline")
        compiled = _bench_job("compiled", machine, 285, gate + ("kernels",), "compile-naive", "headline")
        compiled.optional = True  # torch.compile's rows: the baseline, not the proof
        if not machine.gpu:
            compiled.skip = "no GPU (rehearsal): the tiny scale compiles nothing"
        return [build] + checks + sanitize + [warm, bench, compiled]
    if stage == "full:profile":
        return [build] + _profile_jobs(machine, ("build",))
    if stage == "full:tests":
        tests = Job("tests", _py("-m", "pytest", "tests", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                 "--junitxml", "{work}/tests.xml"), 420, ("build",), outputs={"xml": "tests.xml"})
        nvrtc = Job("tests:cupy-nvrtc", _py("-m", "pytest", "tests/test_cuda_backend.py", "tests/test_parity.py",
                                            "-m", "gpu or not gpu", "-k", "cuda", "-q", "-p", "no:cacheprovider"),
                    525, ("tests",), env={"VTOK_CUDA_LOADER": "cupy-nvrtc"})
        if not machine.gpu:
            tests.skip = nvrtc.skip = "no GPU"
        return [build, tests, nvrtc]
    if stage == "full:sanitize":
        jobs = [build]
        for loader in ("cupy-nvrtc", "extension"):
            tools = ("memcheck", "racecheck", "synccheck", "initcheck") if loader == "cupy-nvrtc" \
                else ("synccheck", "initcheck")
            jobs += [_sanitize_job(tool, loader, machine, 525, ("build",)) for tool in tools]
        return jobs
    if stage in ("full:bench-encode", "full:bench-other", "full:bench-compiled"):
        select = {"full:bench-encode": "(encode-mean or encode-attn) and not compile",
                  "full:bench-other": "(encode_varlen or expand) and not compile",
                  "full:bench-compiled": "compile"}[stage]
        name = stage.split(":")[1]
        # bench-other's rows take the least time: the host rows go first there
        host = [_host_job(machine, 240, ("build",))] if stage == "full:bench-other" else []
        bench = _bench_job(name, machine, 480, ("build",) + tuple(j.name for j in host), select, "gpu")
        inputs = ["{work}/" + job.outputs["json"] for job in host + [bench]]
        # a benchmark job stopped at its deadline writes no JSON: the records of the others still count
        records = Job("records", _py("-m", "benchmarks.records", *inputs, "--results", "{work}/results",
                                     "--no-selection", "--missing-ok"), 505, (name,))
        economy = Job("token-economy", _py("-m", "benchmarks.token_economy", "--device",
                                           "cuda" if machine.gpu else "cpu", "--out", "{work}/results"),
                      525, ("records",), optional=True)
        return [build] + host + [bench, records, economy]
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES} or 'full'")


def stage_budget(stage: str) -> int:
    return QUICK_BUDGET_S if stage == "quick" else FULL_STAGE_BUDGET_S


def format_plan(stage: str, jobs: list[Job], machine: Machine) -> str:
    lines = [f"gpu_proof {stage}: {len(jobs)} jobs, done within {stage_budget(stage)} s "
             f"({'GPU sm_' + machine.arch if machine.gpu else 'CPU rehearsal'})"]
    for index, job in enumerate(jobs):
        earlier = [j.name for j in jobs[:index]]
        if not job.after:
            waits = "the start"
        elif len(job.after) > 2 and set(job.after) == set(earlier):
            waits = "every job above"
        else:
            waits = ", ".join(job.after)
        status = f"  [skipped: {job.skip}]" if job.skip else ""
        lines.append(f"  {job.name:<22} after {waits:<40} ends by {job.deadline_s:>4.0f} s{status}")
        command = " ".join(shlex.quote(c) for c in job.command)
        env = " ".join(f"{k}={v}" for k, v in job.env.items())
        lines.append(f"      {env + ' ' if env else ''}{command}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ running
@dataclass
class Outcome:
    name: str
    status: str  # ok | FAIL | timeout | skipped | not-run
    seconds: float = 0.0
    returncode: Optional[int] = None
    detail: str = ""
    started_s: float = 0.0


# Seconds a job's own deadline (--deadline) comes before the scheduler's: its results are
# written and it has exited before it would be stopped.
JOB_MARGIN_S = 10
# The exit status of a job that stopped itself at its --deadline (benchmarks.calibrate ncu).
CUT_EXIT = 124


def _substitute(command: list, python: str, work: Path, deadline_epoch: float) -> list:
    return [c.replace("{python}", python).replace("{work}", str(work)).replace("{deadline}", f"{deadline_epoch:.0f}")
            for c in command]


def run_jobs(jobs: list[Job], machine: Machine, work: Path, on_change: Callable[[dict], None],
             clock: Callable[[], float] = time.monotonic, poll_s: float = 0.5) -> dict:
    """Starts each job once everything it waits for has ended, stops it at its deadline, and
    calls ``on_change(outcomes)`` whenever a job ends."""
    start, epoch = clock(), time.time()
    outcomes = {job.name: Outcome(job.name, "not-run") for job in jobs}
    running: dict[str, tuple[Job, subprocess.Popen, object, float]] = {}
    ended: set = set()
    for job in jobs:
        if job.skip:
            outcomes[job.name] = Outcome(job.name, "skipped", detail=job.skip)
            ended.add(job.name)
    pending = [j for j in jobs if not j.skip]
    on_change(outcomes)
    while pending or running:
        now = clock() - start
        for job in list(pending):
            if not all(dep in ended for dep in job.after):
                continue
            pending.remove(job)
            if job.deadline_s - now < 5:
                outcomes[job.name] = Outcome(job.name, "not-run", detail=f"no time left ({now:.0f} s in)")
                ended.add(job.name)
                continue
            log = open(work / f"{job.name.replace(':', '-')}.log", "w")
            env = dict(os.environ, PYTHONUNBUFFERED="1",
                       **{k: v.replace("{work}", str(work)) for k, v in job.env.items()})
            if not machine.gpu:
                env.setdefault("TRITON_INTERPRET", "1")
            command = _substitute(job.command, machine.python, work, epoch + job.deadline_s - JOB_MARGIN_S)
            log.write(f"$ {' '.join(shlex.quote(c) for c in command)}\n")
            log.flush()
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            running[job.name] = (job, proc, log, now)
        now = clock() - start
        overdue = [name for name, (job, proc, _, _) in running.items()
                   if proc.poll() is None and now >= job.deadline_s]
        _stop([running[name][1] for name in overdue])
        finished = False
        for name, (job, proc, log, started) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            log.close()
            # 124 (as timeout(1) exits): a job that stopped itself at its own deadline
            cut = name in overdue or (code == CUT_EXIT and job.partial_ok)
            status = "timeout" if cut else "ok" if code == 0 else "FAIL"
            outcomes[name] = Outcome(name, status, round(clock() - start - started, 1), code,
                                     started_s=round(started, 1))
            del running[name]
            ended.add(name)
            finished = True
        if finished:
            on_change(outcomes)
        time.sleep(poll_s)
    return outcomes


def _stop(procs: list) -> None:
    """SIGTERM to every overdue job's process group at once, SIGKILL to those still there 5 s
    later: jobs stopped at one deadline cost 5 s, not 5 s each."""
    if not procs:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        waited = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(max(0.0, waited - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        procs = [p for p in procs if p.poll() is None]
        if not procs:
            return


# ------------------------------------------------------------------------------------ reading results
def read_checks(path: Path) -> list[dict]:
    """The JSON lines of a file (a check log, the benchmark rows); a line cut short is skipped."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def summarize_checks(lines: list[dict]) -> dict:
    """Per check: passed, failed, planned (how many results the worker owed) and the first
    failures (with reproducers)."""
    out: dict = {}

    def entry(check: str) -> dict:
        return out.setdefault(check, {"passed": 0, "failed": 0, "planned": None, "failures": []})

    for line in lines:
        if line["check"] == "planned":
            entry(line["for"])["planned"] = line["count"]
            continue
        item = entry(line["check"])
        item["passed" if line["ok"] else "failed"] += 1
        if not line["ok"] and len(item["failures"]) < 5:
            item["failures"].append({k: line.get(k) for k in ("describe", "message", "repro")})
    return out


def short_counts(name: str, check: dict) -> str:
    """'fuzz 140/300' when 140 of 300 planned results came (all passed), '... 2 failed' else."""
    ran = check["passed"] + check["failed"]
    text = f"{name} {ran}/{check['planned']}" if check.get("planned") is not None else f"{name} {ran}"
    return text + (f" ({check['failed']} failed)" if check["failed"] else "")


def incomplete_checks(checks: dict) -> list[str]:
    return [name for name, c in checks.items()
            if c.get("planned") is not None and c["passed"] + c["failed"] < c["planned"]]


def sanitizer_detail(log_text: str) -> tuple[str, int]:
    """What a compute-sanitizer log says, and its error count (-1 when it has no summary)."""
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", log_text)
    # racecheck sums up its hazards on a line of its own; warnings do not change the exit code
    races = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log_text)
    cases = re.findall(r"(\d+) cases ran", log_text) or [
        f"cut after {done[-1]}" for done in [re.findall(r"case (\d+) done", log_text)] if done]
    parts, count = [], -1
    if errors:
        count = int(errors[-1])
        parts.append(f"{errors[-1]} errors")
    if races:
        hazards, race_errors, warnings = races[-1]
        count = max(count, 0) + int(race_errors)
        parts.append(f"{race_errors} race errors, {warnings} race warnings")
    if cases:
        parts.append(f"{cases[-1]} cases")
    first = next((line.strip("= ").strip() for line in log_text.splitlines()
                  if line.startswith("=========") and ("Error" in line or "Invalid" in line or "Race" in line)
                  and "SUMMARY" not in line), "")
    if first:
        parts.append(f"first: {first[:80]}")
    return ", ".join(parts) or "no ERROR SUMMARY in the log", count


def load_model(path: Path = STATIC_MODEL) -> dict:
    """The static model's predicted GB/s per (impl, op, mode, preset, dtype), if a record exists."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {(r["impl"], r["op"], r["mode"], r["preset"], r["dtype"]): r for r in data.get("rows", [])}


def bench_rows(lines: list[dict], model: dict) -> list[dict]:
    """The suite's rows (``VTOK_BENCH_ROWS`` lines) with the model's prediction beside each."""
    rows = []
    for info in lines:
        key = (info["impl"], info["op"], info["mode"], info["preset"], info["dtype"])
        predicted = model.get(key, {}).get("predicted_gb_per_s")
        rows.append({"impl": info["impl"], "op": info["op"], "mode": info["mode"], "preset": info["preset"],
                     "dtype": info["dtype"], "batch": info.get("batch"), "frames": info.get("frames"),
                     "median_ms": info["median_s"] * 1e3, "gb_per_s": info.get("gb_per_s"),
                     "roofline": info.get("roofline_fraction"), "copy_gb_per_s": info.get("copy_gb_per_s"),
                     "model_gb_per_s": predicted})
    return rows


def merge_bench(parts: list[dict]) -> Optional[dict]:
    """One pytest-benchmark JSON from the stage's runs (machine_info of the first)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    merged = dict(parts[0])
    merged["benchmarks"] = [b for p in parts for b in p.get("benchmarks", [])]
    return merged


# ------------------------------------------------------------------------------------ the summary
def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: Optional[float], fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def summary_text(proof: dict, width: int = 100) -> str:
    """One screen: the machine, each job's status, failures with reproducers, the benchmark
    rows beside the model and the baselines."""
    m = proof.get("machine", {})
    lines = [f"gpu_proof {proof['stage']}: {proof['verdict']} in {proof.get('seconds', 0):.0f} s "
             f"(budget {proof.get('budget_s')} s) | {m.get('gpu', 'no GPU')} | commit {m.get('commit', '?')[:10]}",
             f"  torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, cupy {m.get('cupy', '-')}, "
             f"driver {m.get('driver', '-')}, {m.get('date', '')}"]
    for job in proof["jobs"]:
        detail = job.get("detail", "")
        lines.append(f"  {job['name']:<22} {job['status']:<8} {job.get('seconds', 0):>5.0f} s  {detail}"[:width])
    failures = [(job["name"], f) for job in proof["jobs"] for check in job.get("checks", {}).values()
                for f in check.get("failures", [])]
    if failures:
        lines.append(f"failures ({len(failures)} shown, all in proof.json):")
        for name, failure in failures[:6]:
            lines.append(f"  {name}: {failure['describe']}: {failure['message']}"[:width])
            if failure.get("repro"):
                lines.append(f"    {failure['repro']}")
    rows = proof.get("bench", [])
    if rows:
        lines.append("benchmarks (median; GPU: CUDA events, L2 flushed; roof = GB/s over this run's copy bandwidth):")
        lines.append(f"  {'op':<12}{'mode':<8}{'preset':<8}{'impl':<14}{'ms':>8}{'GB/s':>8}{'roof':>6}"
                     f"{'model':>7}{'x eager':>8}{'x comp':>7}")
        base = {}
        for r in rows:
            base[(r["op"], r["mode"], r["preset"], r["impl"])] = r["median_ms"]
        for r in rows:
            if r["impl"] in BASELINES:
                continue
            eager = base.get((r["op"], r["mode"], r["preset"], "reference")) or \
                base.get((r["op"], r["mode"], r["preset"], "naive"))
            compiled = base.get((r["op"], r["mode"], r["preset"], "compile-naive")) or \
                base.get((r["op"], r["mode"], r["preset"], "compile"))
            lines.append(
                f"  {r['op']:<12}{r['mode']:<8}{r['preset']:<8}{r['impl']:<14}{r['median_ms']:>8.3f}"
                f"{_num(r['gb_per_s']):>8}{_pct(r['roofline']):>6}{_num(r['model_gb_per_s']):>7}"
                f"{_num(eager / r['median_ms'] if eager else None, '.1f'):>8}"
                f"{_num(compiled / r['median_ms'] if compiled else None, '.1f'):>7}")
        copy = next((r["copy_gb_per_s"] for r in rows if r.get("copy_gb_per_s")), None)
        lines.append(f"  copy bandwidth {_num(copy)} GB/s; model: "
                     f"{'benchmarks/results/static-model.json' if any(r['model_gb_per_s'] for r in rows) else 'no static-model record yet'}")
    lines += calibration_summary(proof.get("calibration", ""))
    lines.append(f"files: {', '.join(proof.get('files', []))}")
    return "\n".join(lines)


def calibration_summary(text: str, most: int = 45) -> list[str]:
    """The calibration report's verdict on the model, the CUDA forward designs and the rows
    (its per-kernel table stays in calibration.txt): at most ``most`` lines."""
    if not text:
        return []
    lines = text.splitlines()
    keep = [line for line in lines if line.startswith("  model within")]
    designs = next((i for i, line in enumerate(lines) if line.startswith("CUDA forward designs")), None)
    rows = next((i for i, line in enumerate(lines) if line.startswith("Rows,")), len(lines))
    if designs is not None:
        keep += [line for line in lines[designs:] if line.startswith(("CUDA forward", "  encode"))]
    keep += lines[rows:designs if designs is not None and designs > rows else len(lines)]
    return ["calibration (calibration.txt has every kernel):"] + [line[:100] for line in keep[:most - 1]]


def verdict(jobs: list[dict]) -> str:
    """PASS: everything ran and passed. FAIL (names): something failed. INCOMPLETE (names):
    nothing failed, but something did not finish or did not run where it should have."""
    failed, incomplete = [], []
    for job in jobs:
        checks = job.get("checks", {})
        if any(c.get("failed") for c in checks.values()) or job.get("sanitizer_errors", 0) > 0:
            failed.append(job["name"])
        elif job["status"] == "FAIL" and not job.get("optional"):
            failed.append(job["name"])
        elif job["status"] == "timeout" and not (job.get("partial_ok") or job.get("optional")):
            failed.append(job["name"])
        elif job.get("optional"):
            continue
        elif job["status"] in ("timeout", "not-run", "skipped") or job.get("incomplete"):
            incomplete.append(job["name"])
    if failed:
        return "FAIL (" + ", ".join(failed) + ")"
    if incomplete:
        return "INCOMPLETE (" + ", ".join(incomplete) + ")"
    return "PASS"


# ------------------------------------------------------------------------------------ one stage
def _machine_facts(python: str) -> dict:
    code = r"""
import json, platform, subprocess, torch
facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
import os, sysconfig
facts["python_h"] = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
try:
    import pip; facts["pip"] = pip.__version__
except Exception: facts["pip"] = None
try:
    import triton; facts["triton"] = triton.__version__
except Exception as e: facts["triton"] = f"unavailable ({type(e).__name__})"
try:
    import cupy; facts["cupy"] = cupy.__version__
except Exception: facts["cupy"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(facts))
"""
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        facts = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # the summary says what could not be read
        facts = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        facts["driver"] = None
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=10).stdout.strip() or "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        facts["commit"] = "not a git checkout"
    facts["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return facts


def gpu_arch() -> Optional[str]:
    """The arch to build for, from the GPU present: "90a" on Hopper (the arch the kernels are
    tuned for), "XY" otherwise; None without a GPU."""
    capability = ""
    for command in (["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                    [os.environ.get("PYTHON") or sys.executable, "-c",
                     "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() "
                     "else None; print(f'{c[0]}.{c[1]}' if c else '')"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            capability = out.stdout.strip().splitlines()[0].strip()
            break
    if not re.fullmatch(r"\d+\.\d+", capability):
        return None
    major, _, minor = capability.partition(".")
    arch = f"{major}{minor}"
    return arch + "a" if arch == "90" else arch


def find_ncu() -> Optional[str]:
    from benchmarks import calibrate

    return calibrate.find_ncu()


def find_sanitizer() -> Optional[str]:
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                      "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


_EXTENSION_CHECK = """
import json, sys
from vtok_kernels import _extension
module, arch = _extension.get(), sys.argv[1]
archs = [a.strip() for a in str(getattr(module, "cuda_archs", "")).split(",") if a.strip()]
ok = module is not None and bool(getattr(module, "built_with_cuda", False)) and arch in archs
if not ok and "--report" in sys.argv:
    print(f"vtok_kernels._C: {'missing' if module is None else 'archs ' + repr(archs)}; wanted CUDA code for {arch}")
    print(json.dumps(_extension.build_status(), indent=1))
sys.exit(0 if ok else 1)
"""


def extension_ready(python: str, arch: str, report: bool = False) -> bool:
    """Whether ``vtok_kernels._C`` (as this checkout imports it) holds CUDA code for ``arch``."""
    try:
        return subprocess.run([python, "-c", _EXTENSION_CHECK, arch] + (["--report"] if report else []),
                              cwd=ROOT, capture_output=not report, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _detail(job: Job, outcome: Outcome, work: Path) -> dict:
    """The job's outcome as proof.json keeps it, with what its outputs say."""
    entry = {"name": job.name, "status": outcome.status, "seconds": outcome.seconds,
             "started_s": outcome.started_s, "returncode": outcome.returncode,
             "optional": job.optional, "partial_ok": job.partial_ok, "detail": outcome.detail}
    log = work / f"{job.name.replace(':', '-')}.log"
    if job.kind == "checks" and "jsonl" in job.outputs:
        checks = summarize_checks(read_checks(work / job.outputs["jsonl"]))
        entry["checks"] = checks
        entry["incomplete"] = incomplete_checks(checks)
        entry["detail"] = " ".join(short_counts(name, c) for name, c in checks.items()
                                   if name != "available") or entry["detail"]
        unavailable = checks.get("available", {}).get("failures")
        if unavailable:
            entry["detail"] = f"unavailable: {unavailable[0]['message']}"
    elif job.kind == "sanitize" and outcome.status != "skipped":
        text = (work / job.outputs["log"]).read_text(errors="replace") if (work / job.outputs["log"]).exists() else ""
        text += log.read_text(errors="replace") if log.exists() else ""
        entry["detail"], entry["sanitizer_errors"] = sanitizer_detail(text)
    elif job.kind == "bench" and outcome.status != "skipped":
        path = work / job.outputs["json"]
        if path.exists():
            entry["detail"] = f"{len(json.loads(path.read_text()).get('benchmarks', []))} rows"
        else:
            entry["detail"] = "no pytest-benchmark JSON (rows measured before the stop are in proof.json)"
    elif outcome.status in ("FAIL", "timeout") and log.exists():
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        entry["detail"] = (tail[0] if tail else "")[:160]
    if outcome.status == "timeout":
        entry["detail"] = f"stopped at its deadline ({job.deadline_s:.0f} s); " + entry["detail"]
    return entry


def run_stage(stage: str, outdir: Path, machine: Machine, python: str) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"vtok-proof-{stage.replace(':', '-')}-"))
    started = time.monotonic()
    facts = _machine_facts(python)
    (outdir / "machine.txt").write_text(_machine_text(facts))
    jobs = plan(stage, machine)
    (work / "plan.txt").write_text(format_plan(stage, jobs, machine) + "\n")
    model = load_model()
    by_name = {job.name: job for job in jobs}
    proof: dict = {"stage": stage, "machine": facts, "budget_s": stage_budget(stage), "seed": machine.seed}

    def write(outcomes: dict) -> None:
        proof["jobs"] = [_detail(by_name[name], outcome, work) for name, outcome in outcomes.items()]
        parts = []
        for job in jobs:
            if job.kind == "bench" and (work / job.outputs["json"]).exists():
                try:
                    parts.append(json.loads((work / job.outputs["json"]).read_text()))
                except ValueError:
                    pass
        merged = merge_bench(parts)
        proof["bench"] = bench_rows(read_checks(work / BENCH_ROWS), model)
        proof["seconds"] = round(time.monotonic() - started, 1)
        proof["verdict"] = verdict(proof["jobs"])
        files = ["summary.txt", "proof.json", "machine.txt", "logs.tar.gz"] + (["bench.json"] if merged else [])
        for name in (n for job in jobs for n in job.returns if (work / n).exists()):
            shutil.copyfile(work / name, outdir / name)
            files.append(name)
        for job in (j for j in jobs if j.kind == "calibration" and (work / j.outputs["txt"]).exists()):
            proof["calibration"] = (work / job.outputs["txt"]).read_text(errors="replace")
        proof["files"] = files
        if merged:
            (outdir / "bench.json").write_text(json.dumps(merged))
        _archive(work, outdir / "logs.tar.gz")
        (outdir / "proof.json").write_text(json.dumps(proof, indent=1))
        (outdir / "summary.txt").write_text(summary_text(proof) + "\n")

    outcomes = run_jobs(jobs, machine, work, write)
    write(outcomes)
    shutil.rmtree(work, ignore_errors=True)
    return proof


def _machine_text(facts: dict) -> str:
    text = "\n".join(f"{k}: {v}" for k, v in facts.items()) + "\n"
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        text += "\n" + smi.stdout
    except (OSError, subprocess.SubprocessError):
        text += "\nnvidia-smi: not found\n"
    return text


def _archive(work: Path, target: Path) -> None:
    """Every log and result of the stage in one archive (one of the few files that come back)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(work)))
    target.write_bytes(buffer.getvalue())


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_proof", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, nargs="?", default=None)
    parser.add_argument("stage", nargs="?", default="quick", help=f"one of {STAGES} or 'full'")
    parser.add_argument("--plan", action="store_true", help="print the jobs and their deadlines, run nothing")
    parser.add_argument("--rehearse", action="store_true", help="run the stage on the CPU (no GPU needed)")
    parser.add_argument("--seed", type=int, default=None, help="fuzz seed (default: from the clock)")
    parser.add_argument("--check-extension", metavar="ARCH", default=None,
                        help="exit 0 when vtok_kernels._C holds CUDA code for ARCH (e.g. 90a), else say why")
    args = parser.parse_args(argv)
    if args.check_extension:
        return 0 if extension_ready(os.environ.get("PYTHON") or sys.executable, args.check_extension, True) else 1
    if args.outdir is None:
        parser.error("OUTDIR is required")
    stages = FULL_STAGES if args.stage == "full" else (args.stage,)
    for stage in stages:
        if stage not in STAGES:
            parser.error(f"unknown stage {stage!r}; expected one of {STAGES} or 'full'")
    python = os.environ.get("PYTHON") or sys.executable
    arch = None if args.rehearse else gpu_arch()
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    machine = Machine(gpu=arch is not None, arch=arch or "", python=python, seed=seed,
                      sanitizer=find_sanitizer() if arch else None, ncu=find_ncu() if arch else None)
    if args.plan:
        if not machine.gpu and not args.rehearse:
            # planned as for the Hopper machines the proof is meant for
            machine.arch, machine.gpu, machine.jobs = "90a", True, 16
            machine.sanitizer, machine.ncu = "compute-sanitizer", "ncu"
        for stage in stages:
            print(format_plan(stage, plan(stage, machine), machine))
        return 0
    if not machine.gpu and not args.rehearse:
        print("gpu_proof: no NVIDIA GPU on this machine (nvidia-smi lists none): nothing here can be "
              "proven; --plan shows the jobs, --rehearse runs them on the CPU", file=sys.stderr)
        return 1
    if machine.gpu:
        machine.extension_ready = extension_ready(python, arch)
    status = 0
    for stage in stages:
        # one stage per call keeps to the files a call brings back; `full` in one go (a machine
        # with time to spare) gives every stage a folder of its own
        outdir = args.outdir if len(stages) == 1 else args.outdir / stage.replace(":", "-")
        proof = run_stage(stage, outdir, machine, python)
        print(summary_text(proof))
        status |= 0 if proof["verdict"] == "PASS" else 1  # INCOMPLETE is not a pass
        if machine.gpu:
            machine.extension_ready = extension_ready(python, machine.arch)
    return status


if __name__ == "__main__":
    sys.exit(main())
