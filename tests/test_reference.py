"""The reference against hand-computed cases, float64, and properties of the math."""
from __future__ import annotations

import math

import pytest
import torch

from vtok_kernels import reference


def test_mean_by_hand():
    # one video, 3 frames of 2 patches with 1 channel; key frame 1
    x = torch.tensor([[[[1.0], [3.0]], [[2.0], [2.0]], [[6.0], [0.0]]]])
    seq = reference.encode(x, key_index=1)
    # key tokens: frame 1 = [2, 2]; frame 0 residual: (-1, 1) -> 0; frame 2: (4, -2) -> 1
    assert seq.flatten().tolist() == [2.0, 2.0, 0.0, 1.0]


def test_mean_groups_by_hand():
    x = torch.arange(5.0).reshape(1, 5, 1, 1)  # frame t has value t; key 0
    seq = reference.encode(x, key_index=0, frames_per_token=3)
    # non-key frames 1..4 -> groups {1,2,3} and {4}: means 2 and 4
    assert seq.flatten().tolist() == [0.0, 2.0, 4.0]


def test_attn_by_hand():
    # one head, C = 2, query (1, 0): the score of a residual is its first channel / sqrt(2)
    x = torch.tensor([[[[0.0, 0.0]], [[1.0, 5.0]], [[3.0, -1.0]]]])
    seq = reference.encode(x, pool="attn", query=torch.tensor([1.0, 0.0]), frames_per_token=2)
    s1, s2 = 1 / math.sqrt(2), 3 / math.sqrt(2)
    p1 = math.exp(s1) / (math.exp(s1) + math.exp(s2))
    expected = [p1 * 1 + (1 - p1) * 3, p1 * 5 + (1 - p1) * -1]
    assert seq.shape == (1, 2, 2)
    assert torch.allclose(seq[0, 1], torch.tensor(expected), atol=1e-6)


def test_attn_heads_are_independent():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    q = torch.randn(6, dtype=torch.float64)
    both = reference.encode(x, pool="attn", query=q, num_heads=2)
    first = reference.encode(x[..., :3], pool="attn", query=q[:3], num_heads=1)
    second = reference.encode(x[..., 3:], pool="attn", query=q[3:], num_heads=1)
    assert torch.allclose(both, torch.cat([first, second], dim=-1))


@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_float32_against_float64(pool):
    x = torch.randn(2, 6, 11, 12, dtype=torch.float64)
    q = torch.randn(12, dtype=torch.float64) if pool == "attn" else None
    heads = 3 if pool == "attn" else 1
    ref64 = reference.encode(x, 2, pool, q, heads, frames_per_token=2)
    ref32 = reference.encode(x.float(), 2, pool, None if q is None else q.float(), heads, frames_per_token=2)
    assert ((ref32.double() - ref64).norm() / ref64.norm()).item() < 1e-6


def test_lse_is_logsumexp_of_scores():
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    q = torch.randn(6, dtype=torch.float64)
    _, lse = reference.encode(x, pool="attn", query=q, num_heads=2, return_lse=True)
    d = (x[0, 1] - x[0, 0]).reshape(4, 2, 3)
    scores = torch.einsum("nhc,hc->nh", d, q.reshape(2, 3)) / math.sqrt(3)
    assert torch.allclose(lse[0, 0].double(), torch.logsumexp(scores, 0), atol=1e-6)


@pytest.mark.parametrize("key", [0, 3, -1, -6])
def test_expand_then_encode_returns_inputs(key):
    K = torch.randn(3, 7, 5, dtype=torch.float64)
    R = torch.randn(3, 5, 5, dtype=torch.float64)
    frames = reference.expand(K, R, key, num_frames=6)
    seq = reference.encode(frames, key)
    assert torch.allclose(seq[:, :7], K) and torch.allclose(seq[:, 7:], R)


def test_spatial_bins_match_the_index_math():
    """The bins the kernels compute (csrc/include/vtok/index_math.h: floor(i*H/h), ceil((i+1)*H/h))
    give exactly torch's adaptive_avg_pool2d, overlapping bins included."""
    H, W, h, w, C = 5, 7, 3, 4, 2
    x = torch.randn(1, 2, H, W, C, dtype=torch.float64)
    seq = reference.encode(x, spatial=(h, w))
    grid = x[0, 0]
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            assert torch.allclose(seq[0, i * w + j], grid[r0:r1, c0:c1].mean(dim=(0, 1)))


def test_ragged_last_group():
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    seq = reference.encode(x, key_index=0, frames_per_token=2)  # non-key 1..5 -> {1,2},{3,4},{5}
    assert seq.shape == (1, 3 + 3, 4)
    assert torch.allclose(seq[0, -1], (x[0, 5] - x[0, 0]).mean(0))
    assert torch.allclose(seq[0, -2], torch.cat([x[0, 3], x[0, 4]]).sub(x[0, 0].repeat(2, 1)).mean(0))


def test_single_frame_has_only_key_tokens():
    x = torch.randn(2, 1, 5, 4)
    assert torch.equal(reference.encode(x), x[:, 0])


def test_negative_key_equals_positive():
    x = torch.randn(2, 5, 3, 4)
    assert torch.equal(reference.encode(x, -2), reference.encode(x, 3))
    keys = torch.tensor([-1, 0])
    assert torch.equal(reference.encode(x, keys)[0], reference.encode(x[:1], 4)[0])


def test_varlen_equals_each_video_alone():
    lengths = [1, 4, 3]
    x = torch.randn(sum(lengths), 6, 4, dtype=torch.float64)
    cu = torch.tensor([0, 1, 5, 8])
    q = torch.randn(4, dtype=torch.float64)
    seq, cu_tokens = reference.encode_varlen(x, cu, key_index=torch.tensor([0, -1, 1]), pool="attn", query=q, num_heads=2)
    assert cu_tokens.tolist() == [0, 6, 6 + 6 + 3, 15 + 6 + 2]
    for b, key in enumerate([0, -1, 1]):
        alone = reference.encode(x[cu[b]:cu[b + 1]][None], key, "attn", q, 2)[0]
        assert torch.equal(seq[cu_tokens[b]:cu_tokens[b + 1]], alone)


def test_num_groups():
    assert [reference.num_groups(t, 1) for t in (1, 2, 5)] == [0, 1, 4]
    assert [reference.num_groups(t, 3) for t in (1, 2, 4, 5, 7)] == [0, 1, 1, 2, 2]


def test_gradients_by_gradcheck():
    x = torch.randn(2, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(6, dtype=torch.float64, requires_grad=True)
    f = lambda x, q: reference.encode(x, torch.tensor([1, -1]), "attn", q, 2, 2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, q))
