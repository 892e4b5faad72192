"""Turns pytest-benchmark JSON from the suite into the committed records, tables and plots.

    python -m benchmarks.records BENCH.json [BENCH.json ...]   # add records, regenerate the rest
    python -m benchmarks.records                               # regenerate from the records only

For each device in the input it writes, under ``benchmarks/results/``:

* ``<device>-<date>.json``: the record: machine, versions, load, copy bandwidth, and one row per
  benchmark (median/min/mean time, GB/s, fraction of the copy bandwidth, peak memory, telemetry);
* ``<device>-<date>.md``: every row as a markdown table;
* ``<device>-<date>.png``: achieved GB/s against the copy-bandwidth roofline per implementation
  and shape, and peak memory against the eager reference;
* ``host-<device>-<date>.json`` and ``.md`` from the rows of ``benchmarks/test_bench_host.py``:
  the host time of one call per dispatch path (no roofline: nothing worth moving).

A run at a scale other than the device's default (``--bench-scale cpu-large``) is a record of its
own, ``<device>-<date>-<scale>.*``, with a table of its own in ``README-table.md``.

From all records in the folder it regenerates ``README-table.md`` (the summary README.md
includes, with the token-economy tables of ``benchmarks/token_economy.py`` appended) and ``vtok_kernels/_measured_order.py``, the table ``backend="auto"`` reads
(``vtok_kernels.selection``): per device kind and op, the backends from fastest to slowest.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SELECTION_MODULE = ROOT / "vtok_kernels" / "_measured_order.py"
SCHEMA = 1
BACKENDS = ("cuda", "triton", "cpu", "torch")  # the names "auto" can pick; the rest are baselines
BASELINES = ("reference", "compile", "naive", "compile-naive")
VARIANTS = ("cuda-warps",)  # a second design of a backend (benchmarks/cases.py VARIANTS): measured, never picked
IMPL_ORDER = BACKENDS[:1] + VARIANTS + BACKENDS[1:] + BASELINES
OP_ORDER = ("encode-mean", "encode-attn", "encode_varlen", "expand")
# the op of vtok_kernels.selection that each row measures
SELECTION_OP = {"encode-mean": "encode", "encode-attn": "encode", "encode_varlen": "encode_varlen",
                "expand": "expand"}


# ----------------------------------------------------------------------------------- record
def slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_label(kind: str, machine: dict) -> tuple[str, str]:
    """(name, file slug) of the device a record's rows ran on."""
    vtok = machine.get("vtok", {})
    if kind == "cuda":
        name = (vtok.get("gpu") or {}).get("name") or "cuda"
        return name, slug(name)
    host = vtok.get("host_at_end") or vtok.get("host_at_start") or {}
    cpu = host.get("cpu") or machine.get("cpu", {}).get("brand_raw") or "cpu"
    threads = host.get("torch_threads")
    name = f"{cpu} ({threads} threads)" if threads else cpu
    return name, slug(f"cpu {cpu}") + (f"-{threads}t" if threads else "")


def _row(bench: dict) -> dict:
    info, stats = bench["extra_info"], bench["stats"]
    row = {k: info[k] for k in (
        "op", "pool", "mode", "impl", "device", "preset", "preset_description", "grid", "channels",
        "num_heads", "batch", "frames", "video_frames", "dtype", "scale", "timer", "bytes_moved",
        "copy_gb_per_s", "peak_memory_bytes", "peak_memory_method", "first_call_s", "threads",
        "telemetry_before", "telemetry_after") if k in info}
    row.update({
        "name": bench["name"],
        "median_s": stats["median"],
        "min_s": stats["min"],
        "mean_s": stats["mean"],
        "stddev_s": stats["stddev"],
        "iqr_s": stats["iqr"],
        "rounds": stats["rounds"],
    })
    row["gb_per_s"] = info["bytes_moved"] / stats["median"] / 1e9
    row["roofline_fraction"] = row["gb_per_s"] / info["copy_gb_per_s"]
    # the best round: on a shared machine the one least disturbed by other work
    row["roofline_fraction_best"] = info["bytes_moved"] / stats["min"] / 1e9 / info["copy_gb_per_s"]
    return row


