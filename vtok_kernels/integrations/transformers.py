"""VTok in Hugging Face video-language models: ``apply_vtok(model, processor)``.

Every supported family computes its video tokens in the base model's ``get_video_features``;
``forward`` scatters them into the ``video_token_id`` placeholders (after checking that their
numbers match) and ``generate`` calls the same method once before prefill. :func:`apply_vtok`
binds a VTok version of that method to the one model instance it is given (nothing in
transformers is modified: no class, no module global), registers the learned part of VTok as the
submodule ``vtok`` of that base model, records its settings in ``model.config.vtok`` and makes
the processor write exactly as many placeholders as VTok gives::

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    apply_vtok(model, processor)            # T frames: S + (T - 1) (+ 1 newline) tokens per video

Per family, an adapter (:class:`VideoAdapter`, kept in a registry keyed by the base model class)
says where VTok sits, which grid the key frame keeps by default and what is appended.
Images go through the model unchanged. The Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE), whose videos also carry 3-D position ids, timestamps and deepstack features, have
their adapters in :mod:`vtok_kernels.integrations.qwen`, registered when this module is imported.
"""
from __future__ import annotations

import functools
import math
import types
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

try:
    import transformers
    from packaging.version import Version
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "vtok_kernels.integrations.transformers needs transformers: "
        "pip install 'vtok_kernels[transformers]'"
    ) from exc

from vtok_kernels import api, backends
from vtok_kernels.keyframes import METHODS as KEY_FRAME_METHODS
from vtok_kernels.keyframes import select_key_frames
from vtok_kernels.nn import VTokEncoder
from vtok_kernels.reference import num_groups

# The first release with the hooks used here (the tests pass on it and on the pinned 5.23):
# get_video_features(pixel_values_videos, ...) whose pooler_output holds the tokens, and generate
# calling it once before prefill (mm_encoder_outputs). Earlier 5.x name the argument pixel_values.
MIN_TRANSFORMERS = "5.18.0"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"vtok_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS}, "
        f"found {transformers.__version__}: pip install 'vtok_kernels[transformers]'"
    )

from transformers import LlavaNextVideoModel, LlavaOnevisionModel, PreTrainedModel  # noqa: E402

SETTINGS = ("pool", "num_heads", "hidden_dim", "spatial", "key_index", "frames_per_token")


# ------------------------------------------------------------------------------------ encoder
class VideoLMEncoder(VTokEncoder):
    """A :class:`~vtok_kernels.nn.VTokEncoder` for a pretrained video-language model.

    It holds what VTok adds to the model: the attention-pooling query (``pool="attn"``) and
    ``g_phi`` (Linear, GELU, Linear: vision width -> language-model width) on the residual
    tokens. The key tokens keep the vision width: the model's own pretrained projector maps them,
    as it maps every frame without VTok. (That projector is not registered here as well: the
    same tensors under two names break ``save_pretrained``.) No type embeddings: the key tokens
    are exactly the model's own tokens for the key frame, and g_phi's last bias already tells the
    residual tokens apart.

    ``forward(x)``: x [B, T, H, W, C] -> (key tokens [B, S, C] in x's dtype, residual tokens
    [B, G, out_dim]).
    """

    def __init__(self, in_dim: int, out_dim: int, **options) -> None:
        super().__init__(in_dim, out_dim, key_projection="linear", type_embeddings=False, **options)
        self.key_proj = nn.Identity()  # the pretrained projector maps the key tokens
        self.key_projection = "pretrained"

    def forward(self, x: Tensor, key_index: Union[None, int, str, Tensor] = None) -> tuple[Tensor, Tensor]:
        if x.dim() != 5 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x: expected [B, T, H, W, {self.in_dim}], got shape {tuple(x.shape)}")
        key = self.key_index if key_index is None else key_index
        if isinstance(key, str):
            if key not in KEY_FRAME_METHODS:
                raise ValueError(f"key_index: expected an int, a tensor or one of {KEY_FRAME_METHODS}, got {key!r}")
            key = 0 if key == "first" else select_key_frames(x, key)
        query = self.query
        if query is not None and query.dtype not in (x.dtype, torch.float32):
            query = query.float()
        tokens = api.encode(x, key, pool=self.pool, query=query, num_heads=self.num_heads,
                            frames_per_token=self.frames_per_token, spatial=self.spatial,
                            backend=self.backend)
        return tokens.key_tokens, self._project_residuals(tokens.residual_tokens)


