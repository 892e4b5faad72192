"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda`` on CUDA tensors.

Two loaders run the same kernel source: the compiled extension ``vtok_kernels._C`` (built with
nvcc for ``VTOK_CUDA_ARCHS``) and, when the extension was built without nvcc, CuPy compiling the
``.cuh`` bodies at run time with NVRTC (``cuda_nvrtc.py``). ``VTOK_CUDA_LOADER=extension`` or
``=cupy-nvrtc`` picks one; ``Backend.loader`` says which is in use. A launch the kernels cannot
make (more than 65535 videos, residual tokens per video or patch tiles per frame, key tokens of
2^31 elements or more per video, a workspace too small) is the same ValueError from either
loader, raised before anything reaches the device: ``cuda_nvrtc`` mirrors the extension's checks.
``VTOK_CUDA_FWD=warps`` (default ``tiles``) picks the encode forward's other design on 16-byte
rows, a warp per split of a frame's rows (launch.h ``FwdDesign``), in either loader.

Every op allocates its outputs and workspaces (the forward's partial rows of a frame's patch
tiles, the attn backward's partial grad_query rows) with torch before the launch and enqueues
the kernels on the caller's current stream: no host synchronisation, no allocation in the launch
path, so the ops can be captured in CUDA graphs. Attention heads wider than
``MAX_HEAD_DIM`` channels (one block pools a whole head in registers) run on the "torch"
backend instead.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from vtok_kernels.backends import Backend, empty_output, impls_of, register
from vtok_kernels.backends import cuda_nvrtc

MAX_HEAD_DIM = cuda_nvrtc.MAX_HEAD_DIM
LOADERS = ("extension", "cupy-nvrtc")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_POOL_CODES = {"mean": 0, "attn": 1}


# ------------------------------------------------------------------ loaders

def _extension_module():
    """(vtok_kernels._C with CUDA launchers, None) or (None, why not)."""
    try:
        from vtok_kernels import _extension

        module = _extension.get()
        if module is None:
            return None, _extension.unavailable_reason()
    except Exception as exc:
        return None, f"vtok_kernels._C cannot be loaded: {type(exc).__name__}: {exc}"
    if not getattr(module, "built_with_cuda", False) or not hasattr(module, "cuda_encode_fwd"):
        return None, ("vtok_kernels._C was built without CUDA (nvcc not found or VTOK_SKIP_CUDA=1); "
                      "rebuild with nvcc on PATH: pip install --no-build-isolation -e .")
    return module, None


class ExtensionLoader:
    """Fills the extension's params structs and calls its launchers."""

    name = "extension"

    def __init__(self, module):
        self._C = module

    def _struct(self, cls_name: str, fields: dict):
        obj = getattr(self._C, cls_name)()
        for name, value in fields.items():
            if name == "fwd":
                value = self._struct("EncodeParams", value)
            elif name == "dtype":
                value = self._C.DType(value)
            elif name == "pool":
                value = self._C.Pool(value)
            setattr(obj, name, value)
        return obj

    def encode_fwd(self, p: dict, stream: int, device_index: int, design: str = "tiles") -> None:
        # The binding takes the workspace apart: bindings.cpp's EncodeParams has no such fields.
        fields = dict(p)
        workspace, elems = fields.pop("workspace", 0), fields.pop("workspace_elems", 0)
        self._C.cuda_encode_fwd(self._struct("EncodeParams", fields), stream, workspace, elems, design)

    def encode_bwd(self, bp: dict, stream: int, device_index: int) -> None:
        self._C.cuda_encode_bwd(self._struct("EncodeBwdParams", bp), stream)

    def expand_fwd(self, p: dict, stream: int, device_index: int) -> None:
        self._C.cuda_expand_fwd(self._struct("ExpandParams", p), stream)

    def expand_bwd(self, p: dict, stream: int, device_index: int) -> None:
        self._C.cuda_expand_bwd(self._struct("ExpandBwdParams", p), stream)


_loader_cache: dict = {}


def loader_reason(name: str) -> Optional[str]:
    """None if loader ``name`` can be used, else why not."""
    if name == "extension":
        return _extension_module()[1]
    if name == "cupy-nvrtc":
        if "cupy-nvrtc" not in _loader_cache:
            _loader_cache["cupy-nvrtc"] = cuda_nvrtc.unavailable_reason()
        return _loader_cache["cupy-nvrtc"]
    raise ValueError(f"VTOK_CUDA_LOADER: unknown loader {name!r}; expected one of {LOADERS}")


def get_loader(name: Optional[str] = None):
    """The loader object: ``name``, else $VTOK_CUDA_LOADER, else the extension, else CuPy."""
    name = name or os.environ.get("VTOK_CUDA_LOADER") or _default_loader_name()
    reason = loader_reason(name)
    if reason is not None:
        raise RuntimeError(f"cuda backend: loader {name!r} is not available: {reason}")
    if name == "extension":
        return ExtensionLoader(_extension_module()[0])
    return cuda_nvrtc.NvrtcLoader()


def _default_loader_name() -> str:
    forced = os.environ.get("VTOK_CUDA_LOADER")
    if forced:
        return forced
    if _extension_module()[0] is not None:
        return "extension"
    # Importing CuPy is slow: at import time only ask whether it is installed.
    if importlib.util.find_spec("cupy") is not None:
        return "cupy-nvrtc"
    return ""


def _extension_arch_reason(module, capability: tuple[int, int]) -> Optional[str]:
    """None if the extension holds code for a device of ``capability``, else why not.

    A cubin for sm_XY runs on sm_XZ with Z >= Y; an "a" arch (sm_90a) only on itself."""
    archs = [a.strip() for a in str(getattr(module, "cuda_archs", "")).split(",") if a.strip()]
    for arch in archs:
        digits = arch.rstrip("a")
        if not digits.isdigit():
            continue
        major, minor = int(digits[:-1]), int(digits[-1])
        if arch.endswith("a") and capability == (major, minor):
            return None
        if not arch.endswith("a") and capability[0] == major and capability[1] >= minor:
            return None
    sm = f"{capability[0]}{capability[1]}"
    return (f"vtok_kernels._C holds CUDA code for {','.join(archs) or 'no arch'}, not this sm_{sm} device; "
            f"rebuild with VTOK_CUDA_ARCHS=\"{sm}\" pip install --no-build-isolation -e .")


_device_loader: dict = {}  # by compute capability
_index_loader: dict = {}  # by device index: what a launch asks, without reading the device's properties


def _device_loader_name() -> tuple[str, Optional[str]]:
    """(loader for the current CUDA device, None) or ("", why none can run there)."""
    index = torch.cuda.current_device()
    result = _index_loader.get(index)
    if result is None:
        result = _index_loader[index] = _capability_loader_name(torch.cuda.get_device_capability(index))
    return result


def _capability_loader_name(capability: tuple[int, int]) -> tuple[str, Optional[str]]:
    if capability in _device_loader:
        return _device_loader[capability]
    name = _default_loader_name()
    reason = loader_reason(name) if name else None
    if name == "extension" and reason is None and not os.environ.get("VTOK_CUDA_LOADER"):
        reason = _extension_arch_reason(_extension_module()[0], capability)
        if reason is not None and loader_reason("cupy-nvrtc") is None:
            name, reason = "cupy-nvrtc", None  # NVRTC compiles for whatever device is present
    if not name:
        reason = ("no loader: " + (_extension_module()[1] or "") +
                  "; or install CuPy for the run-time compile: pip install cupy-cuda12x")
    result = (name if reason is None else "", reason)
    _device_loader[capability] = result
    if result[0]:
        BACKEND.loader = result[0]  # what info() reports: the loader that serves this device
    return result


def availability(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA devices only, not {device_type!r} (use 'cpu' or 'torch' there)"
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch {torch.__version__}"
        return f"no CUDA device is visible to torch ({build}: torch.cuda.is_available() is False)"
    if torch.cuda.get_device_capability() < (8, 0):
        return "the cuda kernels need compute capability 8.0 or newer (Ampere, Hopper)"
    return _device_loader_name()[1]


_loaders: dict = {}


def _loader():
    """The loader serving the current device: one object per loader for the process (the choice
    per device is made once, _device_loader_name)."""
    name, reason = _device_loader_name()
    if reason is not None:
        raise RuntimeError(f"cuda backend: {reason}")
    loader = _loaders.get(name)
    if loader is None:
        loader = _loaders[name] = get_loader(name)
    return loader


# ------------------------------------------------------------------ marshalling

try:  # the raw handle, without a torch.cuda.Stream built per launch (as Triton's driver reads it)
    from torch._C import _cuda_getCurrentRawStream as _current_raw_stream
except ImportError:  # a CPU-only torch
    _current_raw_stream = None


def _stream(t: torch.Tensor) -> int:
    if _current_raw_stream is not None:
        return _current_raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def _num_groups(frames: int, frames_per_token: int) -> int:
    return cuda_nvrtc.num_groups(frames, frames_per_token)


def _too_wide(pool: str, channels: int, num_heads: int) -> bool:
    return pool == "attn" and channels // num_heads > MAX_HEAD_DIM


def keeps_residual32(dtype: torch.dtype, pool: str, channels: int, num_heads: int) -> bool:
    """Whether the forward also returns the residual tokens in float32 for the backward: attn
    pooling in a 16-bit type on the kernels' path (its grad_query would otherwise rest on the
    tokens rounded to 8 or 11 bits of mantissa)."""
    return (pool == "attn" and dtype in (torch.float16, torch.bfloat16)
            and not _too_wide(pool, channels, num_heads))


def _residual32(x: torch.Tensor, rows: int, pool: str, num_heads: int) -> Optional[torch.Tensor]:
    if not keeps_residual32(x.dtype, pool, x.shape[-1], num_heads):
        return None
    return empty_output((rows, x.shape[-1]), torch.float32, x.device)


def _eager():
    from vtok_kernels.backends import get

    return get("torch")


def _encode_fields(x: torch.Tensor, key_index, query, pool, num_heads, frames_per_token, spatial,
                   grid, sequence, lse, varlen=None, residual32=None) -> dict:
    n, c = x.shape[-2], x.shape[-1]
    fields = dict(
        x=x.data_ptr(), x_stride_t=x.stride(-3), x_stride_n=x.stride(-2),
        num_patches=n, channels=c, dtype=_DTYPE_CODES[x.dtype], key_index=key_index.data_ptr(),
        pool=_POOL_CODES[pool], query=query.data_ptr() if query is not None else 0,
        num_heads=num_heads, frames_per_token=frames_per_token,
        spatial=bool(spatial), sequence=sequence.data_ptr(), lse=lse.data_ptr() if lse.numel() else 0,
        residual32=residual32.data_ptr() if residual32 is not None and residual32.numel() else 0,
    )
    if spatial:
        fields.update(grid_h=grid[0], grid_w=grid[1], out_h=spatial[0], out_w=spatial[1],
                      num_key_tokens=spatial[0] * spatial[1])
    else:
        fields.update(num_key_tokens=n)
    if varlen is None:
        fields.update(x_stride_b=x.stride(0), batch=x.shape[0], num_frames=x.shape[1],
                      num_groups=_num_groups(x.shape[1], frames_per_token), cu_frames=0, cu_tokens=0)
    else:
        cu_frames, cu_tokens, max_frames = varlen
        fields.update(x_stride_b=0, batch=cu_frames.numel() - 1, num_frames=max_frames, num_groups=0,
                      cu_frames=cu_frames.data_ptr(), cu_tokens=cu_tokens.data_ptr())
    return fields


def _query(query):
    return None if query is None else query.contiguous().float()


def _grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.to(like.dtype).contiguous()


# ------------------------------------------------------------------ ops

def _launch_fwd(fields: dict, x: torch.Tensor) -> None:
    """Launches the encode forward of ``fields`` with its workspace (the partial rows of a frame's
    patch splits), sized by the launch plan of the forward design ($VTOK_CUDA_FWD, read once)
    after the checks it makes first: a launch the kernels refuse raises before anything is
    allocated. The workspace goes back to torch's allocator once the launch is enqueued: only
    work later on the same stream can reuse it."""
    design = cuda_nvrtc.fwd_design()
    elems = cuda_nvrtc.encode_fwd_workspace_elems(fields, design)
    workspace = torch.empty(elems, dtype=torch.float32, device=x.device) if elems else None
    fields = dict(fields, workspace=workspace.data_ptr() if elems else 0, workspace_elems=elems)
    _loader().encode_fwd(fields, _stream(x), x.device.index, design)


def encode_fwd(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid):
    if _too_wide(pool, x.shape[-1], num_heads):
        return _eager().encode_fwd(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid)
    b, t, n, c = x.shape
    s = spatial[0] * spatial[1] if spatial else n
    g = _num_groups(t, frames_per_token)
    query = _query(query)
    with torch.cuda.device(x.device):
        sequence = empty_output((b, s + g, c), x.dtype, x.device)
        lse = (empty_output((b, g, num_heads), torch.float32, x.device) if pool == "attn"
               else torch.empty(0, dtype=torch.float32, device=x.device))
        residual32 = _residual32(x, b * g, pool, num_heads)
        fields = _encode_fields(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid,
                                sequence, lse, residual32=residual32)
        _launch_fwd(fields, x)
    if residual32 is None:
        return sequence, lse
    return sequence, lse, residual32.view(b, g, c)


def _encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads, frames_per_token,
                spatial, grid, varlen=None, residual32=None):
    c, n = x.shape[-1], x.shape[-2]
    batch = x.shape[0] if varlen is None else varlen[0].numel() - 1
    query = _query(query)
    grad_sequence = _grad(grad_sequence, sequence)
    with torch.cuda.device(x.device):
        grad_x = empty_output(tuple(x.shape), x.dtype, x.device)
        grad_query, workspace = None, None
        if pool == "attn":
            grad_query = empty_output((c,), torch.float32, x.device)
            elems = cuda_nvrtc.encode_bwd_workspace_elems(batch, n, c, lse.numel())
            workspace = empty_output((elems,), torch.float32, x.device)
        fwd = _encode_fields(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid,
                             sequence, lse, varlen, residual32)
        fields = dict(fwd=fwd, grad_sequence=grad_sequence.data_ptr(), grad_x=grad_x.data_ptr(),
                      grad_query=grad_query.data_ptr() if grad_query is not None else 0,
                      workspace=workspace.data_ptr() if workspace is not None else 0,
                      workspace_elems=workspace.numel() if workspace is not None else 0)
        _loader().encode_bwd(fields, _stream(x), x.device.index)
    return grad_x, grad_query


def encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
               frames_per_token, spatial, grid, residual32=None):
    if _too_wide(pool, x.shape[-1], num_heads):
        return _eager().encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
                                   frames_per_token, spatial, grid)
    return _encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
                       frames_per_token, spatial, grid, residual32=residual32)


