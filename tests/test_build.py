"""The build and the extension loader: what was compiled, that a missing extension is reported
(never raised), that a machine without a C++ compiler still installs, and that _C stays free of
libtorch and imports without a GPU driver. Nothing here rebuilds the extension."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vtok_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
built = pytest.mark.skipif(_extension.get() is None,
                           reason=f"extension not built: {_extension.unavailable_reason()}")


def _setup_module():
    spec = importlib.util.spec_from_file_location("vtok_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)


@built
def test_status_of_a_built_extension():
    status = _extension.status()
    module = _extension.get()
    assert status["built"] and status["reason"] is None
    assert status["cpu_isa"] in status["cpu_isas_compiled"].split(",")
    assert status["openmp"] == module.built_with_openmp
    assert status["cxx_compiler"]
    if module.built_with_cuda:
        assert module.cuda_archs and status["cuda_reason"] is None
        logs = list(Path(module.ptxas_log_dir).glob("*.log"))
        assert logs and any("registers" in p.read_text() for p in logs)
    else:
        assert status["cuda_reason"]


@built
def test_params_structs_round_trip_pointers():
    C = _extension.get()
    p = C.EncodeParams()
    p.x, p.channels, p.pool = 0x7F0012345670, 1152, C.Pool.attn
    bp = C.EncodeBwdParams()
    bp.fwd = p
    bp.fwd.num_heads = 8  # fwd is the struct inside, not a copy
    assert bp.fwd.x == 0x7F0012345670 and bp.fwd.channels == 1152 and bp.fwd.num_heads == 8


def test_missing_extension_is_reported_not_raised(tmp_path):
    status_file = tmp_path / "_build_status.json"
    status_file.write_text(json.dumps({"extension": False, "reason": "built without a C++ compiler: x"}))
    proc = _python(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vtok_kernels._C":
                    raise ModuleNotFoundError("No module named 'vtok_kernels._C'", name=name)
        sys.meta_path.insert(0, Block())
        from pathlib import Path
        from vtok_kernels import _extension
        _extension._BUILD_STATUS = Path({str(status_file)!r})
        _extension._tried = False  # importing the package may already have asked for _C
        import torch, vtok_kernels as vk
        info = vk.info()
        assert info["extension"]["built"] is False, info["extension"]
        assert "built without a C++ compiler" in info["extension"]["reason"]
        assert "pip install --no-build-isolation -e ." in info["extension"]["reason"]
        cpu = info["backends"]["cpu"]["cpu"]
        assert "compiled extension" in cpu and "C++ compiler" in cpu, cpu
        assert "cpu" not in vk.available_backends("cpu")
        try:
            vk.encode(torch.randn(1, 2, 3, 4), backend="cpu")
        except RuntimeError as exc:
            assert "C++ compiler" in str(exc), exc
        else:
            raise AssertionError("backend='cpu' ran without the extension")
        out = vk.encode(torch.randn(1, 2, 3, 4), backend="torch")
        assert out.sequence.shape == (1, 4, 4)
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_failure_reasons():
    setup = _setup_module()
    assert setup.failure_reason("CMake Error: No CMAKE_CXX_COMPILER could be found.").startswith(
        "built without a C++ compiler")
    assert setup.failure_reason("built without a C++ compiler: cmake was not found").startswith(
        "built without a C++ compiler: cmake")
    assert setup.failure_reason("a\nb\nerror: boom").startswith("the C++ build failed:")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_install_without_a_cxx_compiler_falls_back_to_pure_python(tmp_path):
    """CMake finds no compiler: build_ext warns, builds nothing, records why (about a second)."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), VTOK_BUILD_DIR=str(tmp_path / "cmake"))
    env.pop("VTOK_REQUIRE_EXTENSION", None)
    proc = subprocess.run([sys.executable, str(ROOT / "setup.py"), "-q", "build_ext", "--build-lib",
                           str(tmp_path / "lib")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    status = json.loads((tmp_path / "lib" / "vtok_kernels" / "_build_status.json").read_text())
    assert status["extension"] is False
    assert status["reason"].startswith("built without a C++ compiler")
    assert not list((tmp_path / "lib").rglob("_C*.so"))
    env["VTOK_REQUIRE_EXTENSION"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "setup.py"), "-q", "build_ext", "--build-lib",
                           str(tmp_path / "lib2")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "could not be built" in proc.stderr


@built
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_extension_does_not_link_libtorch_or_the_cuda_driver():
    path = _extension.get().__file__
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    needed = [line for line in needed.splitlines() if "(NEEDED)" in line]
    for lib in ("libtorch", "libc10", "libcuda.so", "libcudart.so"):
        assert not any(lib in line for line in needed), (lib, needed)


@built
def test_extension_imports_in_a_fresh_process_without_torch():
    """The core is framework-free: _C imports alone (and, built with CUDA, without a driver)."""
    proc = _python(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_C", {_extension.get().__file__!r})
        C = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(C)
        assert "torch" not in sys.modules
        print(C.built_with_cuda, C.cpu_isa())
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
