"""Autotune configs of the Triton kernels, and a way to pin one (tests, compile-check).

On a GPU every kernel is autotuned over its list, keyed on (N, C, num_heads); under
``TRITON_INTERPRET=1`` each list is cut to its first entry, a small block that still exercises
the masking (N and C not multiples of the block) so CI stays fast.

The first config of each list is its *default*: compile-check fails when a default spills.
``VTOK_TRITON_AUTOTUNE=0``, or ``torch.use_deterministic_algorithms(True)``, runs the default
(the first that fits the head) everywhere, with no benchmarking: the same bits in every process
(see autotuning), and for the GPU proof's correctness checks hundreds of new shapes at one
compile each instead of a compile and a benchmark per config.
The choice of lists follows ``benchmarks/results/compile-check-*.txt``: no config there spills.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import triton

from vtok_kernels.backends import triton_interpreted


def _config(num_warps: int, num_stages: int = 2, maxnreg: Optional[int] = None,
            **blocks: int) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages,
                         maxnreg=maxnreg)


# Mean pooling's forward: one warp per program, lanes along the channels (16 bytes each), the
# rows of a tile in registers, so a frame's sum over patches needs no shared memory nor barrier
# (encode.mean_fwd_kernel). maxnreg pins the registers, hence the programs resident per SM, on
# which the launcher sizes the patch splits to whole waves (resident_programs): float32 tiles
# need the most (compile-check fails on a spill); 16-bit ones take 80-100% of it.
MEAN_FWD_CONFIGS = [
    _config(1, maxnreg=120, BLOCK_N=8, BLOCK_D=128, CHUNK_G=4),
    _config(1, maxnreg=64, BLOCK_N=4, BLOCK_D=128, CHUNK_G=4),
    _config(1, maxnreg=168, BLOCK_N=8, BLOCK_D=128, CHUNK_G=8),
    _config(1, maxnreg=240, BLOCK_N=16, BLOCK_D=128, CHUNK_G=4),
    _config(1, maxnreg=240, BLOCK_N=8, BLOCK_D=256, CHUNK_G=4),
]

# Expand and mean pooling's backward: a program owns a (patch block, channel block) tile and
# streams the video's frames through it; 8-16 KiB of fp32 per tile keeps the key tile and the
# accumulator in registers while the frame loop keeps enough loads in flight.
STREAM_CONFIGS = [
    _config(8, BLOCK_N=32, BLOCK_D=128),
    _config(4, BLOCK_N=16, BLOCK_D=128),
    _config(4, BLOCK_N=32, BLOCK_D=64),
    _config(4, BLOCK_N=8, BLOCK_D=256),
    _config(8, BLOCK_N=16, BLOCK_D=256),
]

# Attention pooling: the channels of a program are one head (in two power-of-two blocks set by
# the launcher, attention.head_blocks), so only the patch block and the warps are tuned. The
# largest tile that fits comes first (the default): more bytes of a frame in flight at once.
ATTN_FWD_CONFIGS = [
    _config(4, BLOCK_N=32),
    _config(4, BLOCK_N=16),
    _config(8, BLOCK_N=16),
    _config(8, BLOCK_N=64),
    _config(4, BLOCK_N=8),
]

# The backward holds two more tiles (the key frame's gradient and the residual's gradient)
# than the forward, hence fewer tile elements per thread and per program.
ATTN_BWD_CONFIGS = [
    _config(8, BLOCK_N=16),
    _config(4, BLOCK_N=16),
    _config(4, BLOCK_N=8),
    _config(8, BLOCK_N=8),
]

# Interpreter: blocks smaller than the test shapes (N = 7..13, C = 12..48) so that several
# patch and channel blocks, and their masked tails, are exercised.
INTERPRET_STREAM = _config(1, num_stages=1, BLOCK_N=8, BLOCK_D=16)
# Several patch blocks per split and several chunks of 2 groups per video at the test shapes.
INTERPRET_MEAN_FWD = _config(1, num_stages=1, BLOCK_N=4, BLOCK_D=16, CHUNK_G=2)
INTERPRET_ATTN = _config(1, num_stages=1, BLOCK_N=8)

CONFIG_LISTS = {
    "mean_fwd": MEAN_FWD_CONFIGS,
    "stream": STREAM_CONFIGS,
    "attn_fwd": ATTN_FWD_CONFIGS,
    "attn_bwd": ATTN_BWD_CONFIGS,
}


# Attention pooling: the most tile elements (BLOCK_N x head channels) per thread, and per
# program, that stay in registers. From the compile-check report: beyond these, ptxas (with
# the --regAllocOptLevel=2 that Triton passes) spills.
ATTN_TILE_LIMITS = {"attn_fwd": (32, None), "attn_bwd": (16, 2304)}

# (kind, head channels, BLOCK_N, num_warps) within those limits where ptxas still spills a
# few bytes on triton 3.6 or 3.9, sm_80 or sm_90, at the presets' specialisation
# (compile-check, which fails on a spill of any config that survives this pruning).
KNOWN_SPILLS = {
    ("attn_fwd", 64, 16, 4), ("attn_fwd", 72, 8, 4), ("attn_fwd", 72, 64, 8),
    ("attn_fwd", 128, 16, 8), ("attn_fwd", 144, 16, 4),
    ("attn_bwd", 64, 16, 4), ("attn_bwd", 64, 8, 4), ("attn_bwd", 64, 8, 8),
    ("attn_bwd", 72, 8, 4),
}


def fits(kind: str, config: triton.Config, block_d: int) -> bool:
    """Whether ``config`` keeps the tiles of a ``kind`` kernel with ``block_d`` channels per
    program (for attention, the head's two blocks together) in registers; only the attention
    kernels, whose channel blocks are fixed by the head size, need the check."""
    if kind not in ATTN_TILE_LIMITS:
        return True
    if (kind, block_d, config.kwargs["BLOCK_N"], config.num_warps) in KNOWN_SPILLS:
        return False
    per_thread, per_program = ATTN_TILE_LIMITS[kind]
    elements = config.kwargs["BLOCK_N"] * block_d
    if per_program is not None and elements > per_program:
        return False
    return elements // (32 * config.num_warps) <= per_thread


def survivors(kind: str, config_list: list[triton.Config],
              block_d: Optional[int]) -> list[triton.Config]:
    """What of ``config_list`` can run a channel block of ``block_d`` (None: the stream kernels,
    whose block is tuned): the configs that fit, or, when none does, the smallest tile per thread
    (the fewest registers). The autotuner's pruning and the default config both come from here."""
    if block_d is None:
        return list(config_list)
    chosen = [c for c in config_list if fits(kind, c, block_d)]
    return chosen or [min(config_list, key=lambda c: c.kwargs["BLOCK_N"] / c.num_warps)]


def holding(config_list: list[triton.Config], meta: dict) -> triton.Config:
    """The config of ``config_list`` whose meta-parameters ``meta`` holds (what a grid function
    gets from the autotuner: a launch's arguments and its config's parameters, not its warps
    or registers). The configs of a list differ in their parameters (a test checks it)."""
    return next(c for c in config_list
                if all(meta.get(name) == value for name, value in c.kwargs.items()))


def head_width(meta: dict) -> Optional[int]:
    """Channels per program fixed by the launch (the attention kernels' head blocks), or None
    where the config's BLOCK_D sets them."""
    if "BLOCK_HI" not in meta:
        return None
    return meta["BLOCK_HI"] + meta["BLOCK_LO"]


def pruner(kind: str):
    """``early_config_prune`` hook of triton.autotune for kernels of family ``kind``."""

    def prune(config_list, named_args, **kwargs):
        return survivors(kind, config_list, head_width({**named_args, **kwargs}))

    return prune


def autotuning() -> bool:
    """False when ``VTOK_TRITON_AUTOTUNE=0`` or ``torch.use_deterministic_algorithms(True)``:
    every launch takes its default config (the first that fits) without benchmarking: no
    compile of the other configs, no device sync on a new shape, and the same config, hence the
    same bits, in every process.

    Why the config decides the bits: the patch block (BLOCK_N) sets how many programs split a
    frame and so the order in which their partials merge, and the tile and warp count set the
    order of Triton's in-block reductions (in-thread, then across lanes, then across warps).
    Processes or DDP ranks whose autotuners timed differently may pick different configs and
    round differently; a fixed rule takes the timing out of the choice."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return os.environ.get("VTOK_TRITON_AUTOTUNE", "1") not in ("0", "false", "no")


def default(kind: str, block_d: Optional[int]) -> triton.Config:
    """The config a ``kind`` kernel runs when autotuning is off."""
    return survivors(kind, active(kind), block_d)[0]


def active(kind: str) -> list[triton.Config]:
    """The configs a kernel of family ``kind`` is autotuned over in this process."""
    if triton_interpreted():
        interpreted = {"mean_fwd": INTERPRET_MEAN_FWD, "attn_fwd": INTERPRET_ATTN,
                       "attn_bwd": INTERPRET_ATTN}
        return [interpreted.get(kind, INTERPRET_STREAM)]
    return CONFIG_LISTS[kind]


# Per SM on the GPUs Triton runs on (sm_80 and later): 64K registers; blocks and threads
# resident at most, by compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability"); others as sm_80.
SM_REGISTERS = 65536
SM_RESIDENT_LIMITS = {(8, 6): (16, 1536), (8, 7): (16, 1536), (8, 9): (24, 1536),
                      (8, 0): (32, 2048), (9, 0): (32, 2048)}


def resident_programs(config: triton.Config, capability: tuple = (9, 0)) -> int:
    """Programs of ``config`` resident per SM at once, from its pinned registers (maxnreg,
    allocated per warp in units of 256), warps and the SM's limits on blocks and threads. A
    config without maxnreg counts as 255 registers: a lower bound."""
    blocks, threads = SM_RESIDENT_LIMITS.get(tuple(capability), SM_RESIDENT_LIMITS[(8, 0)])
    registers = -(-(config.maxnreg or 255) // 8) * 8
    warp_threads = 32 * config.num_warps
    return max(1, min(blocks, threads // warp_threads,
                      SM_REGISTERS // (registers * warp_threads)))


_PINNED: dict[str, triton.Config] = {}


def pinned(kind: str) -> Optional[triton.Config]:
    return _PINNED.get(kind)


@contextlib.contextmanager
def pin(kind: str, config: triton.Config) -> Iterator[None]:
    """Run the kernels of family ``kind`` with ``config`` instead of the autotuned choice."""
    previous = _PINNED.get(kind)
    _PINNED[kind] = config
    try:
        yield
    finally:
        if previous is None:
            _PINNED.pop(kind, None)
        else:
            _PINNED[kind] = previous
