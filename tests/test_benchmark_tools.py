"""The benchmark tooling: roofline byte counts, NVML telemetry with and without NVML, the records
script, backend="auto" from a record, and one small end-to-end run of the suite."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import cases, records, roofline
import vtok_kernels as vk
from vtok_kernels import selection, telemetry

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- roofline
def test_encode_bytes_by_hand():
    # 2 videos of 5 frames, N = 6, C = 8, bfloat16 (2 bytes): x is 2*5*6*8*2 = 960 bytes,
    # the sequence 2*(6 + 4) tokens * 8 * 2 = 320 bytes.
    mean = roofline.EncodeShape((5, 5), 6, 8, 2)
    assert roofline.encode_bytes(mean) == 960 + 320
    # backward of mean: grad_sequence read, grad_x written; x itself is not needed
    assert roofline.encode_bytes(mean, backward=True) == (960 + 320) + (320 + 960)
    attn = roofline.EncodeShape((5, 5), 6, 8, 2, pool="attn", num_heads=2)
    lse, query, residual_tokens = 2 * 4 * 2 * 4, 8 * 4, 2 * 4 * 8 * 2
    forward = 960 + 320 + lse + query
    assert roofline.encode_bytes(attn) == forward
    assert roofline.encode_bytes(attn, backward=True) == forward + 320 + 960 + 960 + residual_tokens + lse + 2 * query


def test_encode_bytes_varlen_groups_and_spatial():
    # videos of 4 and 1 frames, 2 frames per token: G = 2 and 0; spatial pooling keeps 4 tokens
    shape = roofline.EncodeShape((4, 1), 9, 3, 4, frames_per_token=2, num_key_tokens=4)
    assert shape.total_groups == 2 and shape.total_tokens == 2 * 4 + 2
    assert roofline.encode_bytes(shape) == 5 * 9 * 3 * 4 + 10 * 3 * 4


def test_expand_bytes_by_hand():
    # B=2, T=4, N=5, C=3, float32: tokens 2*(5+3)*3*4 = 192, frames 2*4*5*3*4 = 480
    assert roofline.expand_bytes(2, 4, 5, 3, 4) == 192 + 480
    assert roofline.expand_bytes(2, 4, 5, 3, 4, backward=True) == 2 * (192 + 480)
    assert roofline.expand_bytes(1, 5, 2, 1, 2, frames_per_token=3) == (2 + 2) * 2 + 5 * 2 * 2


def test_cuda_event_timer_returns_the_device_time_between_its_two_calls(monkeypatch):
    clock = {"now_ms": 0.0}

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at_ms = None

        def record(self):
            self.at_ms = clock["now_ms"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at_ms - self.at_ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = roofline.CudaEventTimer()
    for elapsed_ms in (3.0, 0.5):
        start = timer()
        clock["now_ms"] += elapsed_ms
        assert timer() - start == pytest.approx(elapsed_ms / 1e3)
    assert repr(timer) == "CudaEventTimer()"


def test_copy_bandwidth_is_measured():
    bw = roofline.copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, repeats=2)
    assert bw["bytes_per_s"] >= bw["median_bytes_per_s"] > 0
    assert bw["buffer_bytes"] == 1 << 20


# --------------------------------------------------------------------------------- telemetry
@pytest.fixture
def fresh_telemetry(monkeypatch):
    """telemetry with its NVML state forgotten, restored afterwards."""
    monkeypatch.setattr(telemetry, "_nvml", None)
    monkeypatch.setattr(telemetry, "_nvml_error", None)
    return telemetry


def test_telemetry_without_nvml_package(fresh_telemetry, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    for reading in (fresh_telemetry.snapshot(), fresh_telemetry.device_info()):
        assert reading["nvml"] is False
        assert "nvidia-ml-py" in reading["reason"]
    json.dumps(fresh_telemetry.snapshot())


def test_telemetry_without_driver(fresh_telemetry, monkeypatch):
    fake = types.ModuleType("pynvml")

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reading = fresh_telemetry.snapshot()
    assert reading["nvml"] is False and "Not Found" in reading["reason"]
    assert fresh_telemetry.unavailable_reason() == reading["reason"]


def test_telemetry_reads_a_device(fresh_telemetry, monkeypatch):
    """The NVML path, against a stand-in NVML that answers like a throttled GPU."""
    fake = types.ModuleType("pynvml")
    fake.NVML_CLOCK_SM, fake.NVML_CLOCK_MEM, fake.NVML_TEMPERATURE_GPU = 0, 2, 0
    fake.nvmlClocksEventReasonGpuIdle = 0x1
    fake.nvmlClocksEventReasonSwPowerCap = 0x4
    fake.nvmlClocksEventReasonHwSlowdown = 0x8
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    fake.nvmlDeviceGetClockInfo = lambda h, kind: {0: 1755, 2: 2619}[kind]
    fake.nvmlDeviceGetPowerUsage = lambda h: 412_345
    fake.nvmlDeviceGetTemperature = lambda h, sensor: 61
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=99, memory=80)
    fake.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4 | 0x8
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    fake.nvmlSystemGetDriverVersion = lambda: "570.1"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30)
    fake.nvmlDeviceGetMaxClockInfo = lambda h, kind: {0: 1980, 2: 2619}[kind]

    def unsupported(h):
        raise RuntimeError("Not Supported")

    fake.nvmlDeviceGetEnforcedPowerLimit = unsupported
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = fresh_telemetry.snapshot()
    assert snap["nvml"] is True
    assert (snap["sm_clock_mhz"], snap["memory_clock_mhz"], snap["temperature_c"]) == (1755, 2619, 61)
    assert snap["power_w"] == pytest.approx(412.345)
    assert snap["throttle_reasons"] == ["sw_power_cap", "hw_slowdown"]
    info = fresh_telemetry.device_info()
    assert info["name"] == "NVIDIA H100 80GB HBM3" and info["driver"] == "570.1"
    assert info["power_limit_w"] is None  # an unsupported field reads None, it does not raise


# ----------------------------------------------------------------------------------- records
def _bench(device, impl, op, mode, median_s, preset="clip", frames=16, peak=1 << 20):
    moved = 10**9
    return {
        "name": f"test_bench[{device}-{op}-{mode}-{impl}]",
        "stats": {"median": median_s, "min": median_s * 0.9, "mean": median_s, "stddev": 0.0,
                  "iqr": 0.0, "rounds": 5},
        "extra_info": {
            "op": op, "pool": "attn" if op == "encode-attn" else "mean", "mode": mode,
            "impl": impl, "device": device, "preset": preset, "batch": 8, "frames": frames,
            "dtype": "bfloat16", "scale": "gpu" if device == "cuda" else "cpu",
            "bytes_moved": moved, "copy_gb_per_s": 100.0 if device == "cpu" else 3000.0,
            "peak_memory_bytes": peak, "first_call_s": 0.5,
        },
    }


def _sample_json() -> dict:
    benches = []
    for op in ("encode-mean", "encode-attn", "expand"):
        for mode in ("fwd", "fwd+bwd"):
            benches += [
                _bench("cuda", "cuda", op, mode, 0.002),
                _bench("cuda", "triton", op, mode, 0.001 if op == "expand" else 0.003),
                _bench("cuda", "reference", op, mode, 0.1, peak=1 << 30),
                _bench("cuda", "compile", op, mode, 0.02),
                _bench("cpu", "cpu", op, mode, 0.05),
                _bench("cpu", "torch", op, mode, 0.5),
            ]
    return {
        "datetime": "2026-11-25T12:00:00+00:00",
        "machine_info": {"vtok": {
            "versions": {"torch": "2.13.0"},
            "gpu": {"name": "NVIDIA H100 80GB HBM3"},
            "host_at_end": {"cpu": "Intel(R) Xeon(R) Processor", "torch_threads": 2,
                            "load_average": [1.0, 1.0, 1.0], "cpu_count": 2},
            "copy_bandwidth": {"cpu": {"bytes_per_s": 1e11, "median_bytes_per_s": 9e10, "repeats": 5},
                               "cuda": {"bytes_per_s": 3e12, "median_bytes_per_s": 2.9e12, "repeats": 20}},
            "scale": {"cpu": "cpu", "cuda": "gpu"},
        }},
        "benchmarks": benches + [{"name": "test_other", "stats": {}, "extra_info": {}}],
    }


def test_records_split_by_device_and_compute_roofline():
    recs = records.records_from_benchmark_json(_sample_json())
    assert [r["device"]["kind"] for r in recs] == ["cpu", "cuda"]
    cpu, cuda = recs
    assert cpu["device"]["slug"] == "cpu-intel-xeon-processor-2t"
    assert cuda["device"]["slug"] == "nvidia-h100-80gb-hbm3"
    assert records.record_stem(cuda) == "nvidia-h100-80gb-hbm3-2026-11-25"
    row = next(r for r in cuda["rows"] if r["impl"] == "cuda")
    assert row["gb_per_s"] == pytest.approx(500.0)  # 1e9 bytes in 2 ms
    assert row["roofline_fraction"] == pytest.approx(500.0 / 3000.0)
    assert len(cuda["rows"]) == 3 * 2 * 4 and len(cpu["rows"]) == 3 * 2 * 2


def test_records_write_tables_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    recs = records.records_from_benchmark_json(_sample_json())
    # one plot is enough to prove the plotting (matplotlib is the slow part)
    paths = [p for r in recs for p in records.write_record(r, tmp_path, with_plot=r["device"]["kind"] == "cuda")]
    assert {p.suffix for p in paths} == {".json", ".md", ".png"}
    assert all(p.stat().st_size > 0 for p in paths)
    written = records.regenerate(tmp_path, tmp_path / "_measured_order.py")
    table = written[0].read_text()
    assert "NVIDIA H100 80GB HBM3" in table and "| encode-attn | fwd+bwd |" in table
    # the compile baseline took 20 ms, the reference 100 ms, the cuda backend 2 ms
    assert "| 10.0× |" in table
    reread = records.load_records(tmp_path)
    assert sorted(r["device"]["kind"] for r in reread) == ["cpu", "cuda"]


# --------------------------------------------------------------------------------- selection
def test_measured_order_from_a_record():
    table = records.measured_order(records.records_from_benchmark_json(_sample_json()))
    assert table["cuda"]["encode"] == ["cuda", "triton"]
    assert table["cuda"]["expand"] == ["triton", "cuda"]
    assert table["cpu"]["encode"] == ["cpu", "torch"]
    assert "reference" not in table["cuda"]["encode"]  # baselines are never picked


def test_selection_order_prefers_the_record_then_the_default():
    measured = {"cuda": {"expand": ["triton", "cuda"]}, "cpu": {"encode": ["torch", "triton", "cpu"]}}
    assert selection.order("cuda", "expand", measured) == ["triton", "cuda", "torch"]
    assert selection.order("cuda", "encode", measured) == ["cuda", "triton", "torch"]
    # a CPU record can reorder cpu and torch but never makes "auto" pick interpreted Triton
    assert selection.order("cpu", "encode", measured) == ["torch", "cpu"]
    assert selection.order("cpu", "expand", {}) == ["cpu", "torch"]


def test_auto_traces_without_a_graph_break():
    compiled = torch.compile(lambda x: vk.encode(x).sequence, fullgraph=True, backend="eager")
    x = torch.randn(1, 3, 4, 8)
    torch.testing.assert_close(compiled(x), vk.reference.encode(x))


def test_pick_returns_an_available_backend():
    name = selection.pick(torch.device("cpu"), torch.float32)
    assert name in ("cpu", "torch")
    assert selection.pick(torch.device("cpu"), torch.float64, op="expand") in ("cpu", "torch")


def test_committed_selection_table_matches_the_committed_records():
    """vtok_kernels/_measured_order.py is what records.py makes of benchmarks/results/."""
    generated = ROOT / "vtok_kernels" / "_measured_order.py"
    if not generated.exists():
        pytest.skip("no selection table generated yet")
    committed = records.load_records(ROOT / "benchmarks" / "results")
    assert generated.read_text() == records.selection_module(committed)


# ------------------------------------------------------------------------------ the suite
def test_scales_keep_the_slow_baselines_where_they_are_affordable():
    cpu = cases.cases("cpu", cases.SCALES["cpu"])
    assert {c.impl for c in cpu} == {"cpu", "torch", "reference", "compile", "naive", "compile-naive"}
    assert {(c.preset.name, c.frames, c.batch) for c in cpu} == {("clip", 16, 1), ("siglip", 16, 1)}
    gpu = cases.cases("cuda", cases.SCALES["gpu"])
    assert {c.impl for c in gpu} == {"cuda", "cuda-warps", "triton", "reference", "naive", "compile-naive"}
    assert {c.op for c in gpu if c.impl == "cuda-warps"} == {"encode-mean", "encode-attn", "encode_varlen"}
    assert {c.frames for c in gpu if c.impl == "compile-naive"} == {16}
    assert {c.frames for c in gpu if c.impl == "cuda"} == {16, 32, 64}
    assert len({c.id for c in cpu + gpu}) == len(cpu) + len(gpu)  # ids select rows with -k
    varlen = next(c for c in gpu if c.op == "encode_varlen" and c.frames == 32)
    assert varlen.video_frames == (32, 16) * 4
    assert varlen.bytes_moved() == roofline.encode_bytes(
        roofline.EncodeShape((32, 16) * 4, varlen.preset.num_patches, varlen.preset.channels, 2))


def test_cpu_large_scale_holds_the_cpu_backend_targets():
    rows = cases.cases("cpu", cases.SCALES["cpu-large"])
    assert {(c.preset.grid, c.preset.channels, c.batch, c.frames) for c in rows} == {
        ((14, 14), 256, 4, 16), ((24, 24), 1024, 2, 32)}
    assert {c.op for c in rows} == {"encode-mean", "encode-attn"}
    assert {c.num_heads for c in rows if c.pool == "attn"} == {8}
    # the compiled reference at every shape, next to eager, in both passes
    for impl in ("compile", "reference", "cpu"):
        assert {(c.frames, c.mode) for c in rows if c.impl == impl} == {
            (16, "fwd"), (16, "fwd+bwd"), (32, "fwd"), (32, "fwd+bwd")}
    attn = next(c for c in rows if c.pool == "attn" and c.frames == 32 and c.mode == "fwd")
    assert attn.bytes_moved() == roofline.encode_bytes(
        roofline.EncodeShape((32, 32), 576, 1024, 4, pool="attn", num_heads=8))
    default_ids = {c.id for c in cases.cases("cpu", cases.SCALES["cpu"])}
    assert not default_ids & {c.id for c in rows}


def test_records_of_another_scale_get_their_own_file_and_table(tmp_path):
    data = _sample_json()
    data["machine_info"]["vtok"]["scale"] = {"cpu": "cpu-large", "cuda": "gpu"}
    large = next(r for r in records.records_from_benchmark_json(data) if r["device"]["kind"] == "cpu")
    default = next(r for r in records.records_from_benchmark_json(_sample_json()) if r["device"]["kind"] == "cpu")
    assert records.record_stem(large) == "cpu-intel-xeon-processor-2t-2026-11-25-cpu-large"
    assert records.record_stem(default) == "cpu-intel-xeon-processor-2t-2026-11-25"
    table = records.readme_table([default, large])
    assert "### Intel(R) Xeon(R) Processor (2 threads)\n" in table
    assert "### Intel(R) Xeon(R) Processor (2 threads), scale `cpu-large`" in table


def test_suite_runs_end_to_end(tmp_path):
    """A few rows of the suite at the tiny scale, then the records script on its JSON."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "--bench-scale", "tiny",
           "-m", "not gpu", "-k", "encode-attn and not compile and not torch", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    # test_bench_host.py's rows of the same selection (both dispatch paths) stay out of the records
    host = [b for b in data["benchmarks"] if b["name"].startswith("test_host")]
    assert {b["extra_info"]["path"] for b in host} == {"eager", "ops"}
    assert all(b["stats"]["median"] > 0 for b in host)
    (record,) = records.records_from_benchmark_json(data)
    assert len(record["rows"]) == len(data["benchmarks"]) - len(host)
    (host_record,) = records.host_records_from_benchmark_json(data)
    assert host_record["schema"] == records.HOST_SCHEMA and len(host_record["rows"]) == len(host)
    table = records.host_markdown(host_record).splitlines()
    for mode in ("fwd", "fwd+bwd"):
        (line,) = [row for row in table if row.startswith(f"| cpu | encode-attn | {mode} |")]
        eager, ops, ratio = (float(cell) for cell in line.strip("|").split("|")[3:])
        assert eager > 0 and ops > 0 and abs(ratio - eager / ops) < 0.01
    missing = tmp_path / "cut.json"
    with pytest.raises(FileNotFoundError):
        records.main([str(missing), "--results", str(tmp_path / "results"), "--no-plot", "--no-selection"])
    assert records.main([str(missing), str(out), "--results", str(tmp_path / "results"), "--no-plot",
                         "--no-selection", "--missing-ok"]) == 0
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert f"host-{host_record['device']['slug']}-{host_record['date']}.md" in written
    assert host_record["date"] in " ".join(written) and "README-table.md" in written
    # the host record is no throughput record: the README table and auto's ranking never read it
    assert len(records.load_records(tmp_path / "results")) == 1
    impls = {row["impl"] for row in record["rows"]}
    assert {"reference", "naive"} <= impls
    assert {row["mode"] for row in record["rows"]} == {"fwd", "fwd+bwd"}
    for row in record["rows"]:
        assert row["median_s"] > 0 and row["gb_per_s"] > 0 and 0 < row["roofline_fraction"]
        assert row["peak_memory_bytes"] is not None
        assert row["telemetry_before"]["nvml"] in (True, False)
    assert record["copy_bandwidth"]["bytes_per_s"] > 0
    assert record["load"]["at_end"] is not None


