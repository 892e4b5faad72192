"""The public API: every validation rule of DESIGN section 3, result views, backend choice."""
from __future__ import annotations

import pytest
import torch

import vtok_kernels as vk
from vtok_kernels import backends

C = 12


def x4(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, 5, 6, C))).to(dtype)


def q(n=C, dtype=torch.float32):
    return torch.randn(n, dtype=dtype)


cu_ok = torch.tensor([0, 2, 5], dtype=torch.int32)

# (id, function, kwargs, exception, words the message must contain)
BAD_INPUT = [
    # x
    ("x-not-tensor", vk.encode, dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    ("x-integer", vk.encode, dict(x=torch.ones(2, 3, 4, C, dtype=torch.int64)), TypeError, "x: expected a floating dtype"),
    ("x-bool", vk.encode, dict(x=torch.ones(2, 3, 4, C, dtype=torch.bool)), TypeError, "x: expected a floating dtype"),
    ("x-rank3", vk.encode, dict(x=torch.randn(3, 4, C)), ValueError, "x: expected"),
    ("x-rank6", vk.encode, dict(x=torch.randn(1, 2, 3, 4, 5, C)), ValueError, "x: expected"),
    ("x-empty-batch", vk.encode, dict(x=torch.randn(0, 3, 4, C)), ValueError, "non-empty"),
    ("x-empty-frames", vk.encode, dict(x=torch.randn(2, 0, 4, C)), ValueError, "non-empty"),
    ("x-empty-patches", vk.encode, dict(x=torch.randn(2, 3, 0, C)), ValueError, "non-empty"),
    ("x-empty-channels", vk.encode, dict(x=torch.randn(2, 3, 4, 0)), ValueError, "non-empty"),
    # pool / heads / query
    ("pool-unknown", vk.encode, dict(x=x4(), pool="max"), ValueError, "pool: expected one of"),
    ("pool-not-str", vk.encode, dict(x=x4(), pool=1), TypeError, "pool: expected a str"),
    ("attn-no-query", vk.encode, dict(x=x4(), pool="attn"), ValueError, "query: pool='attn' needs"),
    ("query-not-tensor", vk.encode, dict(x=x4(), pool="attn", query=[1.0] * C), TypeError, "query: expected a torch.Tensor"),
    ("query-wrong-shape", vk.encode, dict(x=x4(), pool="attn", query=q(C + 1)), ValueError, "query: expected shape [C]"),
    ("query-2d", vk.encode, dict(x=x4(), pool="attn", query=q().reshape(1, C)), ValueError, "query: expected shape [C]"),
    ("query-int", vk.encode, dict(x=x4(), pool="attn", query=torch.ones(C, dtype=torch.int32)), TypeError, "query: expected dtype"),
    ("query-f16-x-bf16", vk.encode, dict(x=x4(dtype=torch.bfloat16), pool="attn", query=q(dtype=torch.float16)), TypeError, "query: expected dtype"),
    ("query-with-mean", vk.encode, dict(x=x4(), pool="mean", query=q()), ValueError, "query: only pool='attn'"),
    ("heads-with-mean", vk.encode, dict(x=x4(), pool="mean", num_heads=2), ValueError, "num_heads: only pool='attn'"),
    ("heads-not-dividing", vk.encode, dict(x=x4(), pool="attn", query=q(), num_heads=5), ValueError, "divisible by num_heads"),
    ("heads-zero", vk.encode, dict(x=x4(), pool="attn", query=q(), num_heads=0), ValueError, "num_heads: expected a positive int"),
    ("heads-float", vk.encode, dict(x=x4(), pool="attn", query=q(), num_heads=2.0), TypeError, "num_heads: expected an int"),
    # frames_per_token
    ("fpt-zero", vk.encode, dict(x=x4(), frames_per_token=0), ValueError, "frames_per_token: expected a positive int"),
    ("fpt-negative", vk.encode, dict(x=x4(), frames_per_token=-2), ValueError, "frames_per_token: expected a positive int"),
    ("fpt-float", vk.encode, dict(x=x4(), frames_per_token=1.5), TypeError, "frames_per_token: expected an int"),
    ("fpt-bool", vk.encode, dict(x=x4(), frames_per_token=True), TypeError, "frames_per_token: expected an int"),
    # key_index
    ("key-too-big", vk.encode, dict(x=x4(), key_index=5), ValueError, "key_index: 5 is out of range"),
    ("key-too-negative", vk.encode, dict(x=x4(), key_index=-6), ValueError, "key_index: -6 is out of range"),
    ("key-float", vk.encode, dict(x=x4(), key_index=1.0), TypeError, "key_index: expected an int"),
    ("key-float-tensor", vk.encode, dict(x=x4(), key_index=torch.tensor([0.0, 1.0])), TypeError, "key_index: expected an int"),
    ("key-tensor-wrong-shape", vk.encode, dict(x=x4(), key_index=torch.tensor([0, 1, 2])), ValueError, "key_index: expected an int or a tensor of shape [B]"),
    ("key-tensor-out-of-range", vk.encode, dict(x=x4(), key_index=torch.tensor([0, 7])), ValueError, "key_index: 7 is out of range"),
    # spatial / grid
    ("spatial-without-grid", vk.encode, dict(x=x4(), spatial=(2, 2)), ValueError, "spatial: needs the patch grid"),
    ("spatial-too-big", vk.encode, dict(x=x4(), spatial=(3, 2), grid=(2, 3)), ValueError, "spatial: (3, 2) must not exceed the grid (2, 3)"),
    ("spatial-too-big-5d", vk.encode, dict(x=torch.randn(2, 3, 2, 3, C), spatial=(2, 4)), ValueError, "must not exceed the grid"),
    ("spatial-not-pair", vk.encode, dict(x=x4(), spatial=(2,), grid=(2, 3)), TypeError, "spatial: expected a pair of ints"),
    ("spatial-zero", vk.encode, dict(x=x4(), spatial=(0, 2), grid=(2, 3)), ValueError, "spatial: expected positive sizes"),
    ("grid-mismatch-N", vk.encode, dict(x=x4(), grid=(2, 2)), ValueError, "grid: H*W = 4 must equal N = 6"),
    ("grid-mismatch-5d", vk.encode, dict(x=torch.randn(2, 3, 2, 3, C), grid=(3, 2)), ValueError, "does not match the H, W dims of x"),
    ("grid-not-pair", vk.encode, dict(x=x4(), grid=6), TypeError, "grid: expected a pair of ints"),
    # backend
    ("backend-unknown", vk.encode, dict(x=x4(), backend="tpu"), ValueError, "backend: unknown backend 'tpu'"),
    ("backend-not-str", vk.encode, dict(x=x4(), backend=None), TypeError, "backend: expected a str"),
    ("backend-cuda-on-cpu", vk.encode, dict(x=x4(), backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
    # encode_varlen
    ("varlen-x-rank", vk.encode_varlen, dict(x=torch.randn(5, 2, 3, 2, C), cu_frames=cu_ok), ValueError, "x: expected"),
    ("varlen-cu-not-tensor", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=[0, 2, 5]), TypeError, "cu_frames: expected an int32 or int64 tensor"),
    ("varlen-cu-float", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=torch.tensor([0.0, 5.0])), TypeError, "cu_frames: expected dtype int32 or int64"),
    ("varlen-cu-2d", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=torch.tensor([[0, 5]])), ValueError, "cu_frames: expected shape [B+1]"),
    ("varlen-cu-one-entry", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=torch.tensor([0])), ValueError, "cu_frames: expected shape [B+1]"),
    ("varlen-cu-first", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=torch.tensor([1, 5])), ValueError, "cu_frames: must start at 0"),
    ("varlen-cu-last", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=torch.tensor([0, 4])), ValueError, "cu_frames: must end at the number of packed frames F = 5"),
    ("varlen-cu-decreasing", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=torch.tensor([0, 3, 2, 5])), ValueError, "cu_frames: must be strictly increasing"),
    ("varlen-cu-empty-video", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=torch.tensor([0, 2, 2, 5])), ValueError, "cu_frames: must be strictly increasing"),
    ("varlen-key-out-of-range", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=cu_ok, key_index=2), ValueError, "key_index: 2 is out of range [-2, 2) for video 0"),
    ("varlen-key-tensor-shape", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=cu_ok, key_index=torch.tensor([0, 0, 0])), ValueError, "key_index: expected an int or a tensor of shape [B] = [2]"),
    ("varlen-spatial-no-grid", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=cu_ok, spatial=(1, 1)), ValueError, "spatial: needs the patch grid"),
    ("varlen-integer-x", vk.encode_varlen, dict(x=torch.ones(5, 6, C, dtype=torch.int32), cu_frames=cu_ok), TypeError, "x: expected a floating dtype"),
    # expand
    ("expand-key-rank", vk.expand, dict(key_tokens=torch.randn(6, C), residual_tokens=torch.randn(2, 4, C), key_index=0, num_frames=5), ValueError, "key_tokens: expected"),
    ("expand-key-int", vk.expand, dict(key_tokens=torch.ones(2, 6, C, dtype=torch.int64), residual_tokens=torch.randn(2, 4, C), key_index=0, num_frames=5), TypeError, "key_tokens: expected a floating dtype"),
    ("expand-res-dtype", vk.expand, dict(key_tokens=torch.randn(2, 6, C), residual_tokens=torch.randn(2, 4, C, dtype=torch.float64), key_index=0, num_frames=5), TypeError, "residual_tokens: expected dtype torch.float32"),
    ("expand-res-groups", vk.expand, dict(key_tokens=torch.randn(2, 6, C), residual_tokens=torch.randn(2, 3, C), key_index=0, num_frames=5), ValueError, "residual_tokens: expected shape [B, G, C] = [2, 4, 12]"),
    ("expand-res-batch", vk.expand, dict(key_tokens=torch.randn(2, 6, C), residual_tokens=torch.randn(3, 4, C), key_index=0, num_frames=5), ValueError, "residual_tokens: expected shape"),
    ("expand-frames-zero", vk.expand, dict(key_tokens=torch.randn(2, 6, C), residual_tokens=torch.randn(2, 0, C), key_index=0, num_frames=0), ValueError, "num_frames: expected a positive int"),
    ("expand-key-range", vk.expand, dict(key_tokens=torch.randn(2, 6, C), residual_tokens=torch.randn(2, 4, C), key_index=5, num_frames=5), ValueError, "key_index: 5 is out of range"),
]