def encode_varlen_fwd(x, cu_frames, cu_tokens, key_index, query, pool, num_heads,
                      frames_per_token, spatial, grid, max_frames, total_tokens):
    if _too_wide(pool, x.shape[-1], num_heads):
        return _eager().encode_varlen_fwd(x, cu_frames, cu_tokens, key_index, query, pool, num_heads,
                                          frames_per_token, spatial, grid, max_frames, total_tokens)
    n, c = x.shape[-2], x.shape[-1]
    batch = cu_frames.numel() - 1
    s = spatial[0] * spatial[1] if spatial else n
    query = _query(query)
    with torch.cuda.device(x.device):
        sequence = empty_output((total_tokens, c), x.dtype, x.device)
        lse = (empty_output((total_tokens - batch * s, num_heads), torch.float32, x.device)
               if pool == "attn" else torch.empty(0, dtype=torch.float32, device=x.device))
        residual32 = _residual32(x, total_tokens - batch * s, pool, num_heads)
        fields = _encode_fields(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid,
                                sequence, lse, (cu_frames, cu_tokens, max_frames), residual32)
        _launch_fwd(fields, x)
    if residual32 is None:
        return sequence, lse
    return sequence, lse, residual32


def encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse,
                      pool, num_heads, frames_per_token, spatial, grid, max_frames, residual32=None):
    if _too_wide(pool, x.shape[-1], num_heads):
        return _eager().encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index, query,
                                          sequence, lse, pool, num_heads, frames_per_token, spatial,
                                          grid, max_frames)
    return _encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
                       frames_per_token, spatial, grid, (cu_frames, cu_tokens, max_frames), residual32)


