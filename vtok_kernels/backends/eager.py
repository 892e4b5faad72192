"""The "torch" backend: the reference itself behind the backend interface.

Always available, on every device and for float64. The backward recomputes the forward under
autograd: it is the contract, not a fast path.
"""
from __future__ import annotations

import contextlib

import torch

from vtok_kernels import reference
from vtok_kernels.backends import Backend, impls_of, register


def _options(pool, num_heads, frames_per_token, spatial, grid) -> dict:
    return dict(
        pool=pool,
        num_heads=num_heads,
        frames_per_token=frames_per_token,
        spatial=tuple(spatial) or None,
        grid=tuple(grid) or None,
    )


@contextlib.contextmanager
def _autograd_inside_op():
    """Records autograd inside a torch.library op, whose kernels run below the Autograd key.

    The reference backward is the reference forward differentiated by autograd; that needs the
    Autograd dispatch key that the op's dispatcher has excluded on the way down.
    """
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False):
        with torch.enable_grad():
            yield


def _grads(outputs, inputs, grad_outputs):
    needed = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(outputs, needed, grad_outputs, allow_unused=True))
    # An input the output does not depend on (the query when T = 1) gets a zero gradient.
    return [
        None if t is None else (g if (g := next(grads)) is not None else torch.zeros_like(t))
        for t in inputs
    ]


def _leaf(t):
    return None if t is None else t.detach().requires_grad_(True)


def encode_fwd(x, key_index, query, pool, num_heads, frames_per_token, spatial, grid):
    opts = _options(pool, num_heads, frames_per_token, spatial, grid)
    return reference.encode(x, key_index, query=query, return_lse=True, **opts)


def encode_bwd(grad_sequence, x, key_index, query, sequence, lse, pool, num_heads,
               frames_per_token, spatial, grid):
    opts = _options(pool, num_heads, frames_per_token, spatial, grid)
    with _autograd_inside_op():
        x_leaf, q_leaf = _leaf(x), _leaf(query)
        out = reference.encode(x_leaf, key_index, query=q_leaf, **opts)
        grad_x, grad_query = _grads(out, [x_leaf, q_leaf], grad_sequence)
    return grad_x.contiguous(), grad_query


def encode_varlen_fwd(x, cu_frames, cu_tokens, key_index, query, pool, num_heads,
                      frames_per_token, spatial, grid, max_frames, total_tokens):
    opts = _options(pool, num_heads, frames_per_token, spatial, grid)
    sequence, _, lse = reference.encode_varlen(
        x, cu_frames, key_index, query=query, return_lse=True, **opts
    )
    return sequence, lse


def encode_varlen_bwd(grad_sequence, x, cu_frames, cu_tokens, key_index, query, sequence, lse,
                      pool, num_heads, frames_per_token, spatial, grid, max_frames):
    opts = _options(pool, num_heads, frames_per_token, spatial, grid)
    with _autograd_inside_op():
        x_leaf, q_leaf = _leaf(x), _leaf(query)
        out, _ = reference.encode_varlen(x_leaf, cu_frames, key_index, query=q_leaf, **opts)
        grad_x, grad_query = _grads(out, [x_leaf, q_leaf], grad_sequence)
    return grad_x.contiguous(), grad_query


def expand_fwd(key_tokens, residual_tokens, key_index, num_frames, frames_per_token):
    return reference.expand(key_tokens, residual_tokens, key_index, num_frames, frames_per_token)


def expand_bwd(grad_frames, key_index, num_residual, frames_per_token):
    B, T, N, C = grad_frames.shape
    with _autograd_inside_op():
        key = grad_frames.new_zeros(B, N, C, requires_grad=True)
        res = grad_frames.new_zeros(B, num_residual, C, requires_grad=True)
        out = reference.expand(key, res, key_index, T, frames_per_token)
        grad_key, grad_res = _grads(out, [key, res], grad_frames)
    return grad_key.contiguous(), grad_res.contiguous()


register(
    Backend(
        name="torch",
        availability=lambda device_type: None,
        impls=impls_of(globals()),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        loader="reference",
    )
)
