"""benchmarks/calibrate.py: ncu's text read kernel by kernel, each kernel given to its benchmark
row and set beside the static model's estimate. The committed H100 record is the real sample;
the sections that record lacks (instruction counts, hardware byte counters) are written here in
ncu's layout."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import calibrate, proof

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "gpu-nvidia-h100-2026-11-27" / "ncu-clip-nvrtc.txt"
MODEL = ROOT / "benchmarks" / "results" / "static-model.json"
HOPPER = proof.Machine(gpu=True, arch="90a", python="python3", jobs=16, seed=1,
                       sanitizer="compute-sanitizer", ncu="ncu")


def _table(section: str, rows: list[tuple[str, str, str]]) -> list[str]:
    """One section as ncu prints it: a rule, the header, a rule, the rows, a rule."""
    widths = [max(len(r[i]) for r in rows + [("Metric Name", "Metric Unit", "Metric Value")]) for i in range(3)]
    rule = "    " + " ".join("-" * w for w in widths)
    header = f"    {'Metric Name':<{widths[0]}} {'Metric Unit':>{widths[1]}} {'Metric Value':>{widths[2]}}"
    body = [f"    {n:<{widths[0]}} {u:>{widths[1]}} {v:>{widths[2]}}" for n, u, v in rows]
    return [f"    Section: {section}", rule, header, rule, *body, rule, "",
            "    ----- " + "-" * 40, "    OPT   advice that is not a metric", "    ----- " + "-" * 40, ""]


def _kernel(name: str, grid, block, us: float, inst: int, dram_read: float, dram_write: float,
            l2_sectors: int, sms: int = 132) -> list[str]:
    lines = [f"  {name} ({grid[0]}, {grid[1]}, {grid[2]})x({block}, 1, 1), Context 1, Stream 7, Device 0, CC 9.0"]
    lines += _table("GPU Speed Of Light Throughput", [("Duration", "us", f"{us:,.4f}"),
                                                      ("SM Active Cycles", "cycle", f"{us * 1980:,.2f}")])
    lines += _table("Instruction Statistics", [("Executed Instructions", "inst", f"{inst:,}"),
                                               ("Issued Instructions", "inst", f"{inst + 7:,}")])
    lines += _table("Launch Statistics", [("# SMs", "SM", str(sms)), ("Registers Per Thread", "register/thread", "64")])
    lines += _table("Command line profiler metrics", [
        ("dram__bytes_read.sum", "byte", f"{round(dram_read):,}"),
        ("dram__bytes_write.sum", "Kbyte", f"{dram_write / 1e3:,.3f}"),
        ("lts__t_sectors_srcunit_tex_op_read.sum", "sector", f"{l2_sectors:,}")])
    return lines


def _model_rows() -> dict:
    return calibrate.load_model(MODEL)


def _ncu_log(rows: list[tuple[dict, list[dict]]], stretch: float) -> str:
    """ncu's output for rows whose kernels ran ``stretch`` times the model's estimate: the
    Profiling lines and each row's "ran once" as they stream, the report after."""
    stream, report = ["==PROF== Connected to process 1 (/usr/bin/python3)"], []
    for key, kernels in rows:
        for k in kernels:
            stream.append(f'==PROF== Profiling "{calibrate.base_name(k["name"])}": 0%....50%....100% - 30 passes')
            report += _kernel("void " + k["name"] + "(vtok::EncodeParams)" if "<" in k["name"] else k["name"],
                              k["grid"] + [1] * (3 - len(k["grid"])), 256, k["time_us"] * stretch,
                              inst=int(k["hbm_bytes"] / 1024 * 300), dram_read=k["hbm_bytes"] * 0.5,
                              dram_write=k["hbm_bytes"] * 0.5, l2_sectors=k["l2_bytes"] // 32)
        stream.append(f"cuda-{key['op']}-{key['mode']}-{key['impl']}-{key['preset']}-B8xT16-{key['dtype']}: "
                      f"ran once {json.dumps(key)}")
    return "\n".join(stream + ["==PROF== Disconnected from process 1"] + report) + "\n"


# ------------------------------------------------------------------------------ the record
def test_the_h100_record_is_read_kernel_by_kernel():
    parsed = calibrate.parse_ncu(RECORD.read_text())
    assert len(parsed["kernels"]) == 16 and len(parsed["rows"]) == 8 and not parsed["unclaimed"]
    rows = calibrate.attribute(parsed)
    assert all(row["consistent"] for row in rows)
    assert [len(r["kernels"]) for r in rows] == [2, 1, 3, 2, 2, 1, 3, 2]
    first = rows[0]
    assert first["key"] == {"op": "encode-mean", "mode": "fwd", "impl": "cuda", "preset": "clip",
                            "batch": 8, "frames": 16, "dtype": "bfloat16"}
    mean = first["kernels"][0]
    assert mean["name"] == "residual_fwd_kernel<bf16_t,8,0>" and mean["blocks"] == 144 * 8
    assert mean["seconds"] == pytest.approx(78.88e-6)
    # no instruction counter in that record: executed instructions from the warp-state section
    assert mean["instructions_derived"]
    assert mean["instructions"] == pytest.approx(144_183.27 * 27.83 / 12.56 * 132)
    assert mean["ipc"] == pytest.approx(mean["instructions"] / (144_183.27 * 132))
    # the mean forward reads x once: DRAM bytes from the run's throughput within 5% of x
    x_bytes = 8 * 16 * 576 * 1024 * 2
    assert mean["dram_bytes"] == pytest.approx(x_bytes, rel=0.05)
    # the attention forward executes about 2.6x the mean forward's instructions for the same bytes
    attn = rows[4]["kernels"][0]
    assert attn["name"] == "residual_fwd_kernel<bf16_t,8,1>"
    assert 2.0 < attn["instructions"] / mean["instructions"] < 3.2


def test_a_row_id_without_a_key_is_still_read():
    assert calibrate.row_key("cuda-encode-attn-fwd+bwd-cuda-warps-siglip-B8xT16-bfloat16") == {
        "op": "encode-attn", "mode": "fwd+bwd", "impl": "cuda-warps", "preset": "siglip",
        "batch": 8, "frames": 16, "dtype": "bfloat16"}
    assert calibrate.row_key("something-else") == {"id": "something-else"}


def test_kernel_profile_once_names_each_row(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_profile", "--once", "--device", "cpu",
                          "--impl", "cpu", "--preset", "tiny", "--frames", "3", "--mode", "fwd+bwd"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = calibrate.parse_ncu(out.stdout)
    assert [r["key"]["op"] for r in parsed["rows"]] == ["encode-mean", "encode-attn"]
    assert all(r["key"]["frames"] == 3 and r["key"]["impl"] == "cpu" for r in parsed["rows"])


# ------------------------------------------------------------------------------ counters
def test_counters_are_read_with_their_units():
    text = "\n".join(_kernel("attn_bwd_kernel", (8, 72, 16), 32, us=104.5, inst=123_456_789,
                             dram_read=301.25e6, dram_write=151.5e6, l2_sectors=9_876_543))
    [kernel] = calibrate.parse_ncu(text)["kernels"]
    m = calibrate.measured(kernel)
    assert m["seconds"] == pytest.approx(104.5e-6) and m["blocks"] == 8 * 72 * 16
    assert m["instructions"] == 123_456_789 and not m["instructions_derived"]
    assert m["dram_bytes"] == pytest.approx(301.25e6 + 151.5e6)
    assert m["l2_bytes"] == 9_876_543 * 32
    assert m["ipc"] == pytest.approx(123_456_789 / (104.5 * 1980 * 132))
    assert m["registers"] == 64
    # the advice boxes between the tables are not metrics
    assert not any("OPT" in name or "advice" in name for name in kernel["metrics"])


def test_a_kernel_missing_from_the_report_moves_no_other():
    """Profiled but not reported (ncu could not finish it): its row lacks it, the next row keeps
    its own kernels."""
    text = "\n".join(['==PROF== Profiling "mean_fwd_kernel": 0%', '==PROF== Profiling "combine_kernel": 0%',
                      "cuda-encode-mean-fwd-triton-clip-B8xT16-bfloat16: ran once",
                      '==PROF== Profiling "attn_fwd_kernel": 0%',
                      "cuda-encode-attn-fwd-triton-clip-B8xT16-bfloat16: ran once"]
                     + _kernel("mean_fwd_kernel", (32, 8, 8), 32, 50.0, 10, 1e6, 1e6, 10)
                     + _kernel("attn_fwd_kernel", (32, 4, 16), 32, 60.0, 10, 1e6, 1e6, 10))
    first, second = calibrate.attribute(calibrate.parse_ncu(text))
    assert [k["name"] for k in first["kernels"]] == ["mean_fwd_kernel"] and first["missing"] == ["combine_kernel"]
    assert [k["name"] for k in second["kernels"]] == ["attn_fwd_kernel"] and second["consistent"]
    assert second["kernels"][0]["seconds"] == pytest.approx(60e-6)


def test_units_it_does_not_know_give_no_number():
    metrics = {"Duration": ("ksecond", 3.0), "Elapsed Cycles": ("cycle", 5.0), "Memory Throughput": ("Gbyte/second", 2.0),
               "Odd Bytes": ("Pbyte", 1.0)}
    assert calibrate._scaled(metrics, "Duration") is None and calibrate._scaled(metrics, "Odd Bytes") is None
    assert calibrate._scaled(metrics, "Elapsed Cycles") == 5.0
    assert calibrate._scaled(metrics, "Memory Throughput") == pytest.approx(2e9)
    assert calibrate._scaled({"Duration": ("msecond", 1.5)}, "Duration") == pytest.approx(1.5e-3)


def test_a_cut_run_leaves_its_last_kernels_unclaimed():
    text = "\n".join(['==PROF== Profiling "mean_fwd_kernel": 0%', "cpu-encode-mean-fwd-triton-clip-B8xT16-bfloat16: "
                      "ran once", '==PROF== Profiling "attn_fwd_kernel": 0%'])
    parsed = calibrate.parse_ncu(text)
    assert parsed["unclaimed"] == ["attn_fwd_kernel"] and len(parsed["rows"]) == 1


# ------------------------------------------------------------------------------ the model beside it
def test_kernels_pair_in_launch_order_by_name():
    model = [{"name": "vtok::cuda::key_tokens_kernel<vtok::cuda::bf16_t, 8>", "kernel": "key_tokens_kernel"},
             {"name": "vtok::cuda::residual_fwd_kernel<vtok::cuda::bf16_t, 8, 0, 2>", "kernel": "residual_fwd_kernel"},
             {"name": "vtok::cuda::residual_fwd_kernel<vtok::cuda::bf16_t, 8, 3, 0>", "kernel": "residual_fwd_kernel"},
             {"kernel": "combine_kernel"}]
    measured = [{"name": "residual_fwd_kernel<bf16_t,8,3,0>"}, {"name": "other_kernel"}, {"name": "combine_kernel"}]
    pairs = calibrate.pair_kernels(model, measured)
    assert [(m and calibrate.short_name(m.get("name") or m["kernel"]), k and k["name"]) for m, k in pairs] == [
        ("key_tokens_kernel<bf16_t,8>", None), ("residual_fwd_kernel<bf16_t,8,0,2>", None),
        ("residual_fwd_kernel<bf16_t,8,3,0>", "residual_fwd_kernel<bf16_t,8,3,0>"),
        (None, "other_kernel"), ("combine_kernel", "combine_kernel")]


def test_a_bool_template_argument_pairs_as_ncu_writes_it():
    """ncu writes a kernel's bool template argument as 0 / 1, the demangler (and so the model)
    as false / true: both name the same kernel."""
    model = [{"name": "vtok::cuda::warp_pool_kernel<vtok::cuda::bf16_t, 8, true, 2>", "kernel": "warp_pool_kernel"},
             {"name": "vtok::cuda::encode_bwd_kernel<vtok::cuda::bf16_t, 8, false, 2>", "kernel": "encode_bwd_kernel"}]
    measured = [{"name": calibrate.short_name("void vtok::cuda::warp_pool_kernel<vtok::cuda::bf16_t, 8, 1, 2>"
                                              "(vtok::EncodeParams, vtok::cuda::RowPlan)")},
                {"name": "encode_bwd_kernel<bf16_t,8,0,2>"}]
    pairs = calibrate.pair_kernels(model, measured)
    assert [(m is not None, k is not None) for m, k in pairs] == [(True, True), (True, True)]
    assert calibrate.short_name("f<true_type, 1>") == "f<true_type,1>"


def test_remodel_reads_the_kept_kernels(tmp_path):
    """``remodel`` on the H100 record: every profiled launch of 34f048b modelled, the merges
    reported but short (launch-bound), the text written."""
    record = calibrate.ROOT / "benchmarks" / "results" / "gpu-nvidia-h100-2026-11-27"
    out = tmp_path / "remodel.txt"
    assert calibrate.main(["remodel", "--inputs", str(record / "model-inputs-34f048b.json"),
                           "--calibration", str(record / "calibration-4328726.json"), "--txt", str(out)]) == 0
    text = out.read_text()
    assert text.count("residual_fwd_kernel<bf16_t,8,3>") == 2 and "encode_bwd_kernel<bf16_t,8,1>" in text
    assert "model within 15% of ncu: 4 of 6 kernels of 5 us or more" in text


@pytest.mark.parametrize("stretch", [1.1, 1.4])
def test_the_model_beside_a_run(tmp_path, stretch):
    model = _model_rows()
    impls = ["cuda", "cuda-warps", "triton"]
    keys = [dict(zip(("impl", "op", "mode", "preset", "dtype"), (impl, op, "fwd+bwd", preset, "bfloat16")))
            for impl in impls for preset in ("clip", "siglip") for op in ("encode-mean", "encode-attn")]
    random.shuffle(keys)
    rows = [(k, model[calibrate.model_key(k)]["kernels"]) for k in keys]
    path = tmp_path / "ncu.txt"
    path.write_text(_ncu_log(rows, stretch))
    report = calibrate.build_report([path, tmp_path / "ncu-missing.txt"], None, MODEL)
    entries = report["kernels"]
    assert len(entries) == sum(len(kernels) for _, kernels in rows)
    assert all(e["model"] and e["measured"] and e["grid_matches"] for e in entries)
    for e in entries:
        assert e["error"] == pytest.approx(1 / stretch - 1, rel=1e-3, abs=1e-3)
        assert e["instructions_per_kib"] == pytest.approx(300, rel=0.01)
    assert any("ncu-missing.txt: missing" in note for note in report["notes"])
    text = calibrate.report_text(entries, [], [])
    judged = sum(e["judged"] for e in entries)
    within = judged if stretch < 1 + calibrate.MODEL_TOLERANCE else 0
    assert f"model within 15% of ncu: {within} of {judged} kernels" in text


def test_profile_rows_meet_or_miss_their_goals():
    model = _model_rows()
    copy = 3.0e12
    rows = []
    for impl, fraction in (("cuda", 0.95), ("cuda-warps", 0.85), ("triton", 0.5)):
        key = (impl, "encode-attn", "fwd", "clip", "bfloat16")
        moved = model[key]["bytes_moved"]
        rows.append({"impl": impl, "op": "encode-attn", "mode": "fwd", "preset": "clip", "dtype": "bfloat16",
                     "bytes_moved": moved, "events_s": 1e-3, "graph_s": 5e-4, "host_s": 2e-4, "host_ops_s": 4e-4,
                     "kernel_sum_s": moved / copy / fraction, "kernels": []})
    out = calibrate.profile_rows({"copy_bytes_per_s": copy, "rows": rows}, model)
    assert [r["fraction_of_copy"] for r in out] == pytest.approx([0.95, 0.85, 0.5])
    assert [r["meets_goal"] for r in out] == [True, False, False]
    assert out[0]["host_ops_us"] == pytest.approx(400) and out[0]["model_us"] == model[("cuda", "encode-attn", "fwd", "clip", "bfloat16")]["predicted_us"]
    [design] = calibrate.faster_design(out)
    assert design["faster"] == "tiles" and design["speedup"] == pytest.approx(0.95 / 0.85)
    text = calibrate.report_text([], out, [design])
    assert "90%!" not in text.splitlines()[2] and "90%!" in text.splitlines()[3] and "faster: tiles" in text


def test_rows_of_another_shape_get_no_model():
    model = _model_rows()
    key = {"impl": "cuda", "op": "encode-mean", "mode": "fwd", "preset": "clip", "dtype": "bfloat16"}
    assert calibrate.model_row(model, key) is not None
    assert calibrate.model_row(model, dict(key, batch=8, frames=16)) is not None
    assert calibrate.model_row(model, dict(key, frames=64)) is None
    assert calibrate.model_row(model, dict(key, batch=1)) is None


def test_the_h100_profile_record_is_read_without_row_keys():
    """The committed kernel_profile JSON predates the keys: each row's id gives it."""
    record = json.loads((RECORD.parent / "kernel-profile-clip.json").read_text())
    assert "impl" not in record["rows"][0]
    rows = calibrate.profile_rows(record, _model_rows())
    assert len(rows) == len(record["rows"])
    for row, raw in zip(rows, record["rows"]):
        assert raw["row"].endswith(f"-{row['key']['preset']}-B{row['key']['batch']}xT{row['key']['frames']}-bfloat16")
        # the model is of 16 frames: the 64-frame rows are measured, not compared
        assert (row["model_us"] is None) == (row["key"]["frames"] != 16)
        assert row["fraction_of_copy"] == pytest.approx(raw["bytes_moved"] / raw["kernel_sum_s"] / record["copy_bytes_per_s"])
    designs = calibrate.faster_design(rows)
    assert not designs  # that run measured the tiles design only
    text = calibrate.report_text([], rows, designs)
    assert "cuda mean fwd clip" in text


# ------------------------------------------------------------------------------ running ncu
def test_ncu_runs_again_without_metrics_this_ncu_lacks(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, deadline):
        calls.append(command)
        failed = "--metrics" in command
        text = "==ERROR== Failed to find metric lts__t_sectors_srcunit_tex_op_read.sum\n" if failed else "report\n"
        return text, 1 if failed else 0

    monkeypatch.setattr(calibrate, "find_ncu", lambda: "/opt/ncu")
    monkeypatch.setattr(calibrate, "_run_until", fake_run)
    out = tmp_path / "ncu.txt"
    assert calibrate.run_ncu(out, ["--impl", "cuda"], python="python3") == 0
    assert len(calls) == 2 and "--metrics" in calls[0] and "--metrics" not in calls[1]
    command = calls[1]
    assert command[:3] == ["/opt/ncu", "--clock-control", "none"]
    assert command[-8:] == ["python3", "-m", "benchmarks.kernel_profile", "--once", "--mode", "fwd+bwd",
                            "--impl", "cuda"]
    assert all(s in command for s in ("InstructionStats", "SpeedOfLight"))
    assert "report" in out.read_text()


def test_a_run_past_its_deadline_is_stopped_with_what_it_started(tmp_path):
    """ncu profiles a child process: at the deadline both go, and the run says it was cut."""
    import time

    marker = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {marker}; echo started; wait"
    start = time.time()
    text, code = calibrate._run_until(["bash", "-c", script], time.time() + 2)
    assert code == calibrate.CUT_EXIT == proof.CUT_EXIT and time.time() - start < 20
    assert "started" in text and "stopped at the deadline" in text
    child = Path(f"/proc/{int(marker.read_text())}/status")
    time.sleep(0.2)
    # gone, or dead and waiting for its new parent to reap it
    assert not child.exists() or "State:\tZ" in child.read_text()
    text, code = calibrate._run_until(["bash", "-c", "echo out; echo err >&2; exit 3"], None)
    assert code == 3 and "out" in text and "err" in text  # one stream, stderr with stdout


def test_without_ncu_the_job_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "find_ncu", lambda: None)
    assert calibrate.run_ncu(tmp_path / "ncu.txt", []) == 2
    assert "ncu not found" in (tmp_path / "ncu.txt").read_text()


# ------------------------------------------------------------------------------ the proof's stage
def test_the_profile_stage_measures_then_profiles_then_reports():
    jobs = {job.name: job for job in proof.plan("full:profile", HOPPER)}
    assert list(jobs) == ["build", "profile", "ncu:cuda", "ncu:cuda-warps", "ncu:triton", "calibration"]
    profile = " ".join(jobs["profile"].command)
    assert "--host-ops" in profile and "--preset clip --preset siglip --frames 16" in profile
    # one ncu process per backend, one after another, none beside the timed profile
    assert jobs["ncu:cuda"].after == ("profile",) and jobs["ncu:triton"].after == ("ncu:cuda-warps",)
    assert set(jobs["calibration"].after) == {"profile", "ncu:cuda", "ncu:cuda-warps", "ncu:triton"}
    assert jobs["calibration"].returns == ("calibration.txt", "calibration.json")
    no_ncu = proof.Machine(**{**HOPPER.__dict__, "ncu": None})
    skipped = {job.name: job for job in proof.plan("full:profile", no_ncu)}
    assert "ncu not found" in skipped["ncu:cuda"].skip and not skipped["ncu:cuda"].optional


def test_rehearsal_of_the_profile_stage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.proof", str(tmp_path), "full:profile", "--rehearse"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    recorded = json.loads((tmp_path / "proof.json").read_text())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(recorded["files"]) == files and len(files) <= proof.MAX_FILES
    assert {"calibration.txt", "calibration.json"} <= set(files)
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["kernels"] == [] and any("missing" in n for n in report["notes"])


def test_the_summary_shows_the_calibration(tmp_path):
    model = _model_rows()
    key = {"impl": "cuda", "op": "encode-mean", "mode": "fwd+bwd", "preset": "clip", "dtype": "bfloat16"}
    path = tmp_path / "ncu.txt"
    path.write_text(_ncu_log([(key, model[calibrate.model_key(key)]["kernels"])], 1.05))
    report = calibrate.build_report([path], None, MODEL)
    text = calibrate.report_text(report["kernels"], [], [])
    summary = proof.summary_text({"stage": "full:profile", "verdict": "PASS", "jobs": [], "calibration": text})
    assert "calibration (calibration.txt has every kernel):" in summary
    assert "model within 15% of ncu" in summary