def expand_fwd(key_tokens, residual_tokens, key_index, num_frames, frames_per_token):
    b, n, c = key_tokens.shape
    g = residual_tokens.shape[1]
    with torch.cuda.device(key_tokens.device):
        frames = empty_output((b, num_frames, n, c), key_tokens.dtype, key_tokens.device)
        fields = dict(
            key_tokens=key_tokens.data_ptr(), key_stride_b=key_tokens.stride(0), key_stride_n=key_tokens.stride(1),
            residual_tokens=residual_tokens.data_ptr() if g else 0,
            res_stride_b=residual_tokens.stride(0), res_stride_g=residual_tokens.stride(1),
            batch=b, num_frames=num_frames, num_patches=n, channels=c, num_groups=g,
            frames_per_token=frames_per_token, key_index=key_index.data_ptr(),
            dtype=_DTYPE_CODES[key_tokens.dtype], frames=frames.data_ptr(),
        )
        _loader().expand_fwd(fields, _stream(key_tokens), key_tokens.device.index)
    return frames


def expand_bwd(grad_frames, key_index, num_residual, frames_per_token):
    grad_frames = grad_frames.contiguous()
    b, t, n, c = grad_frames.shape
    with torch.cuda.device(grad_frames.device):
        grad_keys = empty_output((b, n, c), grad_frames.dtype, grad_frames.device)
        grad_res = empty_output((b, num_residual, c), grad_frames.dtype, grad_frames.device)
        fields = dict(
            grad_frames=grad_frames.data_ptr(), batch=b, num_frames=t, num_patches=n, channels=c,
            num_groups=num_residual, frames_per_token=frames_per_token, key_index=key_index.data_ptr(),
            dtype=_DTYPE_CODES[grad_frames.dtype], grad_key_tokens=grad_keys.data_ptr(),
            grad_residual_tokens=grad_res.data_ptr() if num_residual else 0,
        )
        _loader().expand_bwd(fields, _stream(grad_frames), grad_frames.device.index)
    return grad_keys, grad_res


