"""The GPU proof on a machine without a GPU: its plan, scheduler, fuzz harness and summary.

What needs the GPU (the checks' verdicts, sanitizers, timings) runs in benchmarks/gpu_proof.sh on
one; here the same code runs on the cpu backend and Triton's interpreter, and the scheduler is
driven with plain commands.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import fuzz, proof
from vtok_kernels import backends

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).with_name("data") / "proof-quick-rehearsal.json"
HOPPER = proof.Machine(gpu=True, arch="90a", python="python3", jobs=16, seed=1, sanitizer="compute-sanitizer")


# ------------------------------------------------------------------------------------ plan
def test_plan_cli_prints_every_job_without_a_gpu(tmp_path):
    out = subprocess.run(["bash", "benchmarks/gpu_proof.sh", str(tmp_path), "quick", "--plan"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for job in proof.plan("quick", HOPPER):
        assert job.name in out.stdout
    assert "--no-build-isolation --no-deps --no-index" in out.stdout
    assert "VTOK_CUDA_ARCHS=90a" in out.stdout and "done within 300 s" in out.stdout
    assert not list(tmp_path.iterdir()), "--plan wrote files"


@pytest.mark.parametrize("stage", proof.STAGES)
def test_every_stage_fits_its_budget_in_a_call(stage):
    jobs = proof.plan(stage, HOPPER)
    names = [job.name for job in jobs]
    budget = proof.stage_budget(stage)
    assert budget <= (300 if stage == "quick" else 540)
    for index, job in enumerate(jobs):
        assert 0 < job.deadline_s <= budget - 10, f"{job.name} leaves no time for the summary"
        assert set(job.after) <= set(names[:index]), f"{job.name} waits for a later job"
        files = [o for o in job.outputs.values()]
        assert all("/" not in f for f in files)


def test_quick_orders_the_work_as_the_gpu_window_needs():
    jobs = {job.name: job for job in proof.plan("quick", HOPPER)}
    # Triton and NVRTC compile while nvcc builds; what needs the extension waits for it
    triton = [n for n in jobs if n.startswith("checks:triton")]
    assert triton == [f"checks:triton:{k}" for k in range(HOPPER.triton_shards)]
    for k, name in enumerate(triton):
        assert jobs[name].after == () and f"--shard {k}/{HOPPER.triton_shards}" in " ".join(jobs[name].command)
    assert jobs["checks:cuda:cupy-nvrtc"].after == ()
    assert jobs["checks:cuda:extension"].after == ("build",)
    assert "loaders" in " ".join(jobs["checks:cuda:extension"].command)
    # the warp-split forward's own checks, through the extension and against the CuPy loader
    warps = jobs["checks:cuda:extension:warps"]
    assert warps.after == ("build",) and "--backend cuda:extension:warps" in " ".join(warps.command)
    assert "loaders" in " ".join(warps.command) and warps.outputs["jsonl"] == "checks-cuda-extension-warps.jsonl"
    # the benchmarks run alone, after every check; the compiled baselines last
    checks = [n for n in jobs if n.startswith(("checks:", "memcheck", "racecheck", "build", "warm-up"))]
    assert set(checks) <= set(jobs["kernels"].after)
    assert "kernels" in jobs["compiled"].after and jobs["compiled"].optional
    build = " ".join(jobs["build"].command)
    assert jobs["build"].env["VTOK_CUDA_ARCHS"] == "90a" and jobs["build"].env["VTOK_REQUIRE_EXTENSION"] == "1"
    assert "--no-build-isolation --no-deps --no-index" in build and "--check-extension 90a" in build
    assert " ".join(jobs["checks:cuda:extension"].command).count("--fuzz-cases 300") == 1
    assert all(jobs[n].env.get("VTOK_TRITON_AUTOTUNE") == "0" for n in jobs if n.startswith("checks:"))


def test_bench_other_times_the_host_first_and_records_it():
    jobs = {job.name: job for job in proof.plan("full:bench-other", HOPPER)}
    build, host, bench, records = jobs["build"], jobs["host"], jobs["bench-other"], jobs["records"]
    assert host.after == ("build",) and "host" in bench.after
    assert build.deadline_s + 60 <= host.deadline_s <= bench.deadline_s - 240
    assert "benchmarks/test_bench_host.py" in host.command and "gpu" in host.command
    assert host.env["VTOK_TRITON_AUTOTUNE"] == "0"  # the host rows time launches, not tuning
    command = " ".join(records.command)
    assert "{work}/bench-host.json" in command and "{work}/bench-bench-other.json" in command
    assert "--missing-ok" in records.command  # a host job cut before its JSON costs no record
    assert all("host" not in job for job in (j.name for j in proof.plan("full:bench-encode", HOPPER)))


def test_a_built_extension_is_not_rebuilt():
    machine = proof.Machine(**{**HOPPER.__dict__, "extension_ready": True})
    build = proof.plan("quick", machine)[0]
    assert build.name == "build" and build.skip and "already" in build.skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_to_run_without_a_gpu(tmp_path):
    out = subprocess.run(["bash", "benchmarks/gpu_proof.sh", str(tmp_path), "quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "no NVIDIA GPU" in out.stderr and "--rehearse" in out.stderr


def test_unknown_stage_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.proof", str(tmp_path), "fast", "--plan"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown stage" in out.stderr


# ------------------------------------------------------------------------------------ scheduler
def test_scheduler_waits_stops_at_deadlines_and_skips(tmp_path):
    sleep = lambda s: [sys.executable, "-c", f"import time; time.sleep({s})"]  # noqa: E731
    jobs = [
        proof.Job("first", sleep(0.3), 20),
        proof.Job("second", [sys.executable, "-c", "import sys; sys.exit(3)"], 20, ("first",)),
        proof.Job("slow", sleep(60), 6),
        proof.Job("late", sleep(0.1), 8, ("slow",)),  # 6 s in, less than 5 s left: not started
        proof.Job("skipped", sleep(0.1), 20, skip="not on this machine"),
    ]
    seen = []
    outcomes = proof.run_jobs(jobs, proof.Machine(gpu=False), tmp_path, lambda o: seen.append(dict(o)),
                              poll_s=0.05)
    assert outcomes["first"].status == "ok"
    assert outcomes["second"].status == "FAIL" and outcomes["second"].returncode == 3
    assert outcomes["second"].started_s >= outcomes["first"].seconds - 0.1
    assert outcomes["slow"].status == "timeout" and outcomes["slow"].seconds < 10
    assert outcomes["late"].status == "not-run" and "no time left" in outcomes["late"].detail
    assert outcomes["skipped"].status == "skipped"
    assert len(seen) >= 4  # rewritten as jobs end
    assert (tmp_path / "first.log").read_text().startswith("$ ")


def test_a_job_that_stops_itself_at_its_deadline_is_cut_not_failed(tmp_path):
    """benchmarks.calibrate ncu exits 124 when its own deadline stops ncu: a cut run of a job
    that keeps partial results, a failure of any other."""
    cut = [sys.executable, "-c", f"import sys; sys.exit({proof.CUT_EXIT})"]
    jobs = [proof.Job("partial", cut, 20, partial_ok=True), proof.Job("whole", cut, 20)]
    outcomes = proof.run_jobs(jobs, proof.Machine(gpu=False), tmp_path, lambda o: None, poll_s=0.05)
    assert outcomes["partial"].status == "timeout" and outcomes["whole"].status == "FAIL"
    entry = proof._detail(jobs[0], outcomes["partial"], tmp_path)
    assert proof.verdict([entry]) == "INCOMPLETE (partial)"


# ------------------------------------------------------------------------------------ fuzz harness
def test_fuzz_cases_are_reproducible_and_cover_every_option():
    drawn = [fuzz.draw(11, i, "cpu", fuzz.PROFILES["gpu"]) for i in range(600)]
    assert drawn[17] == fuzz.draw(11, 17, "cpu", fuzz.PROFILES["gpu"])
    assert drawn[17] != fuzz.draw(12, 17, "cpu", fuzz.PROFILES["gpu"])
    assert fuzz.Case.from_json(drawn[5].to_json()) == drawn[5]
    seen = lambda attr: {str(getattr(c, attr)) for c in drawn}  # noqa: E731
    assert seen("op") == set(fuzz.OPS)
    assert seen("dtype") == {str(d).removeprefix("torch.") for d in backends.get("cpu").dtypes}
    assert seen("layout") == {layout for layouts in fuzz.LAYOUTS.values() for layout in layouts}
    assert {"True", "False"} <= seen("sizes") and {"True", "False"} <= seen("five_d")
    assert any(c.spatial for c in drawn) and any(isinstance(c.key, list) for c in drawn)
    assert any(c.key < 0 for c in drawn if isinstance(c.key, int))
    assert {c.num_heads for c in drawn if c.pool == "attn"} >= {1, 2, 3, 4, 8, 16}
    assert any(c.grid in ([27, 27], [24, 24]) for c in drawn)
    assert any(c.frames[0] == 1 for c in drawn) and max(c.frames_per_token for c in drawn) == 4
    for c in drawn:
        keys = c.key if isinstance(c.key, list) else [c.key] * len(c.frames)
        assert len(keys) == len(c.frames) and all(-t <= k < t for k, t in zip(keys, c.frames))
        assert c.channels % c.num_heads == 0 and c.channels <= fuzz.PROFILES["gpu"].max_channels
        if c.spatial:
            assert c.spatial[0] <= c.grid[0] and c.spatial[1] <= c.grid[1]
    triton = {c.dtype for c in (fuzz.draw(3, i, "triton", fuzz.PROFILES["gpu"]) for i in range(60))}
    assert "float64" not in triton  # only dtypes the backend takes


def _case(**fields):
    base = dict(op="encode", dtype="float32", frames=[4, 4], grid=[3, 3], channels=12)
    return fuzz.Case(**{**base, **fields})


@pytest.mark.parametrize("spec, backend, env", [
    ("triton", "triton", {}),
    ("cuda:cupy-nvrtc", "cuda", {"VTOK_CUDA_LOADER": "cupy-nvrtc"}),
    ("cuda:extension:warps", "cuda", {"VTOK_CUDA_LOADER": "extension", "VTOK_CUDA_FWD": "warps"}),
])
def test_a_backend_spec_pins_the_cuda_loader_and_forward_design(monkeypatch, spec, backend, env):
    for name in ("VTOK_CUDA_LOADER", "VTOK_CUDA_FWD"):  # restored after the test, however pinned
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert fuzz.pin_backend(spec) == backend
    assert {n: v for n, v in os.environ.items() if n in ("VTOK_CUDA_LOADER", "VTOK_CUDA_FWD")} == env

@pytest.mark.parametrize("layout", fuzz.LAYOUTS["encode"])
def test_fuzz_layouts_are_the_views_they_name(layout):
    x = fuzz.build_inputs(_case(layout=layout), "cpu").args["x"]
    assert tuple(x.shape) == (2, 4, 9, 12)
    contiguous = x.contiguous()
    if layout == "contiguous":
        assert x.is_contiguous()
    elif layout == "frames-strided":
        assert x.stride(1) == 2 * contiguous.stride(1)
    elif layout == "patches-strided":
        assert x.stride(2) == 2 * 12
    elif layout == "videos-strided":
        assert x.storage_offset() == contiguous.stride(0) and x.stride() == contiguous.stride()
    elif layout == "time-major":
        assert x.stride(0) < x.stride(1)
    elif layout == "misaligned":
        assert x.data_ptr() % 16 != 0 and x.stride(-1) == 1
    elif layout == "channels-strided":
        assert x.stride(-1) == 2


def test_fuzz_inputs_depend_only_on_the_case():
    case = _case(pool="attn", num_heads=3, layout="time-major", data_seed=99)
    a, b = fuzz.build_inputs(case, "cpu"), fuzz.build_inputs(case, "cpu")
    assert torch.equal(a.args["x"], b.args["x"]) and torch.equal(a.args["query"], b.args["query"])
    assert not torch.equal(a.args["x"], fuzz.build_inputs(_case(pool="attn", num_heads=3, data_seed=98),
                                                           "cpu").args["x"])


@pytest.mark.parametrize("backend,count", [("cpu", 40), ("torch", 10), ("triton", 6)])
def test_fuzz_passes_on_the_cpu_backends(backend, count, capsys):
    if backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(backends.unavailable_reason(backend, "cpu"))
    seed = torch.randint(0, 100_000, ()).item()  # fresh cases every run; the seed is in the output
    lines = []
    counts = fuzz.run(backend, "cpu", fuzz.draw_cases(seed, count, backend, fuzz.PROFILES["small"]),
                      emit=lines.append)
    assert counts == {**counts, "passed": count, "failed": 0}, capsys.readouterr().out + f" (seed {seed})"
    assert len(lines) == count and all(line["ok"] and line["repro"] is None for line in lines)


@pytest.fixture
def broken_cpu_encode(monkeypatch):
    """The cpu backend's forward, off by 1% on one token, or leaving one element unwritten."""
    backend = backends.get("cpu")
    original = backend.impls["encode_fwd"]
    mode = {"how": "off"}

    def broken(*args, **kwargs):
        sequence, lse = original(*args, **kwargs)
        sequence = sequence.clone()
        if mode["how"] == "off":
            sequence[0, -1] *= 1.01
        else:
            sequence[0, 0, 0] = float("nan")
        return sequence, lse

    monkeypatch.setitem(backend.impls, "encode_fwd", broken)
    return mode