# ----------------------------------------------------------------------------------- adapters
class VideoAdapter:
    """How VTok plugs into one family: subclass it and :func:`register_adapter` it.

    VTok reads the vision tower's per-frame features [B, T, H, W, C] (the layer and CLS handling
    of the model's own ``get_video_features``). The key frame's tokens go through
    :meth:`key_tokens` (the model's projector, and its own spatial pooling unless ``spatial`` is
    set), the residual tokens through the encoder's g_phi; :meth:`append` adds what the family
    puts after each video. A video of T frames gives S + G (+ appended) tokens, with
    G = ceil((T - 1) / frames_per_token).
    """

    model_type: str = ""
    appended_tokens: int = 0

    # Hooks that apply_vtok calls; the defaults are the LLaVA families' (features of the vision
    # tower, before the projector). An adapter that works elsewhere overrides them.
    def check_compatible(self, base: nn.Module, processor=None) -> None:
        """Raises if the installed transformers lacks what the adapter relies on."""

    def feature_dim(self, config) -> int:
        """C, the width of the features VTok reads (the encoder's in_dim)."""
        layer = config.vision_feature_layer
        return config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))

    def default_num_heads(self, config, in_dim: int) -> int:
        """Attention-pooling heads when none are given: the vision tower's, which divide its width."""
        heads = config.vision_config.num_attention_heads
        return heads if in_dim % heads == 0 else 1

    def reference_parameter(self, base: nn.Module) -> Tensor:
        """A parameter whose device and dtype the new encoder takes."""
        return base.multi_modal_projector.linear_1.weight

    def check_settings(self, config, settings: dict) -> None:
        """Errors for settings that do not fit this family, before anything is built."""
        if settings["spatial"] is not None:
            spatial, grid = tuple(api._check_pair(settings["spatial"], "spatial")), self.frame_grid(config)
            if spatial[0] > grid[0] or spatial[1] > grid[1]:
                raise ValueError(f"spatial: {spatial} must not exceed the grid {grid}")

    def bind(self, base: nn.Module) -> None:
        """Binds VTok's methods to this one base model instance."""
        base.get_video_features = types.MethodType(_vtok_get_video_features, base)

    def patch_processor(self, processor, config, settings: dict) -> None:
        """Makes the processor write as many video placeholders as VTok gives."""
        _patch_processor(processor, self, config, settings)

    def frame_grid(self, config) -> tuple[int, int]:
        """(H, W): the vision tower's patch grid per frame."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side, side

    def pooled_grid(self, config) -> tuple[int, int]:
        """The grid the model itself keeps per frame: VTok's key frame keeps it by default."""
        raise NotImplementedError

    def key_tokens(self, base: nn.Module, key: Tensor, pooled_by_vtok: bool) -> Tensor:
        """Key-frame features [B, S, C] -> tokens [B, S', D] for the language model."""
        raise NotImplementedError

    def append(self, base: nn.Module, tokens: Tensor) -> Tensor:
        return tokens

    def _no_frame_size(self, frame_size) -> None:
        if frame_size is not None:
            raise ValueError(f"frame_size: {self.model_type} resizes every frame to the vision tower's "
                             f"image_size, so the count does not depend on it; leave frame_size out")

    def num_video_tokens(self, config, num_frames: int, *, spatial=None, frames_per_token: int = 1,
                         frame_size=None) -> int:
        """Placeholders per video of ``num_frames`` frames with VTok."""
        self._no_frame_size(frame_size)
        h, w = spatial if spatial is not None else self.pooled_grid(config)
        return h * w + num_groups(num_frames, frames_per_token) + self.appended_tokens

    def num_plain_video_tokens(self, config, num_frames: int, *, frame_size=None) -> int:
        """Placeholders per video without VTok (every frame at the pooled grid)."""
        self._no_frame_size(frame_size)
        h, w = self.pooled_grid(config)
        return num_frames * h * w + self.appended_tokens

    def video_tokens(self, base: nn.Module, encoder: VideoLMEncoder, x: Tensor) -> Tensor:
        """Features [B, T, H, W, C] -> the video tokens [B, L, D] of each video, in order."""
        key, residual = encoder(x)
        key = self.key_tokens(base, key, pooled_by_vtok=encoder.spatial is not None)
        return self.append(base, torch.cat([key, residual.to(key.dtype)], dim=1))


