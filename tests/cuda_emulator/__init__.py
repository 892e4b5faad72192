"""The CUDA kernels of ``csrc/cuda`` run on the host (``emulator.h``), driven by the CuPy
loader's launch sequence, so CI without a GPU executes the real kernel bodies."""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from vtok_kernels.backends import cuda_nvrtc

HERE = Path(__file__).resolve().parent

# Kernel family -> the params struct types of its arguments, in order.
_ARGS = {
    "residual_fwd_kernel": ("vtok::EncodeParams", "vtok::cuda::RowPlan"),
    "key_tokens_kernel": ("vtok::EncodeParams",),
    "encode_bwd_kernel": ("vtok::EncodeBwdParams", "vtok::cuda::RowPlan"),
    "warp_pool_kernel": ("vtok::EncodeParams", "vtok::cuda::RowPlan"),
    "attn_delta_kernel": ("vtok::EncodeBwdParams",),
    "grad_query_reduce_kernel": ("vtok::EncodeBwdParams", "int64_t"),
    "expand_fwd_kernel": ("vtok::ExpandParams",),
    "expand_grad_keys_kernel": ("vtok::ExpandBwdParams",),
}


def _source() -> str:
    lines = ['#include "emulator.h"', '#include "encode.cuh"', '#include "expand.cuh"', "#include <cstring>",
             "#include <string>", ""]
    entries = []
    for index, name in enumerate(cuda_nvrtc.kernel_names()):
        family = re.match(r"vtok::cuda::(\w+)", name).group(1)
        types = _ARGS[family]
        unpack = "".join(f"  {t} a{i}; std::memcpy(&a{i}, args[{i}], sizeof(a{i}));\n" for i, t in enumerate(types))
        call = ", ".join(f"a{i}" for i in range(len(types)))
        lines.append(f"static void k{index}(const void* closure) {{\n"
                     f"  const void* const* args = static_cast<const void* const*>(closure);\n"
                     f"{unpack}  {name}({call});\n}}")
        entries.append(f'  if (name == std::string("{name}")) return k{index};')
    lines.append("static void (*find(const char* name))(const void*) {\n" + "\n".join(entries) + "\n  return nullptr;\n}")
    lines.append('extern "C" int vtok_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,\n'
                 "                               const void* arg0, const void* arg1) {\n"
                 "  auto body = find(name);\n  if (body == nullptr) return 1;\n"
                 "  const void* args[2] = {arg0, arg1};\n"
                 f"  emu::run(dim3{{gx, gy, gz}}, {cuda_nvrtc.THREADS}, body, args);\n  return 0;\n}}")
    return "\n".join(lines) + "\n"


_PROBE: list = []


def unavailable_reason() -> Optional[str]:
    """None if g++ can build the emulator (C++20 <barrier>, _Float16), else why not."""
    if not _PROBE:
        if shutil.which("g++") is None:
            _PROBE.append("the CUDA emulator needs g++")
        else:
            probe = "#include <barrier>\nint main() { std::barrier<> b(1); _Float16 h = 1; return (int)(float)h - 1; }\n"
            proc = subprocess.run(["g++", "-std=c++20", "-x", "c++", "-", "-o", "/dev/null", "-pthread"],
                                  input=probe, capture_output=True, text=True)
            _PROBE.append(None if proc.returncode == 0 else
                          f"the CUDA emulator needs g++ with C++20 <barrier> and _Float16: {proc.stderr[-300:]}")
    return _PROBE[0]


_LIB = None


def library() -> ctypes.CDLL:
    """The emulator built from the current sources (cached by their hash)."""
    global _LIB
    if _LIB is not None:
        return _LIB
    include, cuda = cuda_nvrtc.source_dirs()
    source = _source()
    digest = hashlib.sha256(source.encode())
    for path in sorted(list(cuda.glob("*.cuh")) + list(include.glob("vtok/*.h")) + [HERE / "emulator.h"]):
        digest.update(path.read_bytes())
    out = Path(tempfile.gettempdir()) / f"vtok_cuda_emulator_{digest.hexdigest()[:16]}.so"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "emulator.cpp"
            src.write_text(source)
            tmp_out = Path(tmp) / out.name
            subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE}", f"-I{include}",
                            f"-I{cuda}", str(src), "-o", str(tmp_out)], check=True, capture_output=True, text=True)
            shutil.move(str(tmp_out), out)
    lib = ctypes.CDLL(str(out))
    lib.vtok_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                                    ctypes.c_void_p]
    lib.vtok_emu_launch.restype = ctypes.c_int
    _LIB = lib
    return lib


class EmulatedLoader(cuda_nvrtc.NvrtcLoader):
    """The CuPy loader's launch plan and grids, with kernels run by the host emulator."""

    name = "emulator"

    def __init__(self):
        self.launches = []

    def _launch(self, device_index, stream, kernel, grid, args):
        buffers = [np.ascontiguousarray(a).tobytes() if isinstance(a, np.ndarray) else np.int64(a).tobytes()
                   for a in args]
        keep = [ctypes.create_string_buffer(b, len(b)) for b in buffers] + [None] * (2 - len(buffers))
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.launches.append((kernel, grid))
        status = library().vtok_emu_launch(kernel.encode(), *grid, *[ctypes.cast(k, ctypes.c_void_p) if k else None
                                                                      for k in keep])
        if status != 0:
            raise RuntimeError(f"emulator: no kernel {kernel!r}")
