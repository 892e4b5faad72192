"""vtok_kernels: fused kernels for VTok video tokenization.

A video of T frames with N patch tokens becomes N + (T - 1) tokens: the key frame's tokens and
one residual token per other frame (its features minus the key frame's, pooled over space).
"""
from vtok_kernels import backends as _backends
from vtok_kernels import reference
from vtok_kernels.api import (
    EncodeOutput,
    EncodeVarlenOutput,
    available_backends,
    encode,
    encode_varlen,
    expand,
)
from vtok_kernels.info import info
from vtok_kernels.keyframes import select_key_frames
from vtok_kernels import nn

__version__ = "0.1.0"

# The backends register themselves on import. Doing it here, not on the first call, lets that
# first call sit inside torch.compile(fullgraph=True): dynamo cannot trace an import.
_backends._load_all()

__all__ = [
    "EncodeOutput",
    "EncodeVarlenOutput",
    "available_backends",
    "encode",
    "encode_varlen",
    "expand",
    "info",
    "nn",
    "reference",
    "select_key_frames",
]
