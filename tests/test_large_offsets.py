"""Views whose element offsets pass 2**31, on every backend that runs here: cpu, triton (the
interpreter, or the GPU where there is one) and the CUDA kernels on the host emulator.

Every case reads, in place, a view of a storage of 6.6 to 9.6 GiB: a time-major buffer (the
frames of a video 0.6 * 2**31 elements apart, so its later frames start past 2**31 while the
frame stride itself fits in 32 bits), a patch-major buffer (patches 0.15 * 2**31 apart), a
varlen pack of time-major frames, and for expand, key and residual tokens 0.55 * 2**31 apart.
A large CPU ``torch.empty`` is an anonymous mapping that costs memory only for the pages
written, and only the elements the view reads are written, so a case adds far less than a GiB
of resident memory (asserted). The results are compared with the reference on a small
contiguous copy of the same values.

A kernel that forms such an offset in 32 bits reads or writes outside the view: a segfault
under the interpreter, an illegal address on a GPU, or silently wrong values where the wrapped
address happens to be mapped. So the cases of a backend run in a child process, which reports
each result as a line of JSON; a crash fails the case it happened in, and the cases after it
run in a fresh child.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtok_kernels import backends, reference
from tests.utils import TOLERANCE, features, rel_err

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float16
# Resident memory a case may add (peak during the case over the resident set before it); its
# storage is 4-10 GiB of address space.
RSS_GROWTH_LIMIT_MB = 1024
CHILD_TIMEOUT_S = 900

# Element strides just below 2**31 (a 32-bit stride), so that only index * stride overflows.
FRAME_STRIDE = int(0.6 * 2**31)
PATCH_STRIDE = int(0.15 * 2**31)
TOKEN_STRIDE = int(0.55 * 2**31)

# (id, layout, pool, num_heads, C, frames_per_token, spatial, grid). The attention cases cover
# both ways the Triton forward forms its tile pointers (head blocks of 128, and of 64 or less).
ENCODE_CASES = [
    ("time-major-mean", "time-major", "mean", 1, 64, 1, (), ()),
    ("time-major-attn-head96", "time-major", "attn", 1, 96, 1, (), ()),
    ("patch-major-mean-spatial", "patch-major", "mean", 1, 64, 2, (2, 2), (4, 4)),
    ("patch-major-attn-2heads", "patch-major", "attn", 2, 64, 2, (), ()),
    ("varlen-time-major-mean", "varlen", "mean", 1, 64, 1, (), ()),
    ("varlen-time-major-attn-head96", "varlen", "attn", 1, 96, 2, (), ()),
]
CASE_IDS = [case[0] for case in ENCODE_CASES] + ["expand-token-major"]
BACKENDS = ["cpu", "triton", "cuda-emulator"]


# ------------------------------------------------------------------ the views

def _lazy_storage(shape, device) -> torch.Tensor:
    """Uninitialised storage; on the CPU its pages cost memory only once written."""
    return torch.empty(shape, dtype=DTYPE, device=device)


def _time_major(frames: int, N: int, C: int, device) -> torch.Tensor:
    """Storage [T, B_big, N, C]: each frame's videos side by side (frame stride B_big*N*C)."""
    big = FRAME_STRIDE // (N * C)
    return _lazy_storage((frames, big, N, C), device)


def _fill(view: torch.Tensor) -> torch.Tensor:
    """Writes random values into the elements of ``view`` only; returns a contiguous copy."""
    values = features(view.shape, DTYPE)
    view.copy_(values)
    return values


def _max_offset(view: torch.Tensor) -> int:
    return view.storage_offset() + sum((n - 1) * s for n, s in zip(view.shape, view.stride()))


def _encode_input(layout: str, N: int, C: int, device):
    """(x, dense copy, key_index, cu_frames or None)."""
    if layout == "time-major":
        T, videos = 4, 2
        storage = _time_major(T, N, C, device)
        big = storage.shape[1]
        x = storage.transpose(0, 1)[big - videos:]
        # The key frame first in one video and last in the other: later frames go past 2**31
        # either way (frame 3 starts at 1.8 * 2**31).
        keys = torch.tensor([0, T - 1], device=device)
        cu_frames = None
    elif layout == "patch-major":
        T = 3
        big = PATCH_STRIDE // (T * C)
        storage = _lazy_storage((N, big, T, C), device)
        x = storage.permute(1, 2, 0, 3)[big - 1:]
        keys = torch.tensor([1], device=device)
        cu_frames = None
    else:
        frames = 4
        x = _time_major(frames, N, C, device)[:, -1]
        # A one-frame video, then one whose frames sit 0, 0.6 and 1.2 * 2**31 past its first.
        cu_frames = torch.tensor([0, 1, frames], device=device)
        keys = torch.tensor([0, 0], device=device)
    assert _max_offset(x) >= 2**31 and max(x.stride()) < 2**31, x.stride()
    dense = _fill(x)
    return x, dense, keys, cu_frames