def _record_of(data: dict, kind: str, rows: list[dict], schema) -> dict:
    """A record of ``rows`` measured on device ``kind``: the run's machine, versions, load, date."""
    machine = data.get("machine_info", {})
    vtok = machine.get("vtok", {})
    name, file_slug = device_label(kind, machine)
    return {
        "schema": schema,
        "device": {"kind": kind, "name": name, "slug": file_slug},
        "date": (data.get("datetime") or vtok.get("finished") or "unknown")[:10],
        "datetime": data.get("datetime"),
        "versions": vtok.get("versions", {}),
        "git_commit": vtok.get("git_commit") or data.get("commit_info", {}).get("id"),
        "scale": vtok.get("scale", {}).get(kind),
        "copy_bandwidth": vtok.get("copy_bandwidth", {}).get(kind),
        "load": {
            "at_start": (vtok.get("host_at_start") or {}).get("load_average"),
            "at_end": (vtok.get("host_at_end") or {}).get("load_average"),
            "uptime_at_end": vtok.get("uptime_at_end"),
            "cpu_count": (vtok.get("host_at_end") or {}).get("cpu_count"),
        },
        "gpu": vtok.get("gpu") if kind == "cuda" else None,
        "machine": {k: machine.get(k) for k in ("node", "machine", "system", "release", "python_version")},
        "cpu": (machine.get("cpu") or {}).get("brand_raw"),
        "cpu_l3_bytes": (machine.get("cpu") or {}).get("l3_cache_size"),
        "rows": rows,
    }


def records_from_benchmark_json(data: dict) -> list[dict]:
    """One record per device kind found in a pytest-benchmark JSON of the suite."""
    rows_by_kind = defaultdict(list)
    for bench in data.get("benchmarks", []):
        if "op" not in bench.get("extra_info", {}):
            continue  # not a row of this suite
        rows_by_kind[bench["extra_info"]["device"]].append(_row(bench))
    return [_record_of(data, kind, sorted(rows, key=_row_key), SCHEMA)
            for kind, rows in sorted(rows_by_kind.items())]


# ------------------------------------------------------------------------------ host records
# benchmarks/test_bench_host.py: the host time of one call at a tiny shape, per dispatch path.
HOST_SCHEMA = "host-1"
HOST_PATHS = ("eager", "ops")


def host_records_from_benchmark_json(data: dict) -> list[dict]:
    """One host-time record per device kind found in a pytest-benchmark JSON."""
    rows_by_kind = defaultdict(list)
    for bench in data.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench["stats"]
        if "host_op" not in info:
            continue
        rows_by_kind[info["device"]].append({
            "op": info["host_op"], **{k: info[k] for k in ("mode", "impl", "path", "shape", "dtype", "timer", "threads")},
            "name": bench["name"], "median_s": stats["median"], "min_s": stats["min"], "iqr_s": stats["iqr"],
            "rounds": stats["rounds"]})
    order = lambda row: (row["impl"], OP_ORDER.index(row["op"]), row["mode"], HOST_PATHS.index(row["path"]))  # noqa: E731
    records = []
    for kind, rows in sorted(rows_by_kind.items()):
        record = _record_of(data, kind, sorted(rows, key=order), HOST_SCHEMA)
        record["cpu_l3_bytes"] = None  # no row moves data worth caching
        records.append(record)
    return records


