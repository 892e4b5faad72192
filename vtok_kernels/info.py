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


def format_info(data: dict) -> str:
    lines = [
        f"vtok_kernels {data['vtok_kernels']}  torch {data['torch']}  python {data['python']}",
        f"devices: {', '.join(data['devices'])}" + (f" ({data['cuda_device']})" if data["cuda_device"] else ""),
        f"extension vtok_kernels._C: " + ("built" if data["extension"].get("built") else f"not built: {data['extension'].get('reason')}"),
        "backends:",
    ]
    for name, entry in data["backends"].items():
        loader = f" [loader: {entry['loader']}]" if entry.get("loader") else ""
        lines.append(f"  {name}{loader}")
        for device in ("cpu", "cuda"):
            lines.append(f"    {device:5s} {entry[device]}")
    return "\n".join(lines)