class LlavaNextVideoAdapter(VideoAdapter):
    """LLaVA-NeXT-Video: vision tower per frame (CLIP, CLS dropped), ``vision_resampler`` (2x2
    average pooling: 24x24 -> 12x12), then ``multi_modal_projector``.

    VTok sits before the projector, on the vision tower's features: residuals are taken where
    the frames were encoded, and only the key frame pays the projector. The key frame goes
    through the model's own resampler and projector, so its tokens are exactly what the model
    gives that frame without VTok; with ``spatial=(h, w)`` VTok's adaptive average pooling
    replaces the resampler. Residual tokens go through g_phi into the language model's width,
    not through the projector: a pooled difference of frames is not a patch feature, the input
    the projector was trained on, and g_phi learns its own map without moving the pretrained
    projector that the key tokens (and images) depend on.
    """

    model_type = "llava_next_video"

    def pooled_grid(self, config) -> tuple[int, int]:
        stride = config.spatial_pool_stride  # kernel = stride, no padding: floor(H / stride)
        H, W = self.frame_grid(config)
        return H // stride, W // stride

    def key_tokens(self, base, key, pooled_by_vtok):
        if not pooled_by_vtok:
            key = base.vision_resampler(key.contiguous())
        return base.multi_modal_projector(key)


class LlavaOnevisionAdapter(VideoAdapter):
    """LLaVA-OneVision: vision tower per frame (SigLIP, no CLS), ``multi_modal_projector``, then
    bilinear pooling to ceil(H/2) x ceil(W/2) (27x27 -> 14x14) and one ``image_newline`` after
    each video.

    VTok sits before the projector, as for LLaVA-NeXT-Video (same reasons): here the model
    projects before it pools, so the key frame goes through the projector and then the model's
    own bilinear pooling, and its tokens are exactly the model's tokens for that frame; with
    ``spatial=(h, w)`` VTok pools the key frame's features (adaptive average) before the
    projector and the bilinear pooling is skipped. After the VTok tokens comes the model's
    ``image_newline``, as after its own video tokens.
    """

    model_type = "llava_onevision"
    appended_tokens = 1

    def pooled_grid(self, config) -> tuple[int, int]:
        H, W = self.frame_grid(config)
        return math.ceil(H / 2), math.ceil(W / 2)

    def key_tokens(self, base, key, pooled_by_vtok):
        key = base.multi_modal_projector(key)
        return key if pooled_by_vtok else base.apply_pooling(key)

    def append(self, base, tokens):
        newline = base.image_newline.to(tokens.device, tokens.dtype)
        return torch.cat([tokens, newline.expand(tokens.shape[0], 1, -1)], dim=1)


ADAPTERS: dict[type, VideoAdapter] = {
    LlavaNextVideoModel: LlavaNextVideoAdapter(),
    LlavaOnevisionModel: LlavaOnevisionAdapter(),
}