# ------------------------------------------------------------------ compile-check rows

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_TYPE_NAMES = {"float": "fp32", "vtok::cuda::half_t": "fp16", "vtok::cuda::bf16_t": "bf16"}
_MODES = {"0": "mean", "1": "attn", "2": "group_sum"}
# residual_fwd_kernel modes that are not a pooling: the merge of the forward's partial rows.
_STAGES = {"3": "merge"}


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _describe(signature: str) -> tuple[str, str, bool]:
    """(kernel, config, default) from a demangled kernel signature."""
    m = re.match(r"(?:void )?vtok::cuda::(\w+)(?:<(.*?)>)?\(", signature)
    if not m:
        return signature, "-", True
    kernel, targs = m.group(1), m.group(2)
    if not targs:
        return kernel, "-", True
    args = [a.strip() for a in targs.split(",")]
    if args[0].isdigit():
        return kernel, f"block={args[0]}", True
    dtype = _TYPE_NAMES.get(args[0], args[0])
    parts = [f"T={dtype}"]
    default = True
    if len(args) > 1:
        vec = int(args[1])
        parts.append(f"V={vec}")
        # The scalar path serves only unaligned rows or C not a multiple of 16 bytes.
        default = vec * (4 if dtype == "fp32" else 2) == 16
    if len(args) > 2:
        stage = _STAGES.get(args[2]) if kernel == "residual_fwd_kernel" else None
        parts.append(stage or "pool=" + (_MODES.get(args[2]) or ("attn" if args[2] == "true" else "mean")))
    if len(args) > 3 and args[2] in ("1", "true", "false") and default:
        # attention forward, and the backward, on 16-byte rows: one instantiation per count of
        # vectors a lane holds
        parts.append(f"K={args[3]}")
    return kernel, ",".join(parts), default