def _expand_input(B: int, N: int, G: int, C: int, device):
    """Key tokens [B, N, C] and residual tokens [B, G, C] read from one storage [R, B_big, 2C]
    whose rows are TOKEN_STRIDE apart: the key tokens in the first C channels, the residual
    tokens in the last C."""
    rows = max(N, G)
    big = TOKEN_STRIDE // (2 * C)
    storage = _lazy_storage((rows, big, 2 * C), device)
    key_tokens = storage[:N, big - B:, :C].transpose(0, 1)
    residual_tokens = storage[:G, big - B:, C:].transpose(0, 1)
    for view in (key_tokens, residual_tokens):
        assert _max_offset(view) >= 2**31 and max(view.stride()) < 2**31, view.stride()
    return key_tokens, _fill(key_tokens), residual_tokens, _fill(residual_tokens)


# ------------------------------------------------------------------ the checks (child side)

def _errors(pairs: dict) -> dict:
    """{name: relative error}, NaN where the backend left a non-finite value (an unwritten,
    poisoned element) that the reference does not have."""
    out = {}
    for name, (value, ref) in pairs.items():
        value = value.detach().cpu()
        finite = bool(torch.isfinite(value).all()) and value.shape == ref.shape
        out[name] = rel_err(value, ref) if finite else float("nan")
    return out


def _check_encode(impl, device, case) -> dict:
    _, layout, pool, heads, C, fpt, spatial, grid = case
    N = 16
    x, dense, keys, cu_frames = _encode_input(layout, N, C, device)
    query = torch.randn(C, device=device) if pool == "attn" else None
    x64 = dense.double().requires_grad_(True)
    q64 = query.cpu().double().requires_grad_(True) if query is not None else None
    options = dict(pool=pool, query=q64, num_heads=heads, frames_per_token=fpt,
                   spatial=spatial or None, grid=grid or None, return_lse=True)
    if cu_frames is None:
        ref, ref_lse = reference.encode(x64, keys.cpu(), **options)
    else:
        ref, cu_tokens, ref_lse = reference.encode_varlen(x64, cu_frames.cpu(), keys.cpu(),
                                                          **options)
    inputs = [x64] + ([q64] if q64 is not None else [])
    grad = torch.randn(ref.shape).to(DTYPE)
    ref_grads = torch.autograd.grad(ref, inputs, grad.double())
    grad = grad.to(device)

    common = (pool, heads, fpt, spatial, grid)
    if cu_frames is None:
        seq, lse, *kept = impl.encode_fwd(x, keys, query, *common)
        grad_x, grad_q = impl.encode_bwd(grad, x, keys, query, seq, lse, *common, *kept)
    else:
        cu_tokens = cu_tokens.to(device)
        lengths = (cu_frames[1:] - cu_frames[:-1]).tolist()
        seq, lse, *kept = impl.encode_varlen_fwd(x, cu_frames, cu_tokens, keys, query, *common,
                                                 max(lengths), int(cu_tokens[-1]))
        grad_x, grad_q = impl.encode_varlen_bwd(grad, x, cu_frames, cu_tokens, keys, query, seq,
                                                lse, *common, max(lengths), *kept)
    pairs = {"sequence": (seq, ref.detach()), "grad x": (grad_x, ref_grads[0])}
    if pool == "attn":
        pairs["lse"] = (lse, ref_lse.detach())
        pairs["grad query"] = (grad_q, ref_grads[1])
    return _errors(pairs)


def _check_expand(impl, device) -> dict:
    B, N, T, fpt, C = 2, 3, 4, 1, 32
    G = reference.num_groups(T, fpt)
    key_tokens, key_dense, residual_tokens, residual_dense = _expand_input(B, N, G, C, device)
    # Frame 0 first, then the last: the groups of the other frames reach residual row 2.
    keys = torch.tensor([0, T - 1], device=device)
    k64 = key_dense.double().requires_grad_(True)
    r64 = residual_dense.double().requires_grad_(True)
    ref = reference.expand(k64, r64, keys.cpu(), T, fpt)
    grad = torch.randn(ref.shape).to(DTYPE)
    ref_gk, ref_gr = torch.autograd.grad(ref, [k64, r64], grad.double())
    frames = impl.expand_fwd(key_tokens, residual_tokens, keys, T, fpt)
    grad_keys, grad_res = impl.expand_bwd(grad.to(device), keys, G, fpt)
    return _errors({"frames": (frames, ref.detach()), "grad key tokens": (grad_keys, ref_gk),
                    "grad residual tokens": (grad_res, ref_gr)})


def _rss_mb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak so far) of this process."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+) kB", status).group(1)) // 1024


