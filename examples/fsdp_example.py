"""Training with FSDP2 (``torch.distributed.fsdp.fully_shard``): VTokEncoder and a transformer,
parameters sharded over the ranks, bfloat16 compute, float32 gradient reduction.

On GPUs, one process per GPU:

    torchrun --nproc_per_node=8 examples/fsdp_example.py --steps 20

``--device cpu`` runs the same code on CPU processes with gloo (for a smoke test without GPUs:
``torchrun --nproc_per_node=2 examples/fsdp_example.py --device cpu``).

The tokenizer's parameters (attention query, g_phi, key projection, type embeddings) form one
FSDP unit, each transformer layer another. Inside ``VTokEncoder.forward`` the parameters are
unsharded plain tensors in the compute dtype, so the fused op sees a bfloat16 query and bfloat16
features, accumulates in float32 and returns bfloat16 tokens; its gradient to the query flows
back into FSDP's reduce-scatter like any other.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import FrozenPatchEncoder, VideoClassifier, moving_squares  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-rank", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")

    torch.manual_seed(0)  # every rank builds the same initial model; FSDP shards it
    vision_encoder = FrozenPatchEncoder().to(device)  # frozen, small: replicated, not sharded
    model = VideoClassifier(backend=args.backend).to(device)
    compute_dtype = torch.bfloat16
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    fully_shard(model.tokenizer, mp_policy=policy)
    for layer in model.transformer.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the head and whatever is left
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    # Each rank draws its own videos.
    generator = torch.Generator().manual_seed(1 + rank)
    for step in range(args.steps):
        frames, labels = moving_squares(args.batch_per_rank, args.frames, generator=generator)
        frames, labels = frames.to(device), labels.to(device)
        features = vision_encoder(frames).to(compute_dtype)  # [B, T, H, W, C]
        logits = model(features)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean_loss.item() / world_size:.4f}")

    # A full (unsharded) state dict on rank 0, e.g. to save a checkpoint.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        print(f"tokenizer query {tuple(state['tokenizer.query'].shape)}, {len(state)} tensors in the full state dict")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
