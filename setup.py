"""Builds vtok_kernels with its compiled extension vtok_kernels._C (CMake + pybind11).

    pip install --no-build-isolation -e .     # or: pip install .

Environment switches (as FlashAttention / TransformerEngine users know them):
  MAX_JOBS=N            parallel compile jobs (default: all cores)
  VTOK_SKIP_CUDA=1      never build the CUDA kernels, even when nvcc is found
  VTOK_CUDA_ARCHS=80;90a  CUDA architectures (default "80;90a")
  VTOK_BUILD_DIR=path   CMake build tree (default build/cmake-<python tag>); nvcc's -Xptxas -v
                        report lands in <build dir>/ptxas/<object>.log
  VTOK_REQUIRE_EXTENSION=1  fail the install when _C cannot be built (default: warn, install
                        the pure-Python package; the "torch" backend still works)

If the CUDA part fails to compile the extension is rebuilt CPU-only; if no C++ toolchain is
usable the package installs without _C. Either way the reason is written to
vtok_kernels/_build_status.json and shown by ``python -m vtok_kernels info``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
STATUS_FILE = "_build_status.json"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class BuildFailure(Exception):
    pass


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _tail(text: str, lines: int = 25, chars: int = 2000) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def _find_cmake() -> str | None:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the `cmake` wheel from PyPI
        import cmake  # type: ignore

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except Exception:
        return None


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise BuildFailure(proc.stdout)
    return proc.stdout


def failure_reason(log: str) -> str:
    """One line for vtok_kernels.info(): why the extension was not built, from the build log."""
    if log.startswith(("built without", "pybind11 is not installed")):
        return log
    if "CMAKE_CXX_COMPILER" in log or "no suitable C++ compiler" in log.lower():
        return "built without a C++ compiler: CMake found no usable one (install g++ or clang++)"
    return "the C++ build failed: " + _tail(log, 8)


class CMakeBuild(build_ext):
    def run(self) -> None:
        # As setuptools does: build into build_lib, then copy back for in-place / editable
        # installs. A failed extension is dropped so that the pure-Python package still installs.
        inplace, self.inplace = self.inplace, False
        built = [ext for ext in self.extensions if self._build_or_explain(ext, inplace)]
        self.extensions = built
        self.inplace = inplace
        if built and inplace:
            self.copy_extensions_to_source()

    def _build_or_explain(self, ext: CMakeExtension, inplace: bool) -> bool:
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        extdir.mkdir(parents=True, exist_ok=True)
        status = {"extension": False, "cuda": False, "reason": None, "cuda_reason": None}
        skip_cuda = _truthy("VTOK_SKIP_CUDA")
        self._cuda_configured = False
        try:
            self._cmake_build(ext, extdir, skip_cuda)
            if not skip_cuda and not self._cuda_configured:
                status["cuda_reason"] = self._cuda_skip_reason
            status["cuda"] = self._cuda_configured
            status["extension"] = True
        except BuildFailure as exc:
            if self._cuda_configured:
                warnings.warn("vtok_kernels: the CUDA build failed; building the extension CPU-only.\n"
                              + _tail(str(exc)))
                status["cuda_reason"] = "the CUDA build failed: " + _tail(str(exc), 8)
                try:
                    self._cmake_build(ext, extdir, skip_cuda=True)
                    status["extension"] = True
                except BuildFailure as exc2:
                    status["reason"] = self._reason(str(exc2))
            else:
                status["reason"] = self._reason(str(exc))
        if skip_cuda:
            status["cuda_reason"] = "VTOK_SKIP_CUDA=1 at build time"
        targets = [extdir]
        if inplace:
            build_py = self.get_finalized_command("build_py")
            targets.append(Path(build_py.get_package_dir("vtok_kernels")))
        for target in targets:
            (target / STATUS_FILE).write_text(json.dumps(status, indent=2) + "\n")
        if not status["extension"]:
            if _truthy("VTOK_REQUIRE_EXTENSION"):
                raise RuntimeError(f"vtok_kernels._C could not be built: {status['reason']}")
            warnings.warn(f"vtok_kernels: installing without the compiled extension: {status['reason']}")
        return bool(status["extension"])

    @staticmethod
    def _reason(log: str) -> str:
        return failure_reason(log)

    def _cmake_build(self, ext: CMakeExtension, extdir: Path, skip_cuda: bool) -> str:
        cmake = _find_cmake()
        if cmake is None:
            raise BuildFailure("built without a C++ compiler: cmake was not found (pip install cmake)")
        try:
            import pybind11
        except ImportError as exc:
            raise BuildFailure(f"pybind11 is not installed ({exc}); pip install pybind11") from exc
        tag = sys.implementation.cache_tag or "py"
        build_dir = Path(os.environ.get("VTOK_BUILD_DIR", ROOT / "build" / f"cmake-{tag}")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_RELEASE={extdir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DVTOK_SKIP_CUDA={'ON' if skip_cuda else 'OFF'}",
            f"-DVTOK_CUDA_ARCHS={os.environ.get('VTOK_CUDA_ARCHS', '80;90a')}",
        ]
        if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        output = _run(configure, ROOT)
        self._cuda_configured = "vtok: CUDA enabled" in output
        marker = "vtok: building without CUDA ("
        if marker in output:
            self._cuda_skip_reason = output.split(marker, 1)[1].split(")\n", 1)[0]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        output += _run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], ROOT)
        return output


class BuildPyWithKernelSources(build_py):
    """Ships csrc/include and csrc/cuda inside the package (vtok_kernels/csrc/...): the CuPy
    loader compiles the CUDA kernels from them at run time when _C was built without nvcc."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the checkout
        for folder in ("include", "cuda"):
            source = ROOT / "csrc" / folder
            target = Path(self.build_lib) / "vtok_kernels" / "csrc" / folder
            for path in source.rglob("*"):
                if path.suffix in (".h", ".cuh", ".cu"):
                    self.mkpath(str((target / path.relative_to(source)).parent))
                    self.copy_file(str(path), str(target / path.relative_to(source)), preserve_mode=False)


def main() -> None:
    setup(
        packages=find_packages(include=["vtok_kernels", "vtok_kernels.*"]),
        ext_modules=[CMakeExtension("vtok_kernels._C")],
        cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithKernelSources},
        zip_safe=False,
    )


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    main()