def test_fuzz_reports_a_wrong_kernel_with_a_reproducer(broken_cpu_encode, capsys):
    case = _case(pool="attn", num_heads=2, key=-1, layout="misaligned")
    lines = []
    counts = fuzz.run("cpu", "cpu", [(7, case)], emit=lines.append)
    assert counts["failed"] == 1
    printed = capsys.readouterr().out
    assert "FAIL fuzz cpu #7" in printed and "out: relative error" in printed
    repro = lines[0]["repro"]
    assert repro in printed and repro.startswith("python3 -m benchmarks.fuzz --backend cpu --device cpu --case '")
    case_json = repro.split("--case ")[1].strip("'")
    assert fuzz.main(["--backend", "cpu", "--device", "cpu", "--case", case_json]) == 1  # the reproducer fails
    broken_cpu_encode["how"] = "unwritten"
    result = fuzz.run_case(case, "cpu", "cpu")
    assert not result.ok and "non-finite" in result.message


def test_a_crash_in_one_case_is_a_failure_not_the_end(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("illegal memory access")

    monkeypatch.setitem(backends.get("cpu").impls, "encode_fwd", crash)
    counts = fuzz.run("cpu", "cpu", [(0, _case()), (1, _case(op="expand"))])
    assert counts["failed"] == 1 and counts["passed"] == 1


def test_reproducers_name_the_loader_and_the_interpreter():
    case = _case()
    assert fuzz.reproducer(case, "cuda:cupy-nvrtc", "cuda").startswith(
        "python3 -m benchmarks.fuzz --backend cuda:cupy-nvrtc --device cuda")
    assert fuzz.reproducer(case, "triton", "cpu").startswith("TRITON_INTERPRET=1 python3")


# ------------------------------------------------------------------------------------ summary
def test_summary_of_a_recorded_rehearsal():
    recorded = json.loads(SAMPLE.read_text())
    text = proof.summary_text(recorded)
    lines = text.splitlines()
    assert len(lines) <= 40
    assert all(len(line) <= 100 for line in lines if "benchmarks.fuzz" not in line)  # reproducers are whole
    for job in recorded["jobs"]:
        assert any(line.strip().startswith(job["name"]) and job["status"] in line for line in lines)
    assert recorded["verdict"] in lines[0]
    # a failure shows with its reproducer, and the model's prediction beside a row
    failing = json.loads(SAMPLE.read_text())
    checks = next(job for job in failing["jobs"] if job["name"].startswith("checks:"))
    checks["checks"]["fuzz"]["failed"] = 1
    checks["checks"]["fuzz"]["failures"] = [{"describe": "encode bfloat16 T=[3]", "message": "out: relative "
                                             "error 0.5 > 1e-02", "repro": "python3 -m benchmarks.fuzz --case '{}'"}]
    failing["bench"][0]["model_gb_per_s"] = 123.0
    failing["verdict"] = proof.verdict(failing["jobs"])
    text = proof.summary_text(failing)
    assert failing["verdict"].startswith("FAIL (") and checks["name"] in failing["verdict"]
    assert "out: relative error 0.5" in text and "python3 -m benchmarks.fuzz --case '{}'" in text
    assert " 123 " in text and "static-model.json" in text


def test_sanitizer_logs_are_read():
    log = "========= COMPUTE-SANITIZER\nloader: extension\n84 cases ran\n========= ERROR SUMMARY: 0 errors\n"
    assert proof.sanitizer_detail(log) == ("0 errors, 84 cases", 0)
    assert proof.sanitizer_detail("killed") == ("no ERROR SUMMARY in the log", -1)
    assert proof.sanitizer_detail("case 1 done\ncase 2 done\n") == ("cut after 2 cases", -1)
    races = ("========= Error: Race reported between Write access at 0x1a0 in encode_bwd_kernel\n"
             "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)\n84 cases ran\n")
    detail, errors = proof.sanitizer_detail(races)
    assert errors == 2 and "2 race errors, 1 race warnings" in detail and "first: Error: Race" in detail


def _job(name, status="ok", **extra):
    return {"name": name, "status": status, **extra}


def test_verdict_tells_failed_from_incomplete():
    ok = {"passed": 3, "failed": 0, "planned": 3, "failures": []}
    assert proof.verdict([_job("a", checks={"fuzz": ok}), _job("b", "skipped", optional=True)]) == "PASS"
    bad = {**ok, "passed": 2, "failed": 1}
    assert proof.verdict([_job("a", checks={"fuzz": bad})]) == "FAIL (a)"
    assert proof.verdict([_job("m", sanitizer_errors=2)]) == "FAIL (m)"
    assert proof.verdict([_job("t", "timeout")]) == "FAIL (t)"  # a hang where nothing streams
    cut = {**ok, "passed": 1}
    assert proof.verdict([_job("a", "timeout", partial_ok=True, incomplete=["fuzz"], checks={"fuzz": cut})]) \
        == "INCOMPLETE (a)"
    assert proof.verdict([_job("s", "skipped")]) == "INCOMPLETE (s)"  # a sanitizer missing on a GPU
    assert proof.verdict([_job("c", "timeout", optional=True, partial_ok=True)]) == "PASS"
    assert proof.verdict([_job("a", checks={"fuzz": bad}), _job("s", "skipped")]) == "FAIL (a)"


def test_the_build_is_checked_for_the_arch(tmp_path):
    """pip succeeds with a CPU-only fallback build: the build job asks the extension itself."""
    ok = subprocess.run([sys.executable, "-m", "benchmarks.proof", "--check-extension", "999"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 1 and "wanted CUDA code for 999" in ok.stdout
    from vtok_kernels import _extension

    module = _extension.get()
    if module is not None and module.built_with_cuda:
        arch = str(module.cuda_archs).split(",")[-1]
        assert proof.extension_ready(sys.executable, arch)


def test_rehearsal_of_the_quick_stage(tmp_path):
    """The whole quick stage on the CPU: the same scheduler, checks, files and summary."""
    out = subprocess.run(["bash", "benchmarks/gpu_proof.sh", str(tmp_path), "quick", "--rehearse", "--seed", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    recorded = json.loads((tmp_path / "proof.json").read_text())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= proof.MAX_FILES and sorted(recorded["files"]) == files
    assert recorded["verdict"] == "PASS"
    assert (tmp_path / "summary.txt").read_text().strip() in out.stdout
    jobs = {job["name"]: job for job in recorded["jobs"]}
    for name in ("checks:triton:0", "checks:cpu"):
        checks = jobs[name]["checks"]
        assert {"parity", "fuzz", "nosync", "graphs"} <= set(checks)
        assert all(c["failed"] == 0 and c["passed"] > 0 for c in checks.values())
    # the shards split the cases between them: together they ran each planned case once
    shards = [jobs[f"checks:triton:{k}"]["checks"] for k in (0, 1)]
    assert "nosync" not in shards[1]
    for check, total in (("parity", jobs["checks:cpu"]["checks"]["parity"]["planned"]), ("fuzz", 12)):
        assert sum(c[check]["planned"] for c in shards) == total
        assert sum(c[check]["passed"] for c in shards) == total
    assert recorded["bench"] and all(row["gb_per_s"] > 0 for row in recorded["bench"])
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {"checks-triton-0.jsonl", "checks-triton-1.jsonl", "checks-cpu.jsonl", "bench-kernels.json",
            "bench-rows.jsonl", "plan.txt"} <= set(names)
