"""Autotune configs of the Triton kernels, and a way to pin one (tests, compile-check).

On a GPU every kernel is autotuned over the configs of its list that fit it, keyed on (N, C,
num_heads): the mean forward's and the stream kernels' lists; attention has one config per
band of head sizes, launched without tuning. Under ``TRITON_INTERPRET=1`` each list is cut to
one small block that still exercises the masking (N and C not multiples of the block) so CI
stays fast.

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
    _config(1, maxnreg=128, BLOCK_N=8, BLOCK_D=128, CHUNK_G=4),
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

# Attention pooling, forward: as the mean forward (one warp, lanes along the channels, CHUNK_G
# groups' states in registers), the channels of a program being one head, in one or two
# power-of-two blocks (attention.head_blocks); one config per band of head widths, as the
# backward's below.
_FWD_HEAD_64 = _config(1, maxnreg=128, BLOCK_N=16, CHUNK_G=4)
_FWD_HEAD_128 = _config(1, maxnreg=136, BLOCK_N=8, CHUNK_G=4)
_FWD_TWO_BLOCKS = _config(1, maxnreg=72, BLOCK_N=4, CHUNK_G=4)
_FWD_WIDE = _config(1, maxnreg=160, BLOCK_N=4, CHUNK_G=4)
_FWD_WIDER = _config(1, maxnreg=224, BLOCK_N=2, CHUNK_G=2)
_FWD_WIDEST = _config(1, maxnreg=255, BLOCK_N=1, CHUNK_G=1)
ATTN_FWD_BANDS = [
    (_FWD_HEAD_64, 0, 64, "pow2"),
    (_FWD_HEAD_128, 64, 128, "pow2"),
    (_FWD_TWO_BLOCKS, 0, 96, "other"),
    (_FWD_WIDE, 128, 256, "pow2"),
    (_FWD_WIDE, 96, 256, "other"),
    (_FWD_WIDER, 256, 512, "any"),
    (_FWD_WIDEST, 512, None, "any"),
]
ATTN_FWD_CONFIGS = [_FWD_HEAD_64, _FWD_HEAD_128, _FWD_TWO_BLOCKS, _FWD_WIDE, _FWD_WIDER,
                    _FWD_WIDEST]

# The backward: one warp per program, lanes along the head's channels (attention.attn_bwd_kernel),
# and one config per band of head widths (its two blocks together, attention.head_blocks): the
# rows per tile and the registers that the band's widest head needs in float32 without a spill
# (compile-check); heads of two blocks need more than powers of two, their tiles being laid out
# differently. maxnreg, as for the mean forward, sets the programs resident per SM on which the
# launcher sizes the splits (for narrower heads of a band, an upper bound). One config per
# head: nothing to tune. Bands: (config, heads wider than, heads up to (None: any), which heads:
# "pow2", "other" (two blocks) or "any").
_BWD_ROWS_8 = _config(1, maxnreg=144, BLOCK_N=8)
_BWD_ROWS_4 = _config(1, maxnreg=144, BLOCK_N=4)
_BWD_ROWS_4_WIDE = _config(1, maxnreg=224, BLOCK_N=4)
_BWD_ROWS_2 = _config(1, maxnreg=224, BLOCK_N=2)
_BWD_ROWS_1 = _config(1, maxnreg=224, BLOCK_N=1)
ATTN_BWD_BANDS = [
    (_BWD_ROWS_8, 0, 64, "pow2"),
    (_BWD_ROWS_4, 64, 128, "pow2"),
    (_BWD_ROWS_4, 0, 96, "other"),
    (_BWD_ROWS_4_WIDE, 128, 256, "pow2"),
    (_BWD_ROWS_4_WIDE, 96, 256, "other"),
    (_BWD_ROWS_2, 256, 512, "any"),
    (_BWD_ROWS_1, 512, None, "any"),
]
ATTN_BWD_CONFIGS = [_BWD_ROWS_8, _BWD_ROWS_4, _BWD_ROWS_4_WIDE, _BWD_ROWS_2, _BWD_ROWS_1]

# Interpreter: blocks smaller than the test shapes (N = 7..13, C = 12..48) so that several
# patch and channel blocks, and their masked tails, are exercised.
INTERPRET_STREAM = _config(1, num_stages=1, BLOCK_N=8, BLOCK_D=16)
# Several patch blocks per split and several chunks of 2 groups per video at the test shapes.
INTERPRET_MEAN_FWD = _config(1, num_stages=1, BLOCK_N=4, BLOCK_D=16, CHUNK_G=2)
INTERPRET_ATTN = _config(1, num_stages=1, BLOCK_N=8)
INTERPRET_ATTN_FWD = _config(1, num_stages=1, BLOCK_N=4, CHUNK_G=2)

CONFIG_LISTS = {
    "mean_fwd": MEAN_FWD_CONFIGS,
    "stream": STREAM_CONFIGS,
    "attn_fwd": ATTN_FWD_CONFIGS,
    "attn_bwd": ATTN_BWD_CONFIGS,
}


def fits(kind: str, config: triton.Config, block_d: int) -> bool:
    """Whether ``config`` runs a ``kind`` kernel with ``block_d`` channels per program (for
    attention, the head's two blocks together): the attention kernels, whose channel blocks
    are fixed by the head size, have a config per band of heads (ATTN_FWD_BANDS,
    ATTN_BWD_BANDS); the others run any of theirs."""
    bands = {"attn_fwd": ATTN_FWD_BANDS, "attn_bwd": ATTN_BWD_BANDS}.get(kind)
    return bands is None or _in_band(bands, config, block_d)


def _in_band(bands: list, config: triton.Config, block_d: int) -> bool:
    """Whether ``config`` is one of ``bands``' configs for heads of ``block_d`` channels."""
    heads_kind = "pow2" if block_d & (block_d - 1) == 0 else "other"
    return any(band is config and block_d > wider and (widest is None or block_d <= widest)
               and heads in (heads_kind, "any")
               for band, wider, widest, heads in bands)


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
        interpreted = {"mean_fwd": INTERPRET_MEAN_FWD, "attn_fwd": INTERPRET_ATTN_FWD,
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
