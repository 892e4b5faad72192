"""What VTok saves downstream: tokens per video and the time of one attention layer over them.

    python -m benchmarks.token_economy [--device cuda] [--out benchmarks/results]

For each encoder grid and frame count: the tokens of naive frame sampling (every patch of every
frame, T*N) against VTok's (N key tokens + T-1 residual tokens), and the measured time of one
self-attention layer, ``torch.nn.functional.scaled_dot_product_attention`` (causal, batch 1), over
each sequence. The attention has the same width for every row (``--heads`` x ``--head-dim``,
default 16 x 64 = 1024, a language model's layer after the projector), so the rows differ only by
their token count.

Attention over L tokens costs O(L^2): on a CPU the naive sequences (9k to 66k tokens) take up to
minutes each. Sequences longer than ``--max-tokens`` (default 12,000 on the CPU, which runs the
16-frame CLIP and SigLIP sequences; no limit on a GPU) are not run; their time is estimated from
a run at ``--max-tokens`` tokens scaled by (L / max)^2 and printed with a leading "≈".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import cases, roofline
from benchmarks.records import slug
from vtok_kernels import telemetry

FRAMES = (16, 32, 64)
PRESETS = ("clip", "siglip", "vae")


def attention_seconds(tokens: int, heads: int, head_dim: int, device: torch.device,
                      dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of one causal SDPA call over ``tokens`` tokens (q, k, v: [1, heads, L, d])."""
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    times = roofline.device_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 device, repeats)
    return roofline.median(times)


def rows(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int,
         max_tokens: Optional[int], repeats: int, presets=PRESETS, frames=FRAMES) -> list[dict]:
    probe: dict[int, float] = {}

    def measure(tokens: int) -> tuple[float, bool]:
        if max_tokens is None or tokens <= max_tokens:
            return attention_seconds(tokens, heads, head_dim, device, dtype, repeats), True
        if max_tokens not in probe:
            probe[max_tokens] = attention_seconds(max_tokens, heads, head_dim, device, dtype, repeats)
        return probe[max_tokens] * (tokens / max_tokens) ** 2, False

    out = []
    for name in presets:
        preset = cases.PRESETS[name]
        N = preset.num_patches
        for T in frames:
            naive_tokens, vtok_tokens = T * N, N + T - 1
            naive_s, naive_measured = measure(naive_tokens)
            vtok_s, vtok_measured = measure(vtok_tokens)
            out.append({
                "preset": name, "description": preset.description, "frames": T,
                "naive_tokens": naive_tokens, "vtok_tokens": vtok_tokens,
                "token_ratio": naive_tokens / vtok_tokens,
                "naive_attention_s": naive_s, "naive_measured": naive_measured,
                "vtok_attention_s": vtok_s, "vtok_measured": vtok_measured,
                "attention_speedup": naive_s / vtok_s,
            })
    return out


def _time(seconds: float, measured: bool) -> str:
    prefix = "" if measured else "≈"
    if seconds >= 1:
        return f"{prefix}{seconds:,.1f} s"
    return f"{prefix}{seconds * 1e3:.3g} ms"


def markdown(table: list[dict], header: str) -> str:
    lines = [header, "",
             "| encoder grid (N × C) | frames | naive T·N | VTok N + T − 1 | ratio | attention, naive | attention, VTok | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(
            f"| {r['description']} | {r['frames']} | {r['naive_tokens']:,} | {r['vtok_tokens']:,} | "
            f"{r['token_ratio']:.1f}× | {_time(r['naive_attention_s'], r['naive_measured'])} | "
            f"{_time(r['vtok_attention_s'], r['vtok_measured'])} | {r['attention_speedup']:,.0f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.token_economy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="longest sequence actually run (default: 12000 on the CPU, all on a GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per sequence")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for token-economy-<device>.{md,json} (default: print only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_tokens = args.max_tokens if args.max_tokens is not None else (None if device.type == "cuda" else 12000)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    host = telemetry.host_info()
    table = rows(device, dtype, args.heads, args.head_dim, max_tokens, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{host['cpu']} ({host['torch_threads']} threads)"
    header = (
        f"One causal attention layer (`scaled_dot_product_attention`, {args.heads} heads × "
        f"{args.head_dim}, {str(dtype).replace('torch.', '')}, batch 1) over each video's tokens on "
        f"**{name}**, {started}; median of {repeats}. "
        + ("" if max_tokens is None else
           f"Sequences over {max_tokens:,} tokens were not run: ≈ marks a time scaled as (L / {max_tokens:,})² "
           f"from a run at {max_tokens:,} tokens. ")
        + f"Host load average at start: {', '.join(f'{v:.2f}' for v in host.get('load_average', []))}."
    )
    text = markdown(table, header)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "token-economy-" + (slug(name) if device.type == "cuda" else slug(f"cpu {host['cpu']}") + f"-{host['torch_threads']}t")
        (args.out / f"{stem}.md").write_text(text)
        record = {"device": name, "kind": device.type, "datetime": started, "dtype": str(dtype),
                  "heads": args.heads, "head_dim": args.head_dim, "max_tokens": max_tokens,
                  "repeats": repeats, "host": host, "torch": torch.__version__,
                  "gpu": telemetry.device_info() if device.type == "cuda" else None, "rows": table}
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(args.out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