def register_adapter(base_model_class: type, adapter: VideoAdapter) -> None:
    """Adds a family: ``base_model_class`` is the class whose ``get_video_features`` makes the
    video tokens (the ``base_model`` of its generation class)."""
    if not isinstance(adapter, VideoAdapter):
        raise TypeError(f"adapter: expected a VideoAdapter, got {type(adapter).__name__}")
    ADAPTERS[base_model_class] = adapter


def _supported() -> str:
    return ", ".join(sorted(adapter.model_type for adapter in ADAPTERS.values()))


def _find(model) -> tuple[nn.Module, VideoAdapter]:
    """The base model that computes the video tokens, and its adapter."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    base = model.base_model
    for cls, adapter in ADAPTERS.items():
        if isinstance(base, cls):
            return base, adapter
    model_type = getattr(model.config, "model_type", None)
    raise NotImplementedError(
        f"apply_vtok: no VTok adapter for {type(model).__name__} (model_type {model_type!r}). "
        f"Supported families: {_supported()}; register_adapter() adds one.")


def adapter_for_config(config) -> VideoAdapter:
    """The adapter of a model config (e.g. to count tokens without building the model)."""
    for adapter in ADAPTERS.values():
        if adapter.model_type == getattr(config, "model_type", None):
            return adapter
    raise NotImplementedError(
        f"no VTok adapter for model_type {getattr(config, 'model_type', None)!r}; supported: {_supported()}")


def num_video_tokens(config, num_frames: int, *, spatial=None, frames_per_token: int = 1,
                     frame_size: Optional[tuple[int, int]] = None) -> int:
    """Tokens per video of ``num_frames`` frames that VTok gives a model of this ``config``
    (``spatial=None``: the key frame keeps the model's own pooled grid). ``frame_size``
    (height, width in pixels, as the processor resized the frames) sets the grid of the Qwen-VL
    families, whose grid follows the frame; the LLaVA families resize every frame to one size
    and refuse it."""
    api._check_positive_int(num_frames, "num_frames")
    api._check_positive_int(frames_per_token, "frames_per_token")
    if spatial is not None:
        spatial = api._check_pair(spatial, "spatial")
    if frame_size is not None:
        frame_size = api._check_pair(frame_size, "frame_size")
    return adapter_for_config(config).num_video_tokens(config, num_frames, spatial=spatial,
                                                       frames_per_token=frames_per_token,
                                                       frame_size=frame_size)


# ------------------------------------------------------------------------ the model's new hook
def _vtok_get_video_features(self, pixel_values_videos: Tensor, vision_feature_layer=None,
                             vision_feature_select_strategy=None, **kwargs):
    """VTok's ``get_video_features``, bound by :func:`apply_vtok` to this model instance.

    pixel_values_videos [B, T, 3, height, width] -> the vision tower's output, its
    ``pooler_output`` [B, L, D] the VTok tokens of each video (L = S + G, plus what the family
    appends). Same signature as the model's own method: ``forward`` and ``generate`` call it as
    they call that one.
    """
    adapter = _find(self)[1]
    return_dict = kwargs.pop("return_dict", True)
    kwargs.pop("output_hidden_states", None)
    layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = (self.config.vision_feature_select_strategy if vision_feature_select_strategy is None
                else vision_feature_select_strategy)
    if not isinstance(pixel_values_videos, Tensor) or pixel_values_videos.dim() != 5:
        raise ValueError("pixel_values_videos: expected a tensor [B, T, channels, height, width], got "
                         f"{getattr(pixel_values_videos, 'shape', type(pixel_values_videos).__name__)}")
    B, T = pixel_values_videos.shape[:2]
    outputs = self.vision_tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True,
                                return_dict=True, **kwargs)
    hidden = outputs.hidden_states
    features = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
    if strategy == "default":
        features = features[:, 1:]  # CLS
    H, W = adapter.frame_grid(self.config)
    if features.shape[1] != H * W:
        raise ValueError(f"pixel_values_videos: the vision tower gave {features.shape[1]} patches per frame, "
                         f"expected the {H}x{W} grid of the config's image_size / patch_size")
    x = features.unflatten(0, (B, T)).unflatten(2, (H, W))  # [B, T, H, W, C], a view
    outputs.pooler_output = adapter.video_tokens(self, self.vtok, x)
    return outputs if return_dict else outputs.to_tuple()


# --------------------------------------------------------------------------------- processor
class _VideoPlaceholders:
    """``processor.replace_video_token`` after apply_vtok: VTok's count of placeholders."""

    def __init__(self, video_token: str, count: Callable[[int], int]) -> None:
        self.video_token, self.count = video_token, count

    def __call__(self, video_inputs: dict, video_idx: int = 0, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]
        num_frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
        return self.video_token * self.count(num_frames)


class _NumMultimodalTokens:
    """``processor._get_num_multimodal_tokens`` after apply_vtok: VTok's video counts, the
    processor's own for images."""

    def __init__(self, processor, count: Callable[[int], int]) -> None:
        self.processor, self.count = processor, count

    def __call__(self, image_sizes=None, video_sizes=None, **kwargs):
        data = type(self.processor)._get_num_multimodal_tokens(self.processor, image_sizes=image_sizes, **kwargs)
        if video_sizes is not None:
            data.num_video_tokens = [self.count(int(sizes[0])) for sizes in video_sizes]
        return data

    def __deepcopy__(self, memo):
        # processor.to_dict() deep-copies the processor's attributes: follow a copy of the
        # processor if one is being made, never copy the processor (and its tokenizer) for this.
        return _NumMultimodalTokens(memo.get(id(self.processor), self.processor), self.count)


def _check_processor(processor, config) -> None:
    if not isinstance(getattr(processor, "video_token", None), str):
        raise TypeError("processor: expected the model's processor (with a video_token), "
                        f"got {type(processor).__name__}")
    token_id = getattr(processor, "video_token_id", None)
    if token_id is not None and token_id != config.video_token_id:
        raise ValueError(f"processor: its video_token_id {token_id} is not the model's {config.video_token_id}")


def _patch_processor(processor, adapter: VideoAdapter, config, settings: dict) -> None:
    _check_processor(processor, config)
    spatial = tuple(settings["spatial"]) if settings["spatial"] is not None else None
    # A partial of the adapter's method, not a closure: the processor stays picklable (DataLoader
    # workers that spawn).
    count = functools.partial(adapter.num_video_tokens, config, spatial=spatial,
                              frames_per_token=settings["frames_per_token"])
    processor.replace_video_token = _VideoPlaceholders(processor.video_token, count)
    processor._get_num_multimodal_tokens = _NumMultimodalTokens(processor, count)


# ---------------------------------------------------------------------------------- settings
def _resolve_settings(adapter: VideoAdapter, config, requested: dict, in_dim: int) -> dict:
    """Explicit arguments, else those recorded in ``config.vtok``, else the family's defaults.
    Arguments that contradict the recorded ones (the settings of saved weights) are an error."""
    recorded = getattr(config, "vtok", None)
    if recorded is not None and not isinstance(recorded, dict):
        raise TypeError(f"model.config.vtok: expected a dict of VTok settings, got {type(recorded).__name__}")
    recorded = dict(recorded or {})
    if "spatial" in requested and requested["spatial"] is not None:
        requested["spatial"] = list(api._check_pair(requested["spatial"], "spatial"))
    for name, value in requested.items():
        if name in recorded and recorded[name] != value:
            raise ValueError(
                f"{name}: model.config.vtok records {name}={recorded[name]!r} (the settings VTok was "
                f"applied or saved with), got {value!r}; build the model without config.vtok to change it")
    settings = {**recorded, **requested}
    pool = settings.setdefault("pool", "attn")
    if pool == "attn" and "num_heads" not in settings:
        settings["num_heads"] = adapter.default_num_heads(config, in_dim)
    settings.setdefault("num_heads", 1)
    settings.setdefault("hidden_dim", config.text_config.hidden_size)
    settings.setdefault("spatial", None)
    settings.setdefault("key_index", 0)
    settings.setdefault("frames_per_token", 1)
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"model.config.vtok: unknown settings {sorted(unknown)}; expected {SETTINGS}")
    adapter.check_settings(config, settings)
    return {name: settings[name] for name in SETTINGS}


