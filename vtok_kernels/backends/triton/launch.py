"""Launching an autotuned kernel, or one pinned config of it, and knowing which config ran."""
from __future__ import annotations

from typing import Callable

import triton

from vtok_kernels.backends.triton import configs

AUTOTUNE_KEY = ["N", "C", "NUM_HEADS"]


def autotuned(kernel, kind: str):
    return triton.autotune(configs=configs.active(kind), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": configs.pruner(kind)})(kernel)


def launch(kernel, tuner, kind: str, grid: Callable[[dict], tuple], *args, **kwargs) -> dict:
    """Runs ``kernel`` through its autotuner (or the pinned config) and returns the config's
    meta-parameters, which callers need when a buffer's layout depends on the block shape."""
    config = configs.pinned(kind)
    if config is None and not configs.autotuning():
        config = configs.default(kind, kwargs.get("BLOCK_D"))
    if config is None:
        tuner[grid](*args, **kwargs)
        config = tuner.best_config
    else:
        kernel[grid(config.kwargs)](*args, **kwargs, **config.kwargs,
                                    num_warps=config.num_warps, num_stages=config.num_stages)
    return dict(config.kwargs)