def host_markdown(record: dict) -> str:
    """Both dispatch paths of each op side by side."""
    shape = "×".join(str(n) for n in record["rows"][0]["shape"]) if record["rows"] else ""
    lines = [f"# vtok_kernels host time per call: {record['device']['name']}", ""]
    lines += record_header(record)
    lines += ["", f"benchmarks/test_bench_host.py: one call of the API at x = [{shape}] "
              f"({record['rows'][0]['dtype'] if record['rows'] else ''}), host clock, kernels not awaited. "
              "`eager`: the API's default path (one torch.autograd.Function around the backend); `ops`: the "
              "torch.library ops (`VTOK_EAGER_FUNCTIONS=0`). Medians of each row's rounds.", "",
              "| backend | op | mode | eager µs | ops µs | eager / ops |", "|---|---|---|---:|---:|---:|"]
    paired = defaultdict(dict)
    for row in record["rows"]:
        paired[(row["impl"], row["op"], row["mode"])][row["path"]] = row["median_s"]
    for (impl, op, mode), times in paired.items():
        eager, ops = times.get("eager"), times.get("ops")
        cell = lambda t: f"{t * 1e6:.1f}" if t else "-"  # noqa: E731
        ratio = f"{eager / ops:.2f}" if eager and ops else "-"
        lines.append(f"| {impl} | {op} | {mode} | {cell(eager)} | {cell(ops)} | {ratio} |")
    return "\n".join(lines) + "\n"


def _row_key(row: dict):
    impl = IMPL_ORDER.index(row["impl"]) if row["impl"] in IMPL_ORDER else len(IMPL_ORDER)
    op = OP_ORDER.index(row["op"]) if row["op"] in OP_ORDER else len(OP_ORDER)
    return (row["preset"], row["frames"], row["batch"], row["dtype"], op, row["mode"], impl)


# The scales a device runs by default (benchmarks/cases.py DEFAULT_SCALE) name no file; a record
# of another scale carries it in its name and gets a table of its own.
DEFAULT_SCALES = (None, "cpu", "gpu")


def record_stem(record: dict) -> str:
    scale = record.get("scale")
    suffix = "" if scale in DEFAULT_SCALES else f"-{scale}"
    return f"{record['device']['slug']}-{record['date']}{suffix}"


def load_records(folder: Path = RESULTS) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA and "rows" in data:
            records.append(data)
    return records


# ----------------------------------------------------------------------------------- tables
def _shape(row: dict) -> tuple:
    return (row["preset"], row["batch"], row["frames"], row["dtype"])


def _configs(rows: Iterable[dict]) -> dict:
    """(op, mode, preset, batch, frames, dtype) -> {impl: row}."""
    configs: dict = defaultdict(dict)
    for row in rows:
        configs[(row["op"], row["mode"]) + _shape(row)][row["impl"]] = row
    return configs


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _mb(nbytes: Optional[int]) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "–" if not a or not b else f"{a / b:.1f}×"


def _load_line(record: dict) -> str:
    load = record.get("load") or {}
    parts = []
    if load.get("at_start") is not None:
        parts.append(f"load average at start {', '.join(f'{v:.2f}' for v in load['at_start'])}")
    if load.get("at_end") is not None:
        parts.append(f"at end {', '.join(f'{v:.2f}' for v in load['at_end'])}")
    if load.get("cpu_count"):
        parts.append(f"on {load['cpu_count']} cores")
    return "; ".join(parts)


def record_header(record: dict) -> list[str]:
    versions = record.get("versions") or {}
    bw = record.get("copy_bandwidth") or {}
    lines = [
        f"Device: **{record['device']['name']}** ({record['device']['kind']}), {record.get('datetime') or record['date']}, "
        f"scale `{record.get('scale')}`, commit `{(record.get('git_commit') or 'unknown')[:10]}`.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
    ]
    if bw:
        lines.append(f"Copy bandwidth measured in the same run (the roofline): "
                     f"{bw['bytes_per_s'] / 1e9:.1f} GB/s (best of {bw.get('repeats')}; median "
                     f"{bw['median_bytes_per_s'] / 1e9:.1f} GB/s).")
    l3 = record.get("cpu_l3_bytes")
    if record["device"]["kind"] == "cpu" and l3:
        largest = max((r["bytes_moved"] for r in record["rows"]), default=0)
        lines.append(f"The CPU reports {l3 / 2**20:,.0f} MiB of last-level cache and the largest row moves "
                     f"{largest / 2**20:,.0f} MiB: inputs can stay cached between rounds, which the roofline "
                     f"copy (2 × {(bw.get('buffer_bytes') or 0) / 2**20:,.0f} MiB) cannot, so a fraction above "
                     f"100% means cache-resident data, not a faster-than-memory kernel.")
    load = _load_line(record)
    if load:
        lines.append(f"Host: {load}. Wall-clock rows share the machine with whatever else ran.")
    return lines