def _check_arguments(pool, num_heads, spatial, key_index, frames_per_token, hidden_dim, backend) -> None:
    """The errors encode and VTokEncoder give, before anything is compared or built."""
    if pool is not None:
        if not isinstance(pool, str):
            raise TypeError(f"pool: expected a str, one of {api.POOLS}, got {type(pool).__name__}")
        if pool not in api.POOLS:
            raise ValueError(f"pool: expected one of {api.POOLS}, got {pool!r}")
    for name, value in (("num_heads", num_heads), ("frames_per_token", frames_per_token),
                        ("hidden_dim", hidden_dim)):
        if value is not None:
            api._check_positive_int(value, name)
    if spatial is not None:
        api._check_pair(spatial, "spatial")
    if key_index is not None:
        if isinstance(key_index, str):
            if key_index not in KEY_FRAME_METHODS:
                raise ValueError(f"key_index: expected an int or one of {KEY_FRAME_METHODS}, got {key_index!r}")
        elif not api._is_int(key_index):
            raise TypeError(f"key_index: expected an int or one of {KEY_FRAME_METHODS}, got {type(key_index).__name__}")
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        if backend != "auto":
            backends.get(backend)


def _settings_of(encoder: VTokEncoder) -> dict:
    return dict(pool=encoder.pool, num_heads=encoder.num_heads, hidden_dim=encoder.hidden_dim,
                spatial=list(encoder.spatial) if encoder.spatial is not None else None,
                key_index=encoder.key_index, frames_per_token=encoder.frames_per_token)


