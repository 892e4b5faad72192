"""Launching an autotuned kernel, or one pinned config of it, and knowing which config ran; and
the grid limits every launch of this backend stays within."""
from __future__ import annotations

from typing import Callable

import torch
import triton

from vtok_kernels.backends.triton import configs

AUTOTUNE_KEY = ["N", "C", "NUM_HEADS"]

# CUDA's grid limits: 2**31 - 1 programs along axis 0, 65535 along axes 1 and 2. Every launch
# puts the videos on axis 0 (expand's forward: videos x patch blocks); what could pass 65535 on
# axis 1 is folded: a long video's groups and the key tokens take several launches, patch-block
# splits are capped and strided. What is left bounded (channel blocks, one per head for
# attention, on axis 2) raises a ValueError before any launch.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


def grid_slots(count: int) -> int:
    """Programs along grid axis 1 or 2 for ``count`` items: one each while that fits the axis,
    beyond it each program takes every ``grid_slots``-th item."""
    return max(1, min(count, MAX_GRID_YZ))


def axis_chunks(count: int) -> list[tuple[int, int]]:
    """(first item, items) of each launch that covers ``count`` items along grid axis 1: one
    launch unless ``count`` passes what the axis holds. For the plain kernels, where a loop
    inside the program would cost registers (the attention combine at 1024 channels: 66 -> 120
    on sm_80) and a launch more costs nothing in the common case."""
    return [(first, min(MAX_GRID_YZ, count - first)) for first in range(0, count, MAX_GRID_YZ)]


def check_grid_axis(count: int, limit: int, what: str) -> None:
    """A ValueError that names the argument behind a grid axis past its limit (``what``), raised
    before any launch instead of a CUDA launch error."""
    if count > limit:
        raise ValueError(f"{what}: the triton backend would launch {count} programs along one "
                         f"grid axis, more than the {limit} CUDA allows there")


def autotuned(kernel, kind: str):
    # The mean kernels have no head count (Triton 3.9 refuses key names that are not arguments).
    key = [name for name in AUTOTUNE_KEY if name in kernel.arg_names]
    return triton.autotune(configs=configs.active(kind), key=key,
                           prune_configs_by={"early_config_prune": configs.pruner(kind)})(kernel)


def tuning_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """The key under which ``triton.runtime.autotuner.Autotuner.run`` (Triton 3.6 to 3.9) caches
    its choice in ``tuner.cache``: the values of the key arguments, then the dtype of every
    argument that has one, in argument order."""
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {name: value for name, value in named.items() if name in tuner.arg_names}
    key = [named[name] for name in tuner.keys if name in named]
    key += [str(value.dtype) for value in named.values() if hasattr(value, "dtype")]
    return tuple(key)


def _capturing() -> bool:
    # No stream captures before CUDA is initialised, and torch built without CUDA raises when
    # asked: the cheap check first.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def launch(kernel, tuner, kind: str, grid: Callable[[dict], tuple], *args, **kwargs) -> dict:
    """Runs ``kernel`` through its autotuner (or the pinned config) and returns the config's
    meta-parameters, which callers need when a buffer's layout depends on the block shape."""
    config = configs.pinned(kind)
    if config is None:
        if not configs.autotuning():
            config = configs.default(kind, configs.head_width(kwargs))
        else:
            survivors = configs.survivors(kind, configs.active(kind), configs.head_width(kwargs))
            # One config left: Triton 3.6's tuner would still benchmark it (a device sync and
            # several runs) on every new shape.
            if len(survivors) == 1:
                config = survivors[0]
    if config is None:
        # A new key makes the tuner benchmark, which synchronises: under CUDA-graph capture
        # that is an opaque CUDA error from inside Triton.
        if _capturing():
            key = tuning_key(tuner, args, kwargs)
            if key not in tuner.cache:
                shape = ", ".join(f"{name}={value}" for name, value in zip(tuner.keys, key))
                raise RuntimeError(
                    f"triton backend: {getattr(kernel, '__name__', kind)} is called for a shape "
                    f"its autotuner has not seen ({shape}, dtypes {list(key[len(tuner.keys):])}) "
                    f"while a CUDA graph is being captured; tuning benchmarks its configs, a "
                    f"device synchronisation that capture forbids. Call it once eagerly with "
                    f"this shape before capturing, or set VTOK_TRITON_AUTOTUNE=0 (or "
                    f"torch.use_deterministic_algorithms(True)) to launch the default configs "
                    f"without benchmarking.")
        tuner[grid](*args, **kwargs)
        config = tuner.best_config
    else:
        options = {"maxnreg": config.maxnreg} if config.maxnreg is not None else {}
        kernel[grid(config.kwargs)](*args, **kwargs, **config.kwargs, **options,
                                    num_warps=config.num_warps, num_stages=config.num_stages)
    return dict(config.kwargs)