# ------------------------------------------------------------------------------ kernel_profile
def test_kernel_profile_runs_rows_once_and_profiles_the_host(capsys):
    from benchmarks import kernel_profile

    common = ["--device", "cpu", "--impl", "cpu", "--preset", "tiny", "--batch", "1", "--frames", "4"]
    assert kernel_profile.main(common + ["--once"]) == 0
    out = capsys.readouterr().out
    assert out.count("ran once") == 4 and "cpu-encode-attn-fwd+bwd-cpu-tiny-B1xT4" in out
    assert kernel_profile.main(common + ["--host-profile", "3", "--op", "encode-attn", "--mode", "fwd+bwd"]) == 0
    out = capsys.readouterr().out
    # cProfile of this thread, then torch.profiler's ops (the backward's among them)
    assert "function calls" in out and "vtok::encode_backward" in out


def test_kernel_profile_pins_a_triton_config():
    pytest.importorskip("triton")
    from benchmarks import kernel_profile
    from vtok_kernels.backends.triton import configs

    with kernel_profile.pinned_configs(["stream=8,BLOCK_N=64,BLOCK_D=128", "attn_fwd=4,BLOCK_N=16,num_stages=3",
                                        "mean_fwd=1,BLOCK_N=16,BLOCK_D=128,CHUNK_G=4,maxnreg=240"]):
        stream, attn, mean = (configs.pinned(kind) for kind in ("stream", "attn_fwd", "mean_fwd"))
        assert (stream.num_warps, stream.num_stages, stream.kwargs) == (8, 2, {"BLOCK_N": 64, "BLOCK_D": 128})
        assert (attn.num_warps, attn.num_stages, attn.kwargs) == (4, 3, {"BLOCK_N": 16})
        assert attn.maxnreg is None and stream.maxnreg is None
        assert (mean.num_warps, mean.maxnreg, mean.kwargs) == (1, 240, {"BLOCK_N": 16, "BLOCK_D": 128, "CHUNK_G": 4})
    assert all(configs.pinned(kind) is None for kind in ("stream", "attn_fwd", "mean_fwd"))