# ------------------------------------------------------------------------------ saved weights
def _checkpoint_files(source: str) -> list[Path]:
    """The safetensors files of a local checkpoint directory or of a cached hub snapshot (never
    a download: from_pretrained has just fetched them)."""
    if not source:
        return []
    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:
            return []
    return sorted(path.glob("*.safetensors"))


def _load_saved_weights(encoder: VideoLMEncoder, source: str) -> bool:
    """Loads ``*.vtok.*`` tensors of the checkpoint ``source`` into ``encoder``; False if it has none."""
    from safetensors import safe_open

    state = {}
    for file in _checkpoint_files(source):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                parts = key.split(".")
                if "vtok" in parts:
                    state[".".join(parts[parts.index("vtok") + 1:])] = handle.get_tensor(key)
    if not state:
        return False
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the VTok weights in {source!r} do not fit model.config.vtok: "
                         f"missing {missing}, unexpected {unexpected}")
    return True


# ---------------------------------------------------------------------------------- apply_vtok
def apply_vtok(
    model: PreTrainedModel,
    processor=None,
    *,
    pool: Optional[str] = None,
    num_heads: Optional[int] = None,
    spatial: Optional[tuple[int, int]] = None,
    key_index: Union[None, int, str] = None,
    frames_per_token: Optional[int] = None,
    hidden_dim: Optional[int] = None,
    backend: Optional[str] = None,
) -> VTokEncoder:
    """Makes ``model`` (and ``processor``) tokenize videos with VTok; returns the VTok encoder.

    A video of T frames becomes S key tokens (the key frame at the model's own pooled grid, or
    ``spatial``), one residual token per ``frames_per_token`` other frames, and what the family
    appends (LLaVA-OneVision's newline): ``num_video_tokens(model.config, T)``.

    model: a supported ``...ForConditionalGeneration`` or its base model (LLaVA-NeXT-Video,
        LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE; others raise
        NotImplementedError). The encoder becomes the
        submodule ``vtok`` of its base model (``model.model.vtok``, state-dict keys
        ``model.vtok.*``): it follows ``.to()``, ``parameters()`` and ``state_dict()``. Only
        this instance's ``get_video_features`` (Qwen-VL: and ``get_rope_index``) changes;
        images are untouched.
    processor: the model's processor; its ``replace_video_token`` (and
        ``_get_num_multimodal_tokens``) then count VTok's tokens.
    pool, num_heads, spatial, key_index, frames_per_token, hidden_dim: as in
        :class:`~vtok_kernels.nn.VTokEncoder`. Defaults: ``pool="attn"`` with the vision tower's
        head count, ``spatial=None`` (the model's own pooled grid through the model's own
        pooling), ``key_index=0``, ``frames_per_token=1``, ``hidden_dim`` the language model's
        width. They are recorded in ``model.config.vtok``; a model saved after apply_vtok and
        loaded with its plain class gets them back, and its VTok weights, from
        ``apply_vtok(model)``. Calling apply_vtok again is harmless.
    backend: kernel backend, ``"auto"`` for a new encoder, unchanged when given None again (not
        recorded: a property of the machine, not of the model).
    """
    base, adapter = _find(model)
    config = base.config
    adapter.check_compatible(base, processor)
    _check_arguments(pool, num_heads, spatial, key_index, frames_per_token, hidden_dim, backend)
    in_dim = adapter.feature_dim(config)
    requested = {name: value for name, value in dict(
        pool=pool, num_heads=num_heads, spatial=spatial, key_index=key_index,
        frames_per_token=frames_per_token, hidden_dim=hidden_dim).items() if value is not None}
    encoder = base._modules.get("vtok")
    if isinstance(encoder, VideoLMEncoder):  # applied before: the recorded settings are its own
        config.vtok = _settings_of(encoder)
    settings = _resolve_settings(adapter, config, requested, in_dim)
    if not isinstance(encoder, VideoLMEncoder):
        reference = adapter.reference_parameter(base)
        encoder = VideoLMEncoder(
            in_dim, config.text_config.hidden_size, pool=settings["pool"], num_heads=settings["num_heads"],
            hidden_dim=settings["hidden_dim"], frames_per_token=settings["frames_per_token"],
            spatial=tuple(settings["spatial"]) if settings["spatial"] is not None else None,
            key_index=settings["key_index"], backend=backend or "auto",
            device=reference.device, dtype=reference.dtype)
        source = str(getattr(model, "name_or_path", "") or "")
        if getattr(config, "vtok", None) is not None and not _load_saved_weights(encoder, source) and source:
            warnings.warn(f"model.config.vtok records VTok settings but {source!r} holds no VTok weights "
                          f"(*.vtok.* tensors): the VTok encoder starts from fresh weights", stacklevel=2)
        base.add_module("vtok", encoder)
    if backend is not None:
        encoder.backend = backend
    config.vtok = settings
    adapter.bind(base)
    if processor is not None:
        adapter.patch_processor(processor, config, settings)
    return encoder


# The Qwen-VL adapters register themselves in ADAPTERS (imported last: they build on the above;
# importing that module first works too, hence the names below are looked up when asked for).
from vtok_kernels.integrations import qwen as _qwen  # noqa: E402

_FROM_QWEN = ("QWEN_MIN_TRANSFORMERS", "Qwen2VLAdapter", "Qwen3VLAdapter")


def __getattr__(name: str):
    if name in _FROM_QWEN:
        return getattr(_qwen, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADAPTERS",
    "LlavaNextVideoAdapter",
    "LlavaOnevisionAdapter",
    "MIN_TRANSFORMERS",
    "QWEN_MIN_TRANSFORMERS",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "VideoAdapter",
    "VideoLMEncoder",
    "adapter_for_config",
    "apply_vtok",
    "num_video_tokens",
    "register_adapter",
]
