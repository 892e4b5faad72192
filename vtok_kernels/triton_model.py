"""The Triton kernels in the sass-report's model: their machine code, read without a GPU, and the
same Little's-law estimate as the CUDA kernels' (``machine_code``), for the same presets.

For each preset the triton backend's own launchers run on meta tensors with recorders in place
of the kernels (``compile_check.record_triton_launches``): every launch's arguments, grid and the
config it runs with autotuning off (the default of its list, the one
``torch.use_deterministic_algorithms(True)`` takes too; the autotuner may pick another).
Each launched kernel is compiled for sm_90a at the specialisation those arguments give
(``compile_check``), its cubin read with ``cuobjdump``: registers, shared memory, resident
programs per SM (blocks of 32 x num_warps threads) and the bytes a thread keeps in flight in its
hot loop (``machine_code.hot_loop``). Its bytes come from :func:`kernel_traffic`, which follows
``backends/triton/encode.py`` and ``attention.py``; ``machine_code.estimate_kernel`` turns both
into a time. The assumptions are the CUDA model's (``machine_code.ASSUMPTIONS``), but for the
block size, and the grad_query reduction after the attention backward: a few small torch ops,
not counted.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import tempfile
from typing import Optional, Sequence

from vtok_kernels import machine_code as mc

ARCH = "sm_90a"

ASSUMPTIONS = (
    "triton: each launch runs the default config of its list (autotuning off); a program is a "
    "block of 32 x num_warps threads",
    "triton: the attention backward's grad_query reduction (torch sums over per-program partials, "
    "kilobytes) is not counted",
)


def kernel_code(launch: dict, arch: str = ARCH) -> mc.KernelCode:
    """The machine code of one recorded launch (compile_check.record_triton_launches)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vtok_kernels import compile_check

    kernel, config = launch["kernel"], launch["config"]
    warps, stages = ((config.num_warps, config.num_stages) if config is not None
                     else compile_check.direct_options(launch["values"]))
    blocks = dict(config.kwargs) if config is not None else {}
    signature, constexprs, attrs = compile_check._specialised_signature(
        kernel, launch["values"], {**launch["constexprs"], **blocks})
    capability = int(arch.split("_")[1].rstrip("a"))
    maxnreg = config.maxnreg if config is not None else None
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": warps, "num_stages": stages,
                                       **({"maxnreg": maxnreg} if maxnreg else {})})
    cuobjdump = mc.find_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError(f"triton model: {mc.unavailable_reason()}")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    functions = mc.parse_sass(sass)
    name = compiled.metadata.name
    items = functions.get(name) or next(iter(functions.values()))
    usage = mc.parse_res_usage(res).get(name, {})
    registers = usage.get("registers", 0)
    # Triton's shared memory is dynamic (reductions, layout conversions): the metadata has it.
    shared = int(getattr(compiled.metadata, "shared", 0)) + usage.get("shared_bytes", 0)
    occupancy = mc.blocks_per_sm(registers, shared, arch, threads=32 * warps)
    counts = mc.memory_counts(items)
    hot = mc.hot_loop(items)
    label = compile_check._config_label(blocks, warps, stages, maxnreg)
    return mc.KernelCode(
        name=f"{kernel.fn.__name__}[{label}]", kernel=kernel.fn.__name__, config=label,
        default=True, arch=arch, registers=registers, shared_bytes=shared,
        local_bytes=usage.get("local_bytes", 0), stack_bytes=usage.get("stack_bytes", 0),
        loads=counts["loads"], stores=counts["stores"], ldl=counts["ldl"], stl=counts["stl"],
        loads_back_to_back=mc.max_loads_back_to_back(items),
        blocks_per_sm=occupancy["blocks"], occupancy_limit=occupancy["by"],
        instructions=sum(isinstance(i, mc.Instruction) for i in items), **mc.hot_fields(hot))