if torch.cuda.is_available():
    BAD_INPUT += [
        ("query-other-device", vk.encode, dict(x=x4(), pool="attn", query=q().cuda()), ValueError, "query: expected device"),
        ("cu-other-device", vk.encode_varlen, dict(x=torch.randn(5, 6, C), cu_frames=cu_ok.cuda()), ValueError, "cu_frames: expected device"),
    ]


@pytest.mark.parametrize("fn, kwargs, error, words", [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUT])
def test_bad_input_raises_a_clear_error(fn, kwargs, error, words):
    with pytest.raises(error) as info:
        fn(**kwargs)
    assert words in str(info.value)


def test_bad_input_table_covers_every_rule():
    """Each rule of DESIGN section 3 has at least one row (names as in the ids above)."""
    ids = " ".join(row[0] for row in BAD_INPUT)
    for rule in ["x-rank", "x-empty", "x-integer", "query-wrong-shape", "query-int", "heads-not-dividing",
                 "key-too-big", "varlen-cu-decreasing", "varlen-cu-first", "varlen-cu-last",
                 "varlen-cu-float", "spatial-too-big", "grid-mismatch", "backend-unknown", "attn-no-query"]:
        assert rule in ids, rule


def test_non_finite_values_propagate_as_in_the_reference():
    x = torch.randn(1, 3, 4, C)
    x[0, 2, 1, 0] = float("nan")
    x[0, 1, 0, 3] = float("inf")
    out = vk.encode(x, backend="torch").sequence
    ref = vk.reference.encode(x)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())


