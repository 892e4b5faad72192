"""VTokEncoder under DistributedDataParallel and under FSDP2 (fully_shard): two CPU processes
(gloo on loopback) train on the two halves of each global batch and end with the same parameters
as one process training on the whole batch. Gradients reach every parameter through the fused op's registered backward, so DDP's
all-reduce hooks see them as they see any other gradient."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vtok_kernels as vk
from tests.test_convergence import moving_pattern_features
from tests.utils import assert_close

WORLD_SIZE = 2
STEPS = 4
VIDEOS_PER_RANK = 2
# Every backend that runs on the CPU without the Triton interpreter (too slow for a spawn test).
BACKENDS = [b for b in ("cpu", "torch") if b in vk.available_backends("cpu")]


def _model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    encoder = vk.nn.VTokEncoder(16, 12, pool="attn", num_heads=2, frames_per_token=2, spatial=(1, 2),
                                key_index="medoid", backend=backend)
    with torch.no_grad():
        encoder.query.normal_(0, 1.0)
        encoder.type_embedding.normal_(0, 0.1)
    return nn.Sequential(encoder, nn.Flatten(1), nn.LazyLinear(1, dtype=torch.float32))


def _batches():
    generator = torch.Generator().manual_seed(3)
    return [moving_pattern_features(WORLD_SIZE * VIDEOS_PER_RANK, 5, generator) for _ in range(STEPS)]


def _train(model: nn.Module, batches, rows: slice) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for features, velocity in batches:
        prediction = model(features[rows]).squeeze(-1)
        loss = nn.functional.mse_loss(prediction, velocity[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _materialise(model: nn.Module, batches) -> None:
    with torch.no_grad():
        model(batches[0][0][:1])  # LazyLinear takes its input width from a first call


def _train_fsdp2(backend: str, batches, rows: slice) -> dict:
    """FSDP2 (fully_shard), float32: the tokenizer one unit, the root the rest. Returns the
    gathered full state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = _model(backend)
    _materialise(model, batches)
    fully_shard(model[0])
    fully_shard(model)
    _train(model, batches, rows)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def _worker(rank: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    vk.backends.POISON_OUTPUTS = True
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        batches = _batches()
        rows = slice(rank * VIDEOS_PER_RANK, (rank + 1) * VIDEOS_PER_RANK)
        results = {}
        for backend in BACKENDS:
            model = _model(backend)
            _materialise(model, batches)
            ddp = nn.parallel.DistributedDataParallel(model)
            _train(ddp, batches, rows)
            results["ddp", backend] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            results["fsdp2", backend] = _train_fsdp2(backend, batches, rows)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_and_fsdp2_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    batches = _batches()
    runs = [(wrapper, backend) for backend in BACKENDS for wrapper in ("ddp", "fsdp2")]
    assert set(per_rank[0]) == set(runs)
    for wrapper, backend in runs:
        single = _model(backend)
        _materialise(single, batches)
        initial = {k: v.clone() for k, v in single.state_dict().items()}
        _train(single, batches, slice(None))
        for name, expected in single.state_dict().items():
            assert not torch.equal(expected, initial[name]), f"{name} did not train"
            for rank in range(WORLD_SIZE):
                assert_close(per_rank[rank][wrapper, backend][name], expected, torch.float32,
                             f"{wrapper} {backend}: rank {rank} {name}")
