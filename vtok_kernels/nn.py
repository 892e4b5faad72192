"""``VTokEncoder``: frame features in, a token sequence for a language model out.

One module holds what a VTok model learns around the fused tokenizer: the attention-pooling
query, the 2-layer MLP ``g_phi`` that the paper applies to residual tokens, a projection of the
key frame's tokens to the model width, and optional type embeddings that tell the two kinds of
tokens apart. Each forward runs exactly one fused ``vtok::encode`` op (one backward op), then the
small dense layers.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from vtok_kernels import api, backends
from vtok_kernels.api import EncodeVarlenOutput
from vtok_kernels.keyframes import METHODS as KEY_FRAME_METHODS
from vtok_kernels.keyframes import select_key_frames
from vtok_kernels.reference import num_groups

KEY_PROJECTIONS = ("linear", "mlp", "identity")
# ViT / BERT convention for learned vectors and dense weights: small enough that the attention
# pooling starts close to the paper's mean pooling, large enough to break its symmetry.
INIT_STD = 0.02


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, device, dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, device=device, dtype=dtype),
        nn.GELU(),
        nn.Linear(hidden_dim, out_dim, device=device, dtype=dtype),
    )


class VTokEncoder(nn.Module):
    """VTok tokenizer with its learned parts: features [B, T, N, C] -> tokens [B, S+G, out_dim].

    Args:
        in_dim: C, the channel width of the frame features (e.g. 1152 for SigLIP).
        out_dim: the width of the output tokens (the language model's hidden size).
        pool: ``"attn"`` (a learned query [in_dim], ``num_heads`` heads) or ``"mean"``.
        num_heads: attention-pooling heads; must divide ``in_dim``. 1 for ``"mean"``.
        hidden_dim: hidden width of ``g_phi`` (Linear, GELU, Linear) on the residual tokens;
            defaults to ``out_dim``.
        key_projection: how key tokens reach ``out_dim``: ``"linear"`` (default), ``"mlp"``
            (the same Linear-GELU-Linear shape as ``g_phi``, as LLaVA-style projectors), or
            ``"identity"`` (needs ``in_dim == out_dim``).
        type_embeddings: add a learned vector to key tokens and another to residual tokens.
        frames_per_token, spatial, grid: passed to :func:`vtok_kernels.encode` (``grid`` gives
            the H x W layout of 4-D features when ``spatial`` is set).
        key_index: the default key frame: an int (negative counts from the end) or a method of
            :func:`vtok_kernels.select_key_frames` (``"first"``, ``"middle"``, ``"medoid"``);
            ``forward`` may override it per call.
        backend: kernel backend (``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``).

    Initialisation (:meth:`reset_parameters`): the query and every Linear weight are drawn from
    a normal distribution with std 0.02 truncated at two std (so the attention scores start small
    and pooling starts close to a mean), Linear biases are zero, and the type embeddings are zero
    (the module starts as if it had none; they learn from the first step).

    Precision: the tokenizer runs in the features' dtype and accumulates in float32. Under
    autocast the dense layers follow autocast; without it, the pooled tokens are cast to the
    parameters' dtype, so bfloat16 features feed a float32 module (and the reverse) directly.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        pool: str = "attn",
        num_heads: int = 1,
        hidden_dim: Optional[int] = None,
        key_projection: str = "linear",
        type_embeddings: bool = True,
        frames_per_token: int = 1,
        spatial: Optional[tuple[int, int]] = None,
        grid: Optional[tuple[int, int]] = None,
        key_index: Union[int, str] = 0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("num_heads", num_heads),
                            ("frames_per_token", frames_per_token)):
            api._check_positive_int(value, name)
        if pool not in api.POOLS:
            raise ValueError(f"pool: expected one of {api.POOLS}, got {pool!r}")
        if pool == "attn" and in_dim % num_heads:
            raise ValueError(f"num_heads: in_dim = {in_dim} must be divisible by num_heads = {num_heads}")
        if pool == "mean" and num_heads != 1:
            raise ValueError(f"num_heads: only pool='attn' has heads, got num_heads={num_heads} with pool='mean'")
        if key_projection not in KEY_PROJECTIONS:
            raise ValueError(f"key_projection: expected one of {KEY_PROJECTIONS}, got {key_projection!r}")
        if key_projection == "identity" and in_dim != out_dim:
            raise ValueError(f"key_projection: 'identity' needs in_dim == out_dim, got {in_dim} and {out_dim}")
        if isinstance(key_index, str) and key_index not in KEY_FRAME_METHODS:
            raise ValueError(f"key_index: expected an int or one of {KEY_FRAME_METHODS}, got {key_index!r}")
        if not isinstance(key_index, str) and not api._is_int(key_index):
            raise TypeError(f"key_index: expected an int or one of {KEY_FRAME_METHODS}, got {type(key_index).__name__}")
        if spatial is not None:
            spatial = api._check_pair(spatial, "spatial")
        if grid is not None:
            grid = api._check_pair(grid, "grid")
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        if backend != "auto":
            backends.get(backend)  # ValueError for an unknown name, here rather than mid-training
        # Load the backend registry now: an import traced for the first time inside
        # torch.compile(fullgraph=True) would be a graph break.
        backends.available_backends("cpu")

        self.in_dim, self.out_dim = in_dim, out_dim
        self.pool, self.num_heads = pool, num_heads
        self.hidden_dim = hidden_dim if hidden_dim is not None else out_dim
        api._check_positive_int(self.hidden_dim, "hidden_dim")
        self.key_projection = key_projection
        self.frames_per_token, self.spatial, self.grid = frames_per_token, spatial, grid
        self.key_index, self.backend = key_index, backend

        factory = dict(device=device, dtype=dtype)
        if pool == "attn":
            self.query = nn.Parameter(torch.empty(in_dim, **factory))
        else:
            self.register_parameter("query", None)
        self.residual_mlp = _mlp(in_dim, self.hidden_dim, out_dim, **factory)  # the paper's g_phi
        if key_projection == "linear":
            self.key_proj = nn.Linear(in_dim, out_dim, **factory)
        elif key_projection == "mlp":
            self.key_proj = _mlp(in_dim, self.hidden_dim, out_dim, **factory)
        else:
            self.key_proj = nn.Identity()
        # Row 0 is added to key tokens, row 1 to residual tokens.
        if type_embeddings:
            self.type_embedding = nn.Parameter(torch.empty(2, out_dim, **factory))
        else:
            self.register_parameter("type_embedding", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Query and Linear weights ~ N(0, 0.02^2) truncated at 2 std; biases and type embeddings 0."""
        if self.query is not None:
            nn.init.trunc_normal_(self.query, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
                nn.init.zeros_(module.bias)
        if self.type_embedding is not None:
            nn.init.zeros_(self.type_embedding)

    @property
    def num_key_tokens_per_video(self) -> Optional[int]:
        """S when ``spatial`` fixes it (h*w); None when it is N, the features' patch count."""
        return self.spatial[0] * self.spatial[1] if self.spatial is not None else None

    def num_tokens(self, num_frames: int, num_patches: int) -> int:
        """Output length S + G for a video of ``num_frames`` frames of ``num_patches`` patches."""
        S = self.num_key_tokens_per_video or num_patches
        return S + num_groups(num_frames, self.frames_per_token)

    # --------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        cu_frames: Optional[Tensor] = None,
        key_index: Union[None, int, str, Tensor] = None,
        max_frames: Optional[int] = None,
        total_tokens: Optional[int] = None,
    ) -> Union[Tensor, EncodeVarlenOutput]:
        """Tokens for a language model.

        x: [B, T, N, C] or [B, T, H, W, C] -> tokens [B, S+G, out_dim]: the S projected key
        tokens, then the G residual tokens through ``g_phi``.

        Packed videos of different lengths: x [F, N, C] or [F, H, W, C] with ``cu_frames`` [B+1]
        -> ``EncodeVarlenOutput(sequence [L, out_dim], cu_tokens [B+1], num_key_tokens,
        max_tokens)``; rows ``cu_tokens[b]:cu_tokens[b+1]`` are video b's S key tokens then its
        G_b residual tokens, ready for a varlen attention kernel.

        key_index overrides the module's default for this call: an int, an int tensor [B], or a
        method of :func:`vtok_kernels.select_key_frames`. With packed videos, ``max_frames`` and
        ``total_tokens`` (see :func:`vtok_kernels.encode_varlen`) spare the host sync that sizes
        the output.
        """
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[-1] != self.in_dim:
            raise ValueError(f"x: expected {self.in_dim} channels (in_dim) in the last dim, got shape {tuple(x.shape)}")
        key = self.key_index if key_index is None else key_index
        if isinstance(key, str):
            if key not in KEY_FRAME_METHODS:
                raise ValueError(f"key_index: expected an int, a tensor or one of {KEY_FRAME_METHODS}, got {key!r}")
            key = 0 if key == "first" else select_key_frames(x, key, cu_frames)
        query = self.query
        if query is not None and query.dtype not in (x.dtype, torch.float32):
            query = query.float()  # a bfloat16 module with float32 features: the API takes either
        options = dict(pool=self.pool, query=query, num_heads=self.num_heads,
                       frames_per_token=self.frames_per_token, spatial=self.spatial, grid=self.grid,
                       backend=self.backend)
        if cu_frames is None:
            tokens = api.encode(x, key, **options)
            keys = self._project_keys(tokens.key_tokens)
            residuals = self._project_residuals(tokens.residual_tokens)
            return torch.cat([keys, residuals.to(keys.dtype)], dim=1)
        packed = api.encode_varlen(x, cu_frames, key, max_frames=max_frames, total_tokens=total_tokens,
                                   **options)
        return EncodeVarlenOutput(self._project_packed(packed), packed.cu_tokens,
                                  packed.num_key_tokens, packed.max_tokens)

    def _dense_input(self, tokens: Tensor) -> Tensor:
        if torch.is_autocast_enabled(tokens.device.type):
            return tokens  # autocast picks the dense layers' precision
        return tokens.to(self.residual_mlp[0].weight.dtype)

    def _project_keys(self, key_tokens: Tensor) -> Tensor:
        out = self.key_proj(self._dense_input(key_tokens))
        if self.type_embedding is not None:
            out = out + self.type_embedding[0].to(out.dtype)
        return out

    def _project_residuals(self, residual_tokens: Tensor) -> Tensor:
        out = self.residual_mlp(self._dense_input(residual_tokens))
        if self.type_embedding is not None:
            out = out + self.type_embedding[1].to(out.dtype)
        return out

    def _project_packed(self, packed: EncodeVarlenOutput) -> Tensor:
        """Projects the key rows and the residual rows of a packed sequence [L, C] -> [L, out_dim].

        Row indices come from cu_tokens on the device (no host round trip): video b's key rows
        are cu_tokens[b] + [0, S); residual row j of the packed groups belongs to the video v
        with cu_groups[v] <= j < cu_groups[v+1] (cu_groups[b] = cu_tokens[b] - b*S) and sits at
        row j + (v+1)*S.
        """
        sequence, cu_tokens, S = packed.sequence, packed.cu_tokens, packed.num_key_tokens
        B, L = cu_tokens.shape[0] - 1, sequence.shape[0]
        device = sequence.device
        key_rows = (cu_tokens[:-1, None] + torch.arange(S, device=device)).reshape(-1)
        cu_groups = cu_tokens - torch.arange(B + 1, device=device) * S
        group = torch.arange(L - B * S, device=device)
        video = torch.searchsorted(cu_groups[1:], group, right=True)
        residual_rows = group + (video + 1) * S
        keys = self._project_keys(sequence.index_select(0, key_rows))
        residuals = self._project_residuals(sequence.index_select(0, residual_rows)).to(keys.dtype)
        rows = torch.cat([key_rows, residual_rows])
        return keys.new_empty((L, keys.shape[1])).index_copy(0, rows, torch.cat([keys, residuals]))

    def extra_repr(self) -> str:
        parts = [f"in_dim={self.in_dim}", f"out_dim={self.out_dim}", f"pool={self.pool!r}"]
        if self.pool == "attn":
            parts.append(f"num_heads={self.num_heads}")
        parts += [f"hidden_dim={self.hidden_dim}", f"key_projection={self.key_projection!r}",
                  f"type_embeddings={self.type_embedding is not None}",
                  f"frames_per_token={self.frames_per_token}"]
        if self.spatial is not None:
            parts.append(f"spatial={self.spatial}")
        if self.grid is not None:
            parts.append(f"grid={self.grid}")
        parts += [f"key_index={self.key_index!r}", f"backend={self.backend!r}"]
        return ", ".join(parts)


__all__ = ["VTokEncoder", "KEY_PROJECTIONS", "INIT_STD"]
