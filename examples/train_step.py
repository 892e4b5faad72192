"""A complete VTok training step: frozen vision encoder -> VTokEncoder -> transformer -> loss.

Runs on the CPU in seconds (``python examples/train_step.py``) and on a GPU as it is
(``--device cuda``: bfloat16 autocast, the fused CUDA/Triton kernels). Copy what you need:

* ``FrozenPatchEncoder`` stands in for SigLIP / CLIP: frames [B, T, 3, H*p, W*p] -> features
  [B, T, H, W, C], computed without gradients;
* ``VTokEncoder`` turns each video into S key tokens and T-1 residual tokens of the model width;
* a small transformer reads the tokens; the task (which way a square moves) needs the residual
  tokens, since a single frame cannot tell it.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

import vtok_kernels as vk

DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # right, left, down, up: the four class labels


class FrozenPatchEncoder(nn.Module):
    """A stand-in for a frozen ViT: a random patch embedding, and a position embedding weighted by
    each patch's brightness, so that, as in a real encoder's features, what is where shows in a
    patch's features (a plain additive position embedding would cancel in every residual)."""

    def __init__(self, patch: int = 4, channels: int = 64, grid: tuple[int, int] = (6, 6)):
        super().__init__()
        self.patch = patch
        self.patchify = nn.Conv2d(3, channels, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.randn(*grid, channels))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, T, 3, H*p, W*p] -> features [B, T, H, W, C]."""
        B, T = frames.shape[:2]
        frames = frames.flatten(0, 1)
        content = self.patchify(frames).permute(0, 2, 3, 1)  # [B*T, H, W, C]
        brightness = nn.functional.avg_pool2d(frames.mean(1, keepdim=True), self.patch)  # [B*T, 1, H, W]
        features = content + brightness.permute(0, 2, 3, 1) * self.position
        return features.unflatten(0, (B, T))


def moving_squares(batch: int, num_frames: int, size: int = 24, generator=None):
    """Videos of a bright square on noise, moving 2 pixels a frame in one of four directions.

    Returns frames [B, T, 3, size, size] and the direction labels [B] (int64)."""
    labels = torch.randint(0, len(DIRECTIONS), (batch,), generator=generator)
    frames = 0.1 * torch.randn(batch, num_frames, 3, size, size, generator=generator)
    start = torch.randint(6, size - 12, (batch, 2), generator=generator)
    for b in range(batch):
        dy, dx = DIRECTIONS[int(labels[b])]
        for t in range(num_frames):
            y, x = int(start[b, 0]) + 2 * dy * t, int(start[b, 1]) + 2 * dx * t
            frames[b, t, :, max(y, 0):max(y + 6, 0), max(x, 0):max(x + 6, 0)] += 1.0
    return frames, labels


class VideoClassifier(nn.Module):
    """VTokEncoder, then a small transformer over [key tokens ; residual tokens], then a head."""

    def __init__(self, channels: int = 64, width: int = 64, num_classes: int = len(DIRECTIONS),
                 backend: str = "auto"):
        super().__init__()
        self.tokenizer = vk.nn.VTokEncoder(
            channels, width, pool="attn", num_heads=4, spatial=(3, 3), key_index="first",
            backend=backend,
        )
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenizer(features)  # [B, 9 + T - 1, width]
        return self.head(self.transformer(tokens).mean(dim=1))


def train_step(batch, vision_encoder, model, optimizer, autocast_dtype=None) -> float:
    """One optimisation step on a batch of (frames, labels); returns the loss."""
    frames, labels = batch
    features = vision_encoder(frames)  # frozen: no graph, no gradient
    if autocast_dtype is not None:
        features = features.to(autocast_dtype)  # the tokenizer reads features in their dtype
    amp = torch.autocast(frames.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        logits = model(features)
        loss = nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="auto, torch, cpu, triton or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the model")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    vision_encoder = FrozenPatchEncoder().to(device)
    model = VideoClassifier(backend=args.backend).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if args.compile:
        model = torch.compile(model, fullgraph=True)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        frames, labels = moving_squares(args.batch, args.frames, generator=generator)
        loss = train_step((frames.to(device), labels.to(device)), vision_encoder, model, optimizer,
                          autocast_dtype)
        losses.append(loss)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss:.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s on {device}, "
          f"tokenizer backend {args.backend!r}")
    return losses


if __name__ == "__main__":
    main()