def parse_ptxas(log: str, seconds: float = 0.0) -> list[dict]:
    """Rows from an ``nvcc -Xptxas -v`` log, one per (kernel instantiation, arch)."""
    entries: list[dict] = []
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2)}
            entries.append(current)
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current["spill_stores"], current["spill_loads"] = int(m.group(2)), int(m.group(3))
            continue
        m = _USED.search(line)
        if m and "registers" in line:
            current["registers"] = int(m.group(1))
            current["shared_bytes"] = int(m.group(2) or 0)
    names = _demangle([e["mangled"] for e in entries])
    rows = []
    for entry, name in zip(entries, names):
        kernel, config, default = _describe(name)
        rows.append(dict(kernel=kernel, arch=entry["arch"], config=config, default=default,
                         registers=entry.get("registers"), spill_stores=entry.get("spill_stores", 0),
                         spill_loads=entry.get("spill_loads", 0), shared_bytes=entry.get("shared_bytes", 0),
                         seconds=seconds, source="cuda"))
    return rows


# The device-code flags of the extension's build (CMakeLists.txt, the CUDA compile options of
# _C), so that every static look at the CUDA code (compile-check, sass-report) reads the machine
# code the extension ships. tests/test_machine_code.py checks that CMakeLists.txt still has them.
NVCC_FLAGS = ("-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr")