def kernel_traffic(launch: dict) -> mc.Traffic:
    """Bytes of one recorded launch (batched, non-spatial, one frame per token: the presets),
    from its arguments and grid, following the kernels' code."""
    v, grid = launch["values"], launch["grid"]
    name = launch["kernel"].fn.__name__
    if name == "attn_delta_kernel":
        # one (group, head) per program: its head's channels of grad r and of the float32 r
        rows, channels = v["residual_ptr"].shape
        grad_bytes = rows * channels * v["grad_seq_ptr"].element_size()
        return mc.Traffic({"grad_sequence.residual": grad_bytes, "residual32": rows * channels * 4},
                          {"delta": rows * int(v["NUM_HEADS"]) * 4}, 0,
                          grad_bytes + rows * channels * 4)
    T, S, G = (int(v[k]) for k in ("T", "S", "G"))
    # The attention combine has no N, and its channels as heads x head size.
    N = int(v.get("N", 0))
    C = int(v["C"]) if "C" in v else int(v["NUM_HEADS"]) * int(v["HEAD_DIM"])
    # Videos on grid axis 0; the mean forward has each video's chunks of groups there too.
    chunks = 1
    if name in ("mean_fwd_kernel", "attn_fwd_kernel"):
        chunks = max(1, math.ceil(int(v["MAX_GROUPS"]) / launch["config"].kwargs["CHUNK_G"]))
    B = grid[0] // chunks
    features = next(v[k] for k in ("x_ptr", "grad_seq_ptr", "out_ptr") if k in v)
    e = features.element_size()
    x_key, x_rest = B * N * C * e, B * (T - 1) * N * C * e
    seq_keys, seq_res = B * S * C * e, B * G * C * e
    heads = int(v.get("NUM_HEADS", 1))
    stats = B * G * heads * 4  # one float per (group, head): lse, or a partial's max or sum
    config = launch["config"].kwargs if launch["config"] is not None else {}
    splits = grid[1]
    blocks_per_frame = math.ceil(N / config["BLOCK_N"]) if "BLOCK_N" in config else 0
    if name in ("mean_fwd_kernel", "attn_fwd_kernel"):
        # Each chunk of a video reads the key frame's tiles (from L2 after the first); a
        # chunk's group states stay in registers and are stored once (attention: with a max
        # and a sum per head).
        attn = name == "attn_fwd_kernel"
        partials = splits * B * G * C * 4 + (2 * splits * stats if attn else 0)
        reads = {"x.rest": x_rest, "x.key": x_key, **({"query": C * 4} if attn else {})}
        writes = {"partials": partials, **({"sequence.keys": seq_keys} if v["WRITE_KEY"] else {})}
        # every program reads its head's query (from L2 after the first)
        rereads = (chunks - 1) * x_key + (math.prod(grid) * C * 4 // heads - C * 4 if attn else 0)
        return mc.Traffic(reads, writes, rereads, x_rest + x_key + rereads)
    if name == "combine_kernel":
        partials = int(v["NUM_PARTS"]) * B * G * C * 4
        return mc.Traffic({"partials": partials}, {"sequence.residual": seq_res}, 0, partials)
    if name == "attn_combine_kernel":
        parts = int(v["NUM_PARTS"])
        partials = parts * B * G * C * 4 + 2 * parts * stats
        # each split's maxima are read twice (the maximum, then the merge)
        rereads = parts * stats
        writes = {"sequence.residual": seq_res, "lse": stats}
        if v.get("KEEP_RESIDUAL32"):
            writes["residual32"] = B * G * C * 4
        return mc.Traffic({"partials": partials}, writes, rereads, partials + rereads)
    if name == "mean_bwd_kernel":
        # grad r of each group once per patch block, the key tokens' gradient once
        reads = {"grad_sequence.residual": seq_res, "grad_sequence.keys": seq_keys}
        rereads = (blocks_per_frame - 1) * seq_res
        return mc.Traffic(reads, {"grad_x": B * T * N * C * e}, rereads,
                          seq_res + seq_keys + rereads)
    if name == "attn_bwd_kernel":
        reads = {"x.rest": x_rest, "x.key": x_key, "grad_sequence.residual": seq_res,
                 "grad_sequence.keys": seq_keys, "lse": stats, "delta": stats, "query": C * 4}
        # grad r of each group, and its lse and delta, once per patch block of a split
        blocks = math.ceil(N / splits / config["BLOCK_N"]) * splits
        rereads = (blocks - 1) * (seq_res + 2 * stats)
        writes = {"grad_x": B * T * N * C * e, "partials.grad_query": B * splits * C * 4}
        return mc.Traffic(reads, writes, rereads, x_rest + x_key + seq_res + rereads)
    raise ValueError(f"no traffic model for the triton kernel {name}")


def model_rows(presets: Sequence[str] = mc.MODEL_PRESETS,
               dtypes: Sequence[str] = mc.MODEL_DTYPES, batch: int = mc.MODEL_BATCH,
               frames: int = mc.MODEL_FRAMES, sms: int = mc.H100_SMS) -> list[dict]:
    """One row per (op, mode, preset, dtype) for the triton backend, in the CUDA rows' format
    (``impl`` "triton"), the kernels behind each estimate under ``kernels``."""
    import torch

    from vtok_kernels import compile_check

    cases = mc._cases()
    codes: dict = {}
    rows = []
    for preset_name in presets:
        preset = cases.PRESETS[preset_name]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for op in mc.MODEL_OPS:
                pool = "attn" if op == "encode-attn" else "mean"
                launches = compile_check.record_triton_launches(
                    preset.num_patches, preset.channels, pool, preset.num_heads, dtype,
                    batch=batch, frames=frames, sms=sms)
                passes: dict = {"fwd": [], "bwd": []}
                resident = {"fwd": set(), "bwd": set()}
                for launch in launches:
                    key = (launch["kernel"].fn.__name__, tuple(sorted(
                        (k, str(v)) for k, v in launch["constexprs"].items())),
                        str(launch["config"]), str(dtype), _specialisation(launch))
                    if key not in codes:
                        codes[key] = kernel_code(launch)
                    code = codes[key]
                    threads = 32 * (launch["config"].num_warps if launch["config"] is not None
                                    else compile_check.direct_options(launch["values"])[0])
                    record = mc.Launch(code.name, launch["grid"], threads, {})
                    passes[launch["pass"]].append(mc.estimate_kernel(
                        record, code, kernel_traffic(launch), resident[launch["pass"]], sms))
                for mode in mc.MODEL_MODES:
                    used = ["fwd"] if mode == "fwd" else ["fwd", "bwd"]
                    estimates = [k for name in used for k in passes[name]]
                    seconds = sum(k.time_us for k in estimates) / 1e6
                    moved = cases.Case(op, mode, "triton", preset, frames, batch, dtype,
                                       "cuda").bytes_moved()
                    element = torch.empty(0, dtype=dtype).element_size()
                    x_bytes = batch * frames * preset.num_patches * preset.channels * element
                    gbps = moved / seconds / 1e9
                    rows.append({
                        "impl": "triton", "op": op, "mode": mode, "preset": preset_name,
                        "dtype": dtype_name, "batch": batch, "frames": frames,
                        "num_heads": preset.num_heads if pool == "attn" else 1,
                        "bytes_moved": moved, "x_bytes": x_bytes, "predicted_us": seconds * 1e6,
                        "predicted_gb_per_s": gbps, "fraction_of_copy": gbps * 1e9 / mc.COPY_BANDWIDTH,
                        "l2_bytes": sum(k.l2_bytes for k in estimates),
                        "hbm_bytes": sum(k.hbm_bytes for k in estimates),
                        "kernels": [dict(dataclasses.asdict(k), grid=list(k.grid), **{"pass": name})
                                    for name in used for k in passes[name]],
                    })
    return rows


def _specialisation(launch: dict) -> str:
    """What of a launch's integer arguments decides its compile (Triton's rule): 1, or a
    multiple of 16."""
    parts = []
    for name, value in launch["values"].items():
        if isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{name}:{'1' if value == 1 else 'D' if value % 16 == 0 else ''}")
    return ",".join(parts)


def available() -> Optional[str]:
    """None when the model can run here, else why not (no triton, or no cuobjdump)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return mc.unavailable_reason()


def compile_check_launches(preset: str, pool: str, dtype: str = "bfloat16") -> list[dict]:
    """The recorded launches of one benchmark preset (machine_code's batch and frames)."""
    from vtok_kernels import compile_check

    spec = mc._cases().PRESETS[preset]
    return compile_check.record_triton_launches(
        spec.num_patches, spec.channels, pool, spec.num_heads, dtype,
        batch=mc.MODEL_BATCH, frames=mc.MODEL_FRAMES, sms=mc.H100_SMS)


def snapshot(presets: Sequence[str], dtypes: Sequence[str]) -> dict:
    """The model rows, and per preset, pool and dtype each launch's kernel, grid, machine code
    and traffic: what tests and the report read (JSON-ready)."""
    launches_out = []
    for preset in presets:
        for dtype in dtypes:
            for pool in ("mean", "attn"):
                for launch in compile_check_launches(preset, pool, dtype):
                    traffic = kernel_traffic(launch)
                    launches_out.append({
                        "preset": preset, "dtype": dtype, "pool": pool, "pass": launch["pass"],
                        "kernel": launch["kernel"].fn.__name__, "grid": list(launch["grid"]),
                        "code": kernel_code(launch).row(), "traffic": dataclasses.asdict(traffic)})
    return {"rows": model_rows(presets, dtypes), "launches": launches_out}


def snapshot_anywhere(presets: Sequence[str], dtypes: Sequence[str]) -> dict:
    """:func:`snapshot`, from a fresh process when this one runs the Triton interpreter (whose
    kernels cannot be compiled); with the triton version that made it."""
    import json
    import sys

    import triton

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return {**snapshot(presets, dtypes), "triton": triton.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.json")
        env = dict(os.environ, TRITON_INTERPRET="0")
        subprocess.run([sys.executable, "-m", "vtok_kernels.triton_model", "--preset",
                        ",".join(presets), "--dtype", ",".join(dtypes), "--json", out],
                       env=env, check=True, capture_output=True)
        with open(out) as handle:
            return {**json.load(handle), "triton": triton.__version__}


def distinct_codes(data: dict) -> list[mc.KernelCode]:
    """The machine code of each distinct kernel of a snapshot, as KernelCode rows."""
    seen, codes = set(), []
    for launch in data["launches"]:
        code = launch["code"]
        if code["name"] not in seen:
            seen.add(code["name"])
            fields = {**code, "loads": {int(k): v for k, v in code["loads"].items()},
                      "stores": {int(k): v for k, v in code["stores"].items()}}
            codes.append(mc.KernelCode(**fields))
    return sorted(codes, key=lambda c: (c.kernel, c.config))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m vtok_kernels.triton_model",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=",".join(mc.MODEL_PRESETS))
    parser.add_argument("--dtype", default=",".join(mc.MODEL_DTYPES))
    parser.add_argument("--json", help="write the rows and each launch's code and traffic here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Compiling needs real JIT functions (see compile_check.main).
        env = dict(os.environ, TRITON_INTERPRET="0")
        forwarded = list(argv) if argv is not None else sys.argv[1:]
        return subprocess.run([sys.executable, "-m", "vtok_kernels.triton_model", *forwarded],
                              env=env).returncode
    reason = available()
    if reason is not None:
        print(f"triton model: {reason}", file=sys.stderr)
        return 1
    data = snapshot(args.preset.split(","), args.dtype.split(","))
    print(mc.summary_table(data["rows"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
