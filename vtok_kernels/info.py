"""What this installation can run: versions, the compiled extension, and each backend's status."""
from __future__ import annotations

import platform

import torch

from vtok_kernels import backends


def _extension_status() -> dict:
    try:
        from vtok_kernels import _extension
    except Exception as exc:  # the loader module itself is optional in a pure-Python install
        return {"built": False, "reason": f"extension loader unavailable: {exc}"}
    return _extension.status()


def info() -> dict:
    """A dict describing the installation; ``python -m vtok_kernels info`` prints it."""
    import vtok_kernels

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    for name in backends.KNOWN_BACKENDS:
        entry = {}
        for device in ("cpu", "cuda"):
            reason = backends.unavailable_reason(name, device)
            entry[device] = "available" if reason is None else reason
        try:
            entry["loader"] = backends.get(name).loader
        except RuntimeError:
            entry["loader"] = None
        table[name] = entry
    return {
        "vtok_kernels": vtok_kernels.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "devices": devices,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": _extension_status(),
        "backends": table,
    }


def _format_extension(ext: dict) -> str:
    if not ext.get("built"):
        return f"not built: {ext.get('reason')}"
    parts = [f"built with {ext.get('cxx_compiler', '?')}",
             "OpenMP" if ext.get("openmp") else "no OpenMP",
             f"CPU kernels for {ext.get('cpu_isas_compiled', '?')} (running {ext.get('cpu_isa', '?')})"]
    if ext.get("cuda"):
        archs = ", ".join(f"sm_{a}" for a in str(ext.get("cuda_archs", "?")).replace(";", ",").split(","))
        parts.append(f"CUDA kernels by {ext.get('cuda_compiler', 'nvcc')} for {archs}")
    else:
        parts.append(f"no CUDA kernels: {ext.get('cuda_reason')}")
    return "; ".join(parts)


def format_info(data: dict) -> str:
    lines = [
        f"vtok_kernels {data['vtok_kernels']}  torch {data['torch']}  python {data['python']}",
        f"devices: {', '.join(data['devices'])}" + (f" ({data['cuda_device']})" if data["cuda_device"] else ""),
        "extension vtok_kernels._C: " + _format_extension(data["extension"]),
        "backends:",
    ]
    for name, entry in data["backends"].items():
        loader = f" [loader: {entry['loader']}]" if entry.get("loader") else ""
        lines.append(f"  {name}{loader}")
        for device in ("cpu", "cuda"):
            lines.append(f"    {device:5s} {entry[device]}")
    return "\n".join(lines)
