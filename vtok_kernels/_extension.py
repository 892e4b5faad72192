"""Loads the compiled extension ``vtok_kernels._C`` without ever raising.

The extension is optional: a machine without a C++ compiler installs the pure-Python package and
the "torch" backend still runs. Why ``_C`` is missing (or built without CUDA / OpenMP) is kept
here and shown by ``vtok_kernels.info()`` and the backends' availability messages.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Optional

_BUILD_STATUS = Path(__file__).with_name("_build_status.json")
HOW_TO_BUILD = "build it with `pip install --no-build-isolation -e .` on a machine with a C++ compiler and CMake"

_module: Optional[ModuleType] = None
_reason: Optional[str] = None
_tried = False


def build_status() -> dict:
    """What setup.py recorded about the last build (empty if it never ran here)."""
    try:
        return json.loads(_BUILD_STATUS.read_text())
    except (OSError, ValueError):
        return {}


def _load() -> None:
    global _module, _reason, _tried
    if _tried:
        return
    _tried = True
    try:
        _module = importlib.import_module("vtok_kernels._C")
        return
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "vtok_kernels._C"
        if not missing:
            _reason = f"vtok_kernels._C failed to import: {exc}"
            return
    except Exception as exc:  # a broken binary must not break `import vtok_kernels`
        _reason = f"vtok_kernels._C failed to import: {type(exc).__name__}: {exc}"
        return
    recorded = build_status().get("reason")
    if recorded:
        _reason = f"{recorded}; {HOW_TO_BUILD}"
    else:
        _reason = f"vtok_kernels._C is not built; {HOW_TO_BUILD}"


def get() -> Optional[ModuleType]:
    """The extension module, or None when it is absent (see :func:`unavailable_reason`)."""
    _load()
    return _module


def unavailable_reason() -> Optional[str]:
    """None when ``_C`` imported, else why not and how to build it."""
    _load()
    return _reason


def status() -> dict:
    """The extension's build facts for ``vtok_kernels.info()``."""
    module = get()
    recorded = build_status()
    if module is None:
        return {"built": False, "reason": _reason, "build": recorded or None}
    cuda_reason = None
    if not module.built_with_cuda:
        cuda_reason = recorded.get("cuda_reason") or "built without CUDA"
    return {
        "built": True,
        "reason": None,
        "path": getattr(module, "__file__", None),
        "openmp": bool(module.built_with_openmp),
        "cuda": bool(module.built_with_cuda),
        "cuda_reason": cuda_reason,
        "cuda_archs": module.cuda_archs,
        "cxx_compiler": module.cxx_compiler,
        "cuda_compiler": module.cuda_compiler,
        "cpu_isa": module.cpu_isa(),
        "cpu_isas_compiled": module.cpu_isas_compiled,
        "ptxas_log_dir": module.ptxas_log_dir or None,
    }