def record_markdown(record: dict) -> str:
    """Every row of one record: one table per op and mode."""
    lines = [f"# vtok_kernels benchmarks: {record['device']['name']}", ""]
    lines += record_header(record)
    lines += ["", "Times are medians (min: the best round). GB/s = bytes the op must move "
              "(benchmarks/roofline.py) / median time; roofline = GB/s / copy bandwidth (best: at the "
              "min time). Peak = memory one call allocates above its inputs.", ""]
    configs = _configs(record["rows"])
    by_op = defaultdict(list)
    for key in configs:
        by_op[key[:2]].append(key)
    for op_mode in sorted(by_op, key=lambda k: (OP_ORDER.index(k[0]) if k[0] in OP_ORDER else 99, k[1])):
        lines += [f"## {op_mode[0]} {op_mode[1]}", "",
                  "| shape | impl | time ms | min ms | GB/s | roofline | best | peak MB | vs reference | vs compile | first call s | rounds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in sorted(by_op[op_mode], key=lambda k: k[2:]):
            impls = configs[key]
            ref = impls.get("reference", {}).get("median_s")
            comp = impls.get("compile", {}).get("median_s")
            preset, batch, frames, dtype = key[2:]
            for impl in sorted(impls, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else 99):
                row = impls[impl]
                lines.append(
                    f"| {preset} B{batch}×T{frames} {dtype} | {impl} | {_ms(row['median_s'])} | "
                    f"{_ms(row['min_s'])} | {row['gb_per_s']:.1f} | {row['roofline_fraction']:.0%} | "
                    f"{row['roofline_fraction_best']:.0%} | {_mb(row.get('peak_memory_bytes'))} | "
                    f"{_ratio(ref, row['median_s'])} | {_ratio(comp, row['median_s'])} | "
                    f"{row.get('first_call_s', float('nan')):.2f} | {row['rounds']} |"
                )
        lines.append("")
    return "\n".join(lines)


def _best_backend(impls: dict) -> Optional[dict]:
    candidates = [r for i, r in impls.items() if i in BACKENDS]
    return min(candidates, key=lambda r: r["median_s"]) if candidates else None


def readme_table(records: list[dict]) -> str:
    """The summary README.md includes: per device and scale (the latest record of each), op, mode
    and shape, the fastest backend against the eager reference and torch.compile of it."""
    latest = {}
    for record in records:
        key = (record["device"]["slug"], record.get("scale"))
        if key not in latest or (record.get("datetime") or record["date"]) > (latest[key].get("datetime") or latest[key]["date"]):
            latest[key] = record
    lines = ["<!-- generated by `python -m benchmarks.records` from benchmarks/results/*.json -->", ""]
    if not latest:
        return "\n".join(lines + ["No benchmark record yet.", ""])
    for record in sorted(latest.values(), key=lambda r: (r["device"]["kind"] != "cuda", r["device"]["name"],
                                                         r.get("scale") not in DEFAULT_SCALES, str(r.get("scale")))):
        scale = record.get("scale")
        title = record["device"]["name"] + ("" if scale in DEFAULT_SCALES else f", scale `{scale}`")
        lines += [f"### {title}", ""]
        lines += record_header(record)
        lines += ["",
                  "| op | pass | shape | fastest backend | ms | roofline (best) | reference ms | compile ms | naive ms | compile-naive ms | speed-up vs fastest baseline | peak MB: backend / reference / naive |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        configs = _configs(record["rows"])
        # Where the compiled baselines ran only at some frame counts, the table keeps those
        # shapes, so that a line compares against every baseline measured for its op. The record's own table has
        # every row.
        compiled_shapes = {k[2:] for k, v in configs.items() if "compile" in v or "compile-naive" in v}
        shown = [k for k in configs if k[2:] in compiled_shapes] or list(configs)
        keys = sorted(shown, key=lambda k: (
            OP_ORDER.index(k[0]) if k[0] in OP_ORDER else 99, k[1], k[2:]))
        for key in keys:
            impls = configs[key]
            best = _best_backend(impls)
            if best is None:
                continue
            base = {name: impls[name]["median_s"] for name in BASELINES if name in impls}
            fastest_base = min(base.values()) if base else None
            peaks = " / ".join(_mb(impls[name].get("peak_memory_bytes")) if name in impls else "–"
                               for name in (best["impl"], "reference", "naive"))
            preset, batch, frames, dtype = key[2:]
            lines.append(
                f"| {key[0]} | {key[1]} | {preset} B{batch}×T{frames} {dtype} | {best['impl']} | "
                f"{_ms(best['median_s'])} | {best['roofline_fraction']:.0%} ({best['roofline_fraction_best']:.0%}) | "
                + " | ".join(_ms(base.get(name)) for name in BASELINES)
                + f" | {_ratio(fastest_base, best['median_s'])} | {peaks} |"
            )
        stem = record_stem(record)
        lines += ["", f"All rows: [`{stem}.md`](benchmarks/results/{stem}.md); plot: "
                  f"[`{stem}.png`](benchmarks/results/{stem}.png).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- selection
def measured_order(records: list[dict]) -> dict:
    """{kind: {op: [backend, ...]}}: backends ordered by the geometric mean, over every measured
    configuration (shape, pass, GPU), of their time over the fastest backend's time in that
    configuration. Baselines are not backends and are left out."""
    ratios: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in records:
        if record.get("scale") == "tiny":
            continue  # shapes that time the Python overhead, not the kernels
        kind = record["device"]["kind"]
        for key, impls in _configs(record["rows"]).items():
            timed = {i: r["median_s"] for i, r in impls.items() if i in BACKENDS and r["median_s"] > 0}
            if not timed:
                continue
            best = min(timed.values())
            for impl, seconds in timed.items():
                ratios[kind][SELECTION_OP.get(key[0], key[0])][impl].append(seconds / best)

    def order(per_impl: dict) -> list[str]:
        score = {i: math.exp(sum(map(math.log, r)) / len(r)) for i, r in per_impl.items()}
        return sorted(score, key=lambda i: (score[i], IMPL_ORDER.index(i)))

    return {kind: {op: order(per) for op, per in sorted(ops.items())} for kind, ops in sorted(ratios.items())}


def selection_module(records: list[dict]) -> str:
    table = measured_order(records)
    sources = sorted(f"{record_stem(r)}.json" for r in records)
    return (
        '"""Backends per device and op, fastest first, as the committed benchmark records measured them.\n\n'
        "Generated by ``python -m benchmarks.records`` from benchmarks/results/*.json; do not edit.\n"
        '"""\n'
        f"SOURCES = {json.dumps(sources, indent=4)}\n\n"
        "# device kind (\"cpu\", \"cuda\") -> op -> backends, fastest first\n"
        f"BY_KIND = {json.dumps(table, indent=4, sort_keys=True)}\n"
    )


# ------------------------------------------------------------------------------------- plot
def plot(record: dict, path: Path) -> None:
    """Two rows of panels per op and mode: GB/s per implementation and shape with the copy
    bandwidth as a line, then peak memory per implementation and shape (log scales: the eager
    reference is orders of magnitude away from the kernels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = _configs(record["rows"])
    panels = sorted({k[:2] for k in configs}, key=lambda k: (OP_ORDER.index(k[0]) if k[0] in OP_ORDER else 99, k[1]))
    impls = [i for i in IMPL_ORDER if any(i in v for v in configs.values())]
    colors = dict(zip(BACKENDS + BASELINES, ("#1f77b4", "#9467bd", "#2ca02c", "#8c564b", "#7f7f7f", "#ff7f0e",
                                             "#bcbd22", "#d62728")), **{"cuda-warps": "#17becf"})
    cols = min(4, len(panels))
    panel_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(2 * panel_rows, cols, figsize=(4.6 * cols, 3.6 * 2 * panel_rows), squeeze=False)
    bandwidth = (record.get("copy_bandwidth") or {}).get("bytes_per_s")
    for p, op_mode in enumerate(panels):
        ax_bw = axes[2 * (p // cols)][p % cols]
        ax_mem = axes[2 * (p // cols) + 1][p % cols]
        shapes = sorted({k[2:] for k in configs if k[:2] == op_mode})
        present = [i for i in impls if any(i in configs[op_mode + shape] for shape in shapes)]
        width = 0.8 / max(1, len(present))
        for j, impl in enumerate(present):
            xs, gbs, mems = [], [], []
            for s, shape in enumerate(shapes):
                row = configs[op_mode + shape].get(impl)
                if row is not None:
                    xs.append(s + (j - (len(present) - 1) / 2) * width)
                    gbs.append(row["gb_per_s"])
                    mems.append(max(row.get("peak_memory_bytes") or 0, 1) / 2**20)
            ax_bw.bar(xs, gbs, width, label=impl, color=colors.get(impl))
            ax_mem.bar(xs, mems, width, label=impl, color=colors.get(impl))
        labels = [f"{s[0]}\nB{s[1]}×T{s[2]}" for s in shapes]
        for ax in (ax_bw, ax_mem):
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3, which="both")
        if bandwidth:
            ax_bw.axhline(bandwidth / 1e9, color="k", linestyle="--", linewidth=1, label="copy bandwidth")
        ax_bw.set_title(f"{op_mode[0]} {op_mode[1]}: GB/s", fontsize=9)
        ax_mem.set_title(f"{op_mode[0]} {op_mode[1]}: peak MB", fontsize=9)
    for p in range(len(panels), panel_rows * cols):
        axes[2 * (p // cols)][p % cols].axis("off")
        axes[2 * (p // cols) + 1][p % cols].axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [i for i in impls if i in legend] + [l for l in legend if l not in impls]
    handles = [legend[l] for l in labels]
    fig.suptitle(f"vtok_kernels on {record['device']['name']} ({(record.get('datetime') or record['date'])[:16]})",
                 fontsize=11, y=0.995)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main
def write_record(record: dict, folder: Path = RESULTS, with_plot: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = record_stem(record)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    paths[0].write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    paths[1].write_text(record_markdown(record))
    if with_plot:
        paths.append(folder / f"{stem}.png")
        plot(record, paths[-1])
    return paths


def write_host_record(record: dict, folder: Path = RESULTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"host-{record['device']['slug']}-{record['date']}"
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text(host_markdown(record))
    return paths


def regenerate(folder: Path = RESULTS, selection_path: Optional[Path] = SELECTION_MODULE) -> list[Path]:
    """README-table.md (and the selection table) from every record in ``folder``."""
    records = load_records(folder)
    readme = folder / "README-table.md"
    text = readme_table(records)
    for economy in sorted(folder.glob("token-economy-*.md")):  # from benchmarks/token_economy.py
        text += "\n### Token economy\n\n" + economy.read_text()
    readme.write_text(text)
    written = [readme]
    if selection_path is not None:
        selection_path.write_text(selection_module(records))
        written.append(selection_path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.records", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=Path, help="pytest-benchmark JSON files of the suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the records")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--missing-ok", action="store_true",
                        help="skip an input that does not exist (a benchmark job stopped before writing it)")
    parser.add_argument("--no-selection", action="store_true",
                        help="do not rewrite vtok_kernels/_measured_order.py")
    args = parser.parse_args(argv)
    written = []
    for path in args.inputs:
        if args.missing_ok and not path.exists():
            print(f"{path}: not written (its run was cut): skipped", file=sys.stderr)
            continue
        data = json.loads(path.read_text())
        records, host = records_from_benchmark_json(data), host_records_from_benchmark_json(data)
        if not records and not host:
            print(f"{path}: no row of the vtok suites", file=sys.stderr)
            return 1
        for record in records:
            written += write_record(record, args.results, with_plot=not args.no_plot)
        for record in host:
            written += write_host_record(record, args.results)
    written += regenerate(args.results, None if args.no_selection else SELECTION_MODULE)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