def test_result_views_share_one_contiguous_sequence():
    x = x4(2, 5, 6, C)
    out = vk.encode(x, spatial=(2, 1), grid=(3, 2), backend="torch")
    assert out.sequence.is_contiguous() and out.sequence.shape == (2, 2 + 4, C)
    assert out.key_tokens._base is out.sequence or out.key_tokens.data_ptr() == out.sequence.data_ptr()
    assert out.residual_tokens.data_ptr() == out.sequence[:, 2:].data_ptr()
    assert out.key_tokens.shape == (2, 2, C) and out.residual_tokens.shape == (2, 4, C)


def test_inputs_are_not_modified():
    x = torch.randn(2, 5, 6, C)
    query = q()
    keys = torch.tensor([-1, 2])
    before = [t.clone() for t in (x, query, keys)]
    out = vk.encode(x, keys, pool="attn", query=query, num_heads=3, backend="torch")
    out.sequence.sum()
    for t, b in zip((x, query, keys), before):
        assert torch.equal(t, b)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    frames = torch.randn(5, 6, C)
    cu_before, frames_before = cu.clone(), frames.clone()
    vk.encode_varlen(frames, cu, key_index=torch.tensor([1, -1]), backend="torch")
    assert torch.equal(cu, cu_before) and torch.equal(frames, frames_before)


def test_varlen_output_fields():
    frames = torch.randn(6, 4, C)
    out = vk.encode_varlen(frames, torch.tensor([0, 1, 6]), backend="torch")
    assert out.cu_tokens.tolist() == [0, 4, 4 + 4 + 4]
    assert out.num_key_tokens == 4 and out.max_tokens == 8
    assert out.sequence.shape == (12, C)


def test_query_in_float32_with_half_features():
    x = x4(1, 3, 4, C, dtype=torch.bfloat16)
    out = vk.encode(x, pool="attn", query=q(), num_heads=2, backend="torch")
    assert out.sequence.dtype == torch.bfloat16


def test_available_backends_always_has_torch():
    assert "torch" in vk.available_backends("cpu")
    assert "cuda" not in vk.available_backends("cpu")


def test_auto_and_env_override(monkeypatch):
    x = x4()
    monkeypatch.setenv("VTOK_BACKEND", "torch")
    calls = []
    original = backends.get("torch").impls["encode_fwd"]
    monkeypatch.setitem(backends.get("torch").impls, "encode_fwd", lambda *a: calls.append(1) or original(*a))
    vk.encode(x)
    assert calls == [1]
    monkeypatch.setenv("VTOK_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        vk.encode(x)


def test_auto_picks_an_available_backend():
    from vtok_kernels import selection

    name = selection.pick(torch.device("cpu"), torch.float32)
    assert name in vk.available_backends("cpu") and name != "triton"