def find_nvcc() -> Optional[str]:
    local = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(local) if local.exists() else None)


def nvcc_target(arch: str) -> str:
    """The arch nvcc compiles for: ``sm_90`` means ``sm_90a``, the arch the extension ships."""
    return arch + "a" if arch in ("sm_90", "sm_100") else arch


def nvcc_command(nvcc: str, source: Path, arch: str, output: Path, *extra: str) -> list[str]:
    """nvcc on one ``csrc/cuda/*.cu`` with the build's flags and include dirs; ``extra`` picks
    the output (``-c``, ``-cubin``) and adds options such as ``-Xptxas -v``."""
    include, cuda_dir = cuda_nvrtc.source_dirs()
    return [nvcc, *NVCC_FLAGS, f"-arch={nvcc_target(arch)}", f"-I{include}", f"-I{cuda_dir.parent}",
            *extra, str(source), "-o", str(output)]


def cuda_sources() -> list[Path]:
    return sorted(cuda_nvrtc.source_dirs()[1].glob("*.cu"))


def compile_rows(archs: list[str]) -> list[dict]:
    """Registers, spills and shared memory per CUDA kernel, config and arch, from
    ``nvcc -Xptxas -v`` on every ``csrc/cuda/*.cu`` (no GPU needed). ``sm_90`` compiles for
    ``sm_90a``, the arch the extension ships. A compile error is a row with ``error`` set."""
    import time

    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: the CUDA rows of compile-check need the CUDA toolkit on PATH")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            target = nvcc_target(arch)
            for source in cuda_sources():
                start = time.time()
                proc = subprocess.run(
                    nvcc_command(nvcc, source, target, Path(tmp) / (source.stem + ".o"), "-Xptxas", "-v", "-c"),
                    capture_output=True, text=True)
                elapsed = time.time() - start
                if proc.returncode != 0:
                    rows.append(dict(kernel=source.name, arch=target, config="-", default=True,
                                     error=proc.stderr.strip()[-2000:], seconds=elapsed, source="cuda"))
                    continue
                rows.extend(parse_ptxas(proc.stderr, elapsed))
    return rows


BACKEND = register(Backend(
    name="cuda",
    availability=availability,
    impls=impls_of(globals()),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    loader=_default_loader_name(),
    keeps_residual32=keeps_residual32,
))
