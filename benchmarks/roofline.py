"""The memory roofline of the VTok ops: the bytes each op must move, and the copy bandwidth of the
device it runs on, measured in the same run.

VTok encode is a reduction over the frame features: a kernel that reads x once and writes only the
tokens cannot beat (bytes it must move) / (bandwidth a plain copy reaches). The fraction of that
bound a kernel achieves is the number to compare across devices; the absolute GB/s is not.

"Must move" counts every input a kernel cannot avoid reading and every output it must write, once:

* encode forward: x (the frames that are read: a strided view reads only its own frames), the
  query, and the sequence [S+G, C] and lse [G, heads] written.
* encode backward: grad_sequence read and grad_x written; attention pooling also reads x again
  (the residuals are recomputed, never stored), the saved residual tokens and lse, and writes
  grad_query.
  Mean pooling needs no x: its gradient is grad_r / count on every residual.
* expand forward: key tokens and residual tokens read, frames [T, N, C] written; backward the
  reverse.

Varlen counts the same per video over the packed frames.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class EncodeShape:
    """One call of encode: ``num_frames`` per video (a list for varlen), N patches, C channels."""

    num_frames: tuple[int, ...]  # per video; batched encode repeats T B times
    num_patches: int  # N
    channels: int  # C
    element_size: int  # bytes per element of x (2 for float16 / bfloat16, 4 for float32)
    pool: str = "mean"
    num_heads: int = 1
    frames_per_token: int = 1
    num_key_tokens: Optional[int] = None  # S; None means N (no spatial pooling)

    @property
    def key_tokens(self) -> int:
        return self.num_patches if self.num_key_tokens is None else self.num_key_tokens

    def groups(self, t: int) -> int:
        return -(-max(t - 1, 0) // self.frames_per_token)

    @property
    def total_frames(self) -> int:
        return sum(self.num_frames)

    @property
    def total_groups(self) -> int:
        return sum(self.groups(t) for t in self.num_frames)

    @property
    def total_tokens(self) -> int:
        return len(self.num_frames) * self.key_tokens + self.total_groups


def encode_bytes(shape: EncodeShape, backward: bool = False) -> int:
    """Bytes an encode (batched or varlen) must move: forward, or forward and backward."""
    e, C = shape.element_size, shape.channels
    x = shape.total_frames * shape.num_patches * C * e
    sequence = shape.total_tokens * C * e
    attn = shape.pool == "attn"
    lse = shape.total_groups * shape.num_heads * FLOAT32_BYTES if attn else 0
    query = C * FLOAT32_BYTES if attn else 0
    forward = x + sequence + lse + query
    if not backward:
        return forward
    grad_sequence, grad_x = sequence, x
    backward_bytes = grad_sequence + grad_x
    if attn:
        # the residuals are recomputed from x; the saved residual tokens and lse are read, the
        # query read and grad_query written
        residual_tokens = shape.total_groups * C * e
        backward_bytes += x + residual_tokens + lse + 2 * query
    return forward + backward_bytes


def expand_bytes(batch: int, num_frames: int, num_patches: int, channels: int, element_size: int,
                 frames_per_token: int = 1, backward: bool = False) -> int:
    """Bytes expand must move: key tokens [B, N, C] and residual tokens [B, G, C] in, frames
    [B, T, N, C] out; the backward reads grad_frames and writes both token gradients."""
    G = -(-max(num_frames - 1, 0) // frames_per_token)
    tokens = batch * (num_patches + G) * channels * element_size
    frames = batch * num_frames * num_patches * channels * element_size
    forward = tokens + frames
    return forward + (frames + tokens if backward else 0)


# ---------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CudaEventTimer:
    """A pytest-benchmark timer that reads CUDA events instead of the host clock.

    pytest-benchmark calls the timer once before and once after the timed call and subtracts.
    The first call records a start event and returns 0; the second records an end event, waits
    for it and returns the elapsed device time in seconds. Nothing synchronises before the start
    event, so the kernels of an L2 flush queued just before keep the device busy while the host
    launches the timed call (as triton.testing.do_bench does): the launch gap is not counted.
    """

    def __init__(self) -> None:
        self._start: Optional[torch.cuda.Event] = None

    def __repr__(self) -> str:  # the name pytest-benchmark writes into the JSON
        return "CudaEventTimer()"

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if self._start is None:
            self._start = event
            return 0.0
        event.synchronize()
        elapsed = self._start.elapsed_time(event) / 1e3
        self._start = None
        return elapsed


class L2Flush:
    """Overwrites a buffer larger than the GPU's L2 cache so that a timed call starts cold, as
    triton.testing.do_bench does between its repetitions. A no-op on the CPU, whose caches are
    far smaller than any benchmarked input."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20) -> None:
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def wall_time(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of fn, each call synchronised; the first (warm-up) call is not counted."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def device_time(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of fn: CUDA events around each call with L2 flushed before it on a GPU,
    the host clock on the CPU."""
    if device.type != "cuda":
        return wall_time(fn, device, repeats)
    flush, timer = L2Flush(device), CudaEventTimer()
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        flush()
        timer()
        fn()
        times.append(timer())
    return times


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: Optional[int] = None) -> dict:
    """The bandwidth of ``dst.copy_(src)`` on ``device`` in bytes/s (read + write counted): the
    roofline that the benchmark rows are divided by.

    The buffer is far larger than the last-level cache (1 GiB on a GPU, 512 MiB on a CPU), so the
    copy streams from memory as the kernels do. The best of the repeats is the bandwidth the
    device can reach; the median is kept too.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (512 << 20)
    if repeats is None:
        repeats = 20 if device.type == "cuda" else 5
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = device_time(lambda: dst.copy_(src), device, repeats)
    moved = 2 * src.numel() * src.element_size()
    return {
        "bytes_per_s": moved / min(times),
        "median_bytes_per_s": moved / median(times),
        "buffer_bytes": src.numel() * src.element_size(),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
