"""Runs every op of the cuda backend once on small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_driver.py [--loader NAME]

Small shapes cover every kernel instantiation the launchers pick: each dtype, mean / attn,
spatial key tokens, frames_per_token > 1, per-video keys, T = 1, varlen, expand, the 16-byte
and the scalar (misaligned) paths, forward and backward. Sizes are odd on purpose so that a
block's last rows and lanes are partial. Exits non-zero on the first error.
"""
from __future__ import annotations

import argparse
import os
import sys

# Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access
# past a tensor's end instead of landing in a neighbour of the same pool block.
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402


def _features(shape, dtype, offset=0):
    storage = torch.randn(shape[:-1] + (shape[-1] + offset,), device="cuda").to(dtype)
    return storage[..., offset:]


def run(loader: str | None) -> int:
    if loader:
        os.environ["VTOK_CUDA_LOADER"] = loader
    from vtok_kernels.backends import get

    cuda = get("cuda")
    reason = cuda.unavailable_reason("cuda")
    if reason is not None:
        print(f"cuda backend unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"loader: {os.environ.get('VTOK_CUDA_LOADER') or cuda.loader}")
    cases = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for pool, heads, C in (("mean", 1, 48), ("attn", 3, 48), ("attn", 1, 40)):
            for offset in (0, 1):  # 1: misaligned rows, the scalar path
                for spatial, grid, fpt, T in (([], [], 1, 5), ([2, 3], [3, 5], 2, 6), ([], [], 1, 1)):
                    x = _features((2, T, 15, C), dtype, offset)
                    keys = torch.tensor([0, T - 1], device="cuda")
                    query = torch.randn(C, device="cuda") if pool == "attn" else None
                    seq, lse, *kept = cuda.encode_fwd(x, keys, query, pool, heads, fpt, spatial, grid)
                    grad = torch.randn_like(seq)
                    cuda.encode_bwd(grad, x, keys, query, seq, lse, pool, heads, fpt, spatial, grid, *kept)
                    torch.cuda.synchronize()
                    cases += 1
                    print(f"case {cases} done", flush=True)
                # varlen: one-frame video in the middle, keys at both ends
                lengths = [3, 1, 4]
                x = _features((sum(lengths), 15, C), dtype, offset)
                cu_frames = torch.tensor([0, 3, 4, 8], device="cuda")
                keys = torch.tensor([2, 0, 0], device="cuda")
                groups = [max(t - 1, 0) for t in lengths]
                cu_tokens = torch.tensor([0, 15 + groups[0], 30 + groups[0] + groups[1], 45 + sum(groups)],
                                         device="cuda")
                query = torch.randn(C, device="cuda") if pool == "attn" else None
                seq, lse, *kept = cuda.encode_varlen_fwd(x, cu_frames, cu_tokens, keys, query, pool, heads, 1,
                                                         [], [], max(lengths), 45 + sum(groups))
                cuda.encode_varlen_bwd(torch.randn_like(seq), x, cu_frames, cu_tokens, keys, query, seq, lse,
                                       pool, heads, 1, [], [], max(lengths), *kept)
                torch.cuda.synchronize()
                cases += 1
                print(f"case {cases} done", flush=True)
        for offset in (0, 1):
            for T, fpt in ((7, 2), (1, 1)):
                G = 0 if T == 1 else -(-(T - 1) // fpt)
                key_tokens = _features((2, 13, 40), dtype, offset)
                residual = _features((2, G, 40), dtype, offset)
                keys = torch.tensor([0, T - 1], device="cuda")
                frames = cuda.expand_fwd(key_tokens, residual, keys, T, fpt)
                cuda.expand_bwd(torch.randn_like(frames), keys, G, fpt)
                torch.cuda.synchronize()
                cases += 1
                print(f"case {cases} done", flush=True)
    print(f"{cases} cases ran")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", choices=("extension", "cupy-nvrtc"), default=None)
    args = parser.parse_args()
    return run(args.loader)


if __name__ == "__main__":
    sys.exit(main())
