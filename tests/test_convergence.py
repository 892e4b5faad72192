"""Small convergence runs (Liger-Kernel's test/convergence): 20 training steps of a tiny video
model on synthetic moving-pattern videos give the same loss curve with every kernel backend as
with the "torch" reference backend, and the loss goes down."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import vtok_kernels as vk
from vtok_kernels import backends
from tests.utils import backend_device

STEPS = 20
# The Triton interpreter runs kernels about a thousand times slower than a GPU: on the CPU the
# triton backend trains the first INTERPRETED_STEPS steps of the same curve.
INTERPRETED_STEPS = 4
GRID = (2, 3)
CHANNELS = 16
PATCH_VALUES = 4  # "pixels" per patch before the frozen embedding


def moving_pattern_features(num_videos: int, num_frames: int, generator: torch.Generator,
                            grid: tuple[int, int] = GRID, channels: int = CHANNELS):
    """Features of synthetic videos: a random pattern of patch values, embedded by a fixed random
    patch embedding, and a bump of brightness that travels across the patch grid at a per-video
    velocity, seen through a position embedding (so where the bump is shows in the features).

    Returns features [num_videos, num_frames, H, W, C] and each video's velocity [B] in patches
    per frame, in [-1, 1]: the regression target. Seeded by ``generator`` alone, so two runs see
    the same videos.
    """
    H, W = grid
    embed = torch.randn(PATCH_VALUES, channels, generator=torch.Generator().manual_seed(7))
    position = torch.randn(W, channels, generator=torch.Generator().manual_seed(8))
    velocity = torch.rand(num_videos, generator=generator) * 2 - 1
    start = torch.rand(num_videos, 1, 1, 1, generator=generator) * W
    columns = torch.arange(W, dtype=torch.float32).reshape(1, 1, 1, W)
    frames = torch.arange(num_frames, dtype=torch.float32).reshape(1, num_frames, 1, 1)
    centre = start + velocity.reshape(-1, 1, 1, 1) * frames  # [B, T, 1, 1]
    bump = torch.exp(-(columns - centre).square()).expand(-1, -1, H, -1)  # [B, T, H, W]
    pattern = torch.randn(num_videos, 1, H, W, PATCH_VALUES, generator=generator) @ embed
    moving = bump.unsqueeze(-1) * position  # [B, T, H, W, C]
    noise = 0.05 * torch.randn((num_videos, num_frames, H, W, channels), generator=generator)
    return pattern + moving + noise, velocity


class TinyVideoRegressor(nn.Module):
    """VTokEncoder, one transformer layer over the tokens, a linear head on their mean."""

    def __init__(self, backend: str, pool: str, frames_per_token: int, spatial):
        super().__init__()
        heads = 2 if pool == "attn" else 1
        self.tokenizer = vk.nn.VTokEncoder(CHANNELS, 32, pool=pool, num_heads=heads, hidden_dim=32,
                                           frames_per_token=frames_per_token, spatial=spatial,
                                           backend=backend)
        self.mixer = nn.TransformerEncoderLayer(32, nhead=2, dim_feedforward=64, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixer(self.tokenizer(features)).mean(dim=1)).squeeze(-1)


@functools.lru_cache(maxsize=None)  # the reference curve is shared by every backend's test
def loss_curve(backend: str, device: str, pool: str, frames_per_token: int, spatial,
               steps: int = STEPS) -> tuple[float, ...]:
    torch.manual_seed(0)
    model = TinyVideoRegressor(backend, pool, frames_per_token, spatial).to(device)
    # Attention pooling that starts from an informative query, so the kernels' attention
    # weights (not only a near-uniform mean) shape the curve from the first step.
    if model.tokenizer.query is not None:
        with torch.no_grad():
            model.tokenizer.query.normal_(0, 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    # One fixed batch, as Liger's convergence tests: the loss must fall within 20 steps.
    features, velocity = moving_pattern_features(4, 4, torch.Generator().manual_seed(1))
    features, velocity = features.to(device), velocity.to(device)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(features), velocity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return tuple(losses)


CONFIGS = [
    pytest.param("attn", 1, None, id="attn"),
    pytest.param("mean", 2, (1, 2), id="mean-fpt2-spatial"),
]


@pytest.mark.parametrize("pool, frames_per_token, spatial", CONFIGS)
@pytest.mark.parametrize("backend", [b for b in backends.KNOWN_BACKENDS if b != "torch"])
def test_loss_curve_matches_reference(backend, pool, frames_per_token, spatial):
    device = backend_device(backend)
    steps = INTERPRETED_STEPS if backends.triton_interpreted() and backend == "triton" else STEPS
    reference = loss_curve("torch", device, pool, frames_per_token, spatial)[:steps]
    kernel = loss_curve(backend, device, pool, frames_per_token, spatial, steps)
    torch.testing.assert_close(torch.tensor(kernel), torch.tensor(reference), rtol=1e-4, atol=0)
    if steps == STEPS:
        assert sum(reference[-5:]) < 0.5 * sum(reference[:5]), f"the tiny model does not learn: {reference}"