def _emulated_cuda_backend():
    """The cuda backend on CPU tensors, every kernel body of csrc/cuda run by the host emulator
    (as the ``emulated`` fixture of test_cuda_backend.py sets it up)."""
    from tests import cuda_emulator
    from vtok_kernels.backends import cuda

    loader = cuda_emulator.EmulatedLoader()
    cuda._loader = lambda: loader
    cuda._stream = lambda tensor: 0
    torch.cuda.device = lambda device: contextlib.nullcontext()
    return cuda


def child_main(argv: list) -> None:
    """Runs the cases argv[1:] on backend argv[0], printing a START line before each case and a
    RESULT line (JSON) after it."""
    name, case_ids = argv[0], argv[1:]
    backends.POISON_OUTPUTS = True
    if name == "cuda-emulator":
        impl, device = _emulated_cuda_backend(), "cpu"
    else:
        impl = backends.get(name)
        device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.zeros(1, device=device)  # the CUDA context's host memory is not the cases'
    cases = {case[0]: case for case in ENCODE_CASES}
    for case_id in case_ids:
        print(f"START {case_id}", flush=True)
        rss_before = _rss_mb("VmRSS")
        if case_id in cases:
            errors = _check_encode(impl, device, cases[case_id])
        else:
            errors = _check_expand(impl, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        growth = _rss_mb("VmHWM") - rss_before
        print("RESULT " + json.dumps({"case": case_id, "errors": errors, "rss_growth_mb": growth}),
              flush=True)


# ------------------------------------------------------------------ the tests (parent side)

_RESULTS: dict = {}


def _text(output) -> str:
    """A timed-out child's partial output: bytes, str or None."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _run_child(name: str, case_ids: list) -> None:
    """Runs ``case_ids`` in one child; records a result for each case that ran, or the crash."""
    code = "import sys; from tests.test_large_offsets import child_main; child_main(sys.argv[1:])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, name, *case_ids], cwd=ROOT,
                              env=dict(os.environ), capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
        stdout, stderr = proc.stdout, proc.stderr
        status = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                  else f"exit status {proc.returncode}")
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = _text(exc.stdout), _text(exc.stderr)
        status = f"no answer in {CHILD_TIMEOUT_S}s"
    started = None
    for line in stdout.splitlines():
        if line.startswith("START "):
            started = line.split(" ", 1)[1]
        elif line.startswith("RESULT "):
            result = json.loads(line.split(" ", 1)[1])
            _RESULTS[(name, result["case"])] = result
            started = None
    if started is not None or not any((name, c) in _RESULTS for c in case_ids):
        crashed = started or case_ids[0]
        _RESULTS[(name, crashed)] = {"crash": f"{status}; stderr ends: {stderr[-1500:]}"}


def _result(name: str, case_id: str) -> dict:
    """The result of one case, running every case of the backend not run yet in children."""
    while (name, case_id) not in _RESULTS:
        pending = [c for c in CASE_IDS if (name, c) not in _RESULTS]
        _run_child(name, pending)
    return _RESULTS[(name, case_id)]


def _skip_unless_runnable(name: str) -> None:
    if name == "cuda-emulator":
        from tests import cuda_emulator

        reason = cuda_emulator.unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        return
    device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable on {device}: {reason}")


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("name", BACKENDS)
def test_offsets_past_2_31_match_reference(name, case_id):
    _skip_unless_runnable(name)
    result = _result(name, case_id)
    assert "crash" not in result, f"{name} {case_id}: the child process died: {result['crash']}"
    tolerance = TOLERANCE[DTYPE]
    bad = {k: v for k, v in result["errors"].items() if not v <= tolerance}
    assert not bad, (f"{name} {case_id}: relative error above {tolerance:.0e} (NaN: non-finite "
                     f"or unwritten output): {bad}")
    assert result["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB, (
        f"{name} {case_id}: resident memory grew by {result['rss_growth_mb']} MB: the lazily "
        f"mapped storage was touched beyond the view")


def test_triton_refuses_frames_of_2_31_elements():
    """Tile offsets within a frame stay 32-bit in the Triton kernels: a frame of N*C >= 2**31
    elements is refused up front (meta tensors: nothing is allocated)."""
    _skip_unless_runnable("triton")
    from vtok_kernels.backends.triton import encode, expand

    x = torch.empty((1, 2, 2**16, 2**15), dtype=DTYPE, device="meta")
    keys = torch.zeros(1, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"N\*C = 65536\*32768 .* 2\*\*31"):
        encode.encode_fwd(x, keys, None, "mean", 1, 1, (), ())
    with pytest.raises(ValueError, match=r"2\*\*31"):
        expand.expand_fwd(x[:, 0], x[:, 1, :1], keys, 2, 1)
