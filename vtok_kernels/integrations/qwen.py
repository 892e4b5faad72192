"""VTok in the Qwen-VL families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE.

Registered in the adapter registry of :mod:`vtok_kernels.integrations.transformers` (importing
either module registers them), so the same call works::

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    apply_vtok(model, processor)   # grid (t', h', w'): h'·w' + t' - 1 tokens per video

These models encode a video as temporal units: a Conv3d over ``temporal_patch_size`` (2)
frames, the vision transformer, then a 2x2 patch merger, giving t'·h'·w' tokens in (t', h', w')
order, already in the language model's width. VTok runs on that merger output, per video:

* the temporal units are VTok's frames; the key unit keeps its h'·w' tokens, exactly the
  model's own, and every other unit becomes one residual token (g_phi of the pooled difference to
  the key unit); the tokens of a video are laid out in temporal order (units before the key
  unit, its h'·w' tokens, units after it), the order the model reads its own units in;
* positions (3-D M-RoPE): every kept token keeps the position it has without VTok, and a
  residual token takes that of its unit's centre token, (h'//2, w'//2). So the key unit sees
  exactly its own positions, the temporal component of a residual token is its unit's time, and
  text after a video (and the generated tokens) get the same positions as without VTok. This is
  computed by the model's own ``get_rope_index`` on the prompt with every VTok unit expanded
  back to its h'·w' placeholders, then read at the kept tokens: whatever the family does for
  time (Qwen2.5-VL's ``tokens_per_second · second_per_grid_ts``, Qwen3-VL's per-unit grids) is
  the model's code, not a copy;
* placeholders: the processor's own ``replace_video_token`` writes its string (Qwen3-VL: per
  unit ``<{t:.1f} seconds><|vision_start|>`` + pads + ``<|vision_end|>``), then each run of pads
  is cut to VTok's count (Qwen3-VL: the key unit keeps h'·w' pads, every other unit one pad
  between its timestamp and markers);
* deepstack (Qwen3-VL): each level is pooled as the main features (same key unit, same pooling
  and query), so the key unit's level tokens are the model's own and each residual position gets
  the pooled difference of that level; no g_phi there: a deepstack level is added to the
  language model's hidden states, and the pooled difference is already in that level's space and
  width.

The key unit must be known before the features exist (the processor writes the placeholders
first), so ``key_index`` is an int, ``"first"`` or ``"middle"`` (unit t'//2), never ``"medoid"``.
The key unit keeps the model's merged grid (``spatial`` is refused: M-RoPE positions are per
merged patch) and each other unit is one token (``frames_per_token`` is 1: the Conv3d already
merges pairs of frames).
"""
from __future__ import annotations

import inspect
import math
import re
import types
from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor, nn

import transformers
from packaging.version import Version

from vtok_kernels import api
from vtok_kernels.integrations.transformers import (
    VideoAdapter,
    VideoLMEncoder,
    _check_processor,
    _find,
    register_adapter,
)

# Tested with 5.23: get_rope_index(input_ids, mm_token_type_ids, ...) grouping placeholders by
# mm_token_type_ids, get_video_features returning per-video tuples (and deepstack levels),
# generate reading get_video_features' signature. Older releases lay these out differently.
QWEN_MIN_TRANSFORMERS = "5.23.0"

_VIDEO = 2  # mm_token_type_ids of a video placeholder


def unit_key(key_index, num_units: int) -> int:
    """The key unit (0 <= k < num_units) of a video of ``num_units`` temporal units."""
    if isinstance(key_index, str):
        if key_index == "first":
            return 0
        if key_index == "middle":
            return num_units // 2
        raise ValueError(
            f"key_index: {key_index!r} is chosen from the features, but the Qwen-VL processor writes "
            f"each video's placeholders (and timestamps) before any features exist, so the key unit "
            f"must be fixed in advance: an int, 'first' or 'middle'")
    k = int(key_index)
    if not -num_units <= k < num_units:
        raise ValueError(f"key_index: {k} is out of range for a video of {num_units} temporal units "
                         f"(expected [-{num_units}, {num_units}); a negative index or 'middle' fits every length)")
    return k % num_units


def _in_temporal_order(key: Tensor, residual: Tensor, k: int) -> Tensor:
    """[n, S, D] key tokens and [n, t-1, D] residual tokens -> [n, k + S + (t-1-k), D]."""
    return torch.cat([residual[:, :k], key, residual[:, k:]], dim=1)


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


class Qwen2VLAdapter(VideoAdapter):
    """Qwen2-VL (and Qwen2.5-VL, below): one run of t'·h'·w' ``<|video_pad|>`` per video, 3-D positions
    from ``get_rope_index`` (Qwen2.5-VL spaces the temporal component by
    ``tokens_per_second · second_per_grid_ts``). VTok: h'·w' + t' - 1 pads in one run."""

    model_type = "qwen2_vl"
    per_unit_placeholders = False  # Qwen3-VL: one run of pads per temporal unit
    has_deepstack = False

    # ---------------------------------------------------------------------------- checks
    def check_compatible(self, base: nn.Module, processor=None) -> None:
        found = transformers.__version__
        if Version(found) < Version(QWEN_MIN_TRANSFORMERS):
            raise RuntimeError(
                f"apply_vtok: the {self.model_type} adapter needs transformers>={QWEN_MIN_TRANSFORMERS} "
                f"(the get_rope_index / get_video_features it builds on), found {found}: "
                f"pip install -U 'transformers>={QWEN_MIN_TRANSFORMERS}'")
        cls = type(base)
        rope = inspect.signature(cls.get_rope_index).parameters
        missing = {"input_ids", "mm_token_type_ids", "video_grid_thw", "attention_mask"} - set(rope)
        self._require(not missing and any(p.kind is p.VAR_KEYWORD for p in rope.values()),
                      f"{cls.__name__}.get_rope_index(input_ids, mm_token_type_ids, video_grid_thw, "
                      f"attention_mask, **kwargs)", f"get_rope_index{inspect.signature(cls.get_rope_index)}")
        features = _parameters(cls.get_video_features)
        self._require(features[1:3] == ["pixel_values_videos", "video_grid_thw"],
                      f"{cls.__name__}.get_video_features(pixel_values_videos, video_grid_thw, ...)",
                      f"get_video_features{inspect.signature(cls.get_video_features)}")
        self._require(hasattr(base, "visual") and hasattr(base.visual, "merger"),
                      "the vision model at base.visual with its patch merger", "no base.visual.merger")
        if self.has_deepstack:
            self._require(hasattr(base.language_model, "_deepstack_process")
                          and hasattr(base.visual, "deepstack_merger_list"),
                          "deepstack: language_model._deepstack_process and visual.deepstack_merger_list",
                          "one of them missing")
        if processor is not None:
            pcls = type(processor)
            self._require(_parameters(pcls.replace_video_token)[1:3] == ["video_inputs", "video_idx"],
                          f"{pcls.__name__}.replace_video_token(video_inputs, video_idx, ...)",
                          f"replace_video_token{inspect.signature(pcls.replace_video_token)}")
            self._require("video_sizes" in _parameters(pcls._get_num_multimodal_tokens),
                          f"{pcls.__name__}._get_num_multimodal_tokens(image_sizes, video_sizes, ...)",
                          f"_get_num_multimodal_tokens{inspect.signature(pcls._get_num_multimodal_tokens)}")
            video_processor = getattr(processor, "video_processor", None)
            self._require(all(hasattr(video_processor, name) for name in ("merge_size", "temporal_patch_size")),
                          "processor.video_processor with merge_size and temporal_patch_size",
                          type(video_processor).__name__)

    def _require(self, ok: bool, expected: str, found: str) -> None:
        if not ok:
            raise RuntimeError(
                f"apply_vtok: the {self.model_type} adapter relies on {expected}, but transformers "
                f"{transformers.__version__} has {found}; it was written against transformers "
                f"{QWEN_MIN_TRANSFORMERS}: install that version or update the adapter")

    def check_settings(self, config, settings: dict) -> None:
        if settings["spatial"] is not None:
            raise ValueError(f"spatial: {self.model_type} keeps the key unit at the model's merged grid "
                             f"(its M-RoPE positions are per merged patch); leave spatial out, got "
                             f"{tuple(settings['spatial'])}")
        if settings["frames_per_token"] != 1:
            raise ValueError(f"frames_per_token: {self.model_type} gives one residual token per temporal "
                             f"unit (its Conv3d already merges {config.vision_config.temporal_patch_size} "
                             f"frames); expected 1, got {settings['frames_per_token']}")
        unit_key(settings["key_index"], 1 << 30)  # the "medoid" error, before anything is built

    # ---------------------------------------------------------------------- the encoder
    def feature_dim(self, config) -> int:
        return config.text_config.hidden_size  # the merger's output width

    def default_num_heads(self, config, in_dim: int) -> int:
        heads = config.text_config.num_attention_heads  # the features are in the LM's width
        return heads if in_dim % heads == 0 else 1

    def reference_parameter(self, base: nn.Module) -> Tensor:
        return next(base.visual.merger.parameters())

    def bind(self, base: nn.Module) -> None:
        base.get_video_features = types.MethodType(_qwen_get_video_features, base)
        base.get_rope_index = types.MethodType(_qwen_get_rope_index, base)

    def patch_processor(self, processor, config, settings: dict) -> None:
        _check_processor(processor, config)
        key = settings["key_index"]
        processor.replace_video_token = _QwenVideoPlaceholders(processor, self, key)
        processor._get_num_multimodal_tokens = _QwenNumMultimodalTokens(processor, key)

    # ---------------------------------------------------------------------------- counts
    def merged_grid(self, config, num_frames: int, frame_size) -> tuple[int, int, int]:
        """(t', h', w') of a video of ``num_frames`` frames of ``frame_size`` pixels (as resized
        by the processor: multiples of patch_size · spatial_merge_size)."""
        if frame_size is None:
            raise ValueError(f"frame_size: the grid of {self.model_type} follows the frame size; pass "
                             f"frame_size=(height, width) as the processor resizes the frames")
        vision = config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        height, width = api._check_pair(frame_size, "frame_size")
        if height % factor or width % factor:
            raise ValueError(f"frame_size: {height}x{width} is not a multiple of patch_size · spatial_merge_size "
                             f"= {factor}; pass the size the processor resizes the frames to")
        return math.ceil(num_frames / vision.temporal_patch_size), height // factor, width // factor

    def num_video_tokens(self, config, num_frames: int, *, spatial=None, frames_per_token: int = 1,
                         frame_size=None) -> int:
        self.check_settings(config, dict(spatial=spatial, frames_per_token=frames_per_token, key_index=0))
        t, h, w = self.merged_grid(config, num_frames, frame_size)
        return h * w + t - 1

    def num_plain_video_tokens(self, config, num_frames: int, *, frame_size=None) -> int:
        t, h, w = self.merged_grid(config, num_frames, frame_size)
        return t * h * w

    # ---------------------------------------------------------------------- placeholders
    def plain_runs(self, t: int, hw: int) -> list[int]:
        """Pads per placeholder run the model's processor writes for a video of grid (t', h'·w')."""
        return [hw] * t if self.per_unit_placeholders else [t * hw]

    def vtok_runs(self, t: int, hw: int, k: int) -> list[int]:
        """Pads per placeholder run with VTok (key unit k)."""
        if self.per_unit_placeholders:
            return [hw if u == k else 1 for u in range(t)]
        return [hw + t - 1]

    def rewrite_placeholders(self, text: str, video_token: str, t: int, hw: int, k: int) -> str:
        runs = list(re.finditer(f"(?:{re.escape(video_token)})+", text))
        lengths = [(m.end() - m.start()) // len(video_token) for m in runs]
        if lengths != self.plain_runs(t, hw):
            raise RuntimeError(
                f"processor.replace_video_token wrote runs of {lengths} {video_token} for a video of "
                f"t'={t} units of h'·w'={hw}, where the {self.model_type} adapter expects "
                f"{self.plain_runs(t, hw)}: transformers {transformers.__version__} lays out video "
                f"placeholders differently from {QWEN_MIN_TRANSFORMERS}")
        pieces, last = [], 0
        for match, count in zip(runs, self.vtok_runs(t, hw, k)):
            pieces += [text[last:match.start()], video_token * count]
            last = match.end()
        pieces.append(text[last:])
        return "".join(pieces)

    # ---------------------------------------------------------------------------- tokens
    def video_tokens(self, base: nn.Module, encoder: VideoLMEncoder, video_grid_thw: Tensor,
                     pooled, deepstack=None):
        """The model's per-video merger outputs [t'·h'·w', D] (and deepstack levels, each a
        tuple of per-video tensors) -> VTok's per-video tokens [h'·w' + t' - 1, D] (and levels)."""
        merge = base.config.vision_config.spatial_merge_size
        grids = [tuple(grid) for grid in video_grid_thw.tolist()]
        if len(pooled) != len(grids):
            raise ValueError(f"video_grid_thw: {len(grids)} videos, but the vision model gave {len(pooled)}")
        by_grid = defaultdict(list)  # videos of one grid share one encode call
        for index, grid in enumerate(grids):
            by_grid[grid].append(index)
        tokens = [None] * len(grids)
        levels = [[None] * len(grids) for _ in deepstack] if deepstack else None
        for (t, height, width), members in by_grid.items():
            shape = (t, height // merge, width // merge)
            k = unit_key(encoder.key_index, t)
            x = torch.stack([pooled[i] for i in members]).unflatten(1, shape)
            key, residual = encoder(x, key_index=k)
            sequence = _in_temporal_order(key, residual.to(key.dtype), k)
            for row, index in enumerate(members):
                tokens[index] = sequence[row]
            for level, features in enumerate(deepstack or ()):
                x = torch.stack([features[i] for i in members]).unflatten(1, shape)
                query = encoder.query
                if query is not None and query.dtype not in (x.dtype, torch.float32):
                    query = query.float()
                out = api.encode(x, k, pool=encoder.pool, query=query, num_heads=encoder.num_heads,
                                 backend=encoder.backend)
                sequence = _in_temporal_order(out.key_tokens, out.residual_tokens, k)
                for row, index in enumerate(members):
                    levels[level][index] = sequence[row]
        return tuple(tokens), (None if levels is None else [tuple(level) for level in levels])

    # ------------------------------------------------------------------------- positions
    def expand_for_positions(self, input_ids: Tensor, mm_token_type_ids: Tensor,
                             attention_mask: Optional[Tensor], videos: list[tuple[int, int, int, int]],
                             video_token_id: int):
        """The prompt as the model would have it without VTok, for its own get_rope_index.

        videos: (t', h'·w', key unit, centre index) per video, in the order of video_grid_thw.
        Returns the expanded prompts' input_ids, mm_token_type_ids and attention_mask (the valid
        tokens of each row first, then padding), the valid tokens of the given rows [B, L], and
        per row the column of the expanded row that each valid token comes from (a key-unit
        token: its own; a residual token: its unit's centre token).
        """
        B, L = input_ids.shape
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(B, L, dtype=torch.bool, device=input_ids.device))
        rows, video, unit = [], 0, 0
        for b in range(B):
            ids = input_ids[b][valid[b]].tolist()
            kinds = mm_token_type_ids[b][valid[b]].tolist()
            out_ids, out_kinds, source = [], [], []
            i = 0
            while i < len(ids):
                if kinds[i] != _VIDEO:
                    source.append(len(out_ids))
                    out_ids.append(ids[i])
                    out_kinds.append(kinds[i])
                    i += 1
                    continue
                j = i
                while j < len(ids) and kinds[j] == _VIDEO:
                    j += 1
                if video >= len(videos):
                    raise ValueError("input_ids: more runs of video placeholders than videos in video_grid_thw")
                t, hw, k, centre = videos[video]
                units = [unit] if self.per_unit_placeholders else list(range(t))
                expected = sum(hw if u == k else 1 for u in units)
                if j - i != expected:
                    raise ValueError(
                        f"input_ids: a run of {j - i} video placeholders where VTok's layout of video "
                        f"{video} (t'={t} units of h'·w'={hw}, key unit {k}) has {expected}: write the "
                        f"prompts with the processor that apply_vtok patched")
                for u in units:
                    start = len(out_ids)
                    source += list(range(start, start + hw)) if u == k else [start + centre]
                    out_ids += [video_token_id] * hw
                    out_kinds += [_VIDEO] * hw
                unit = units[-1] + 1
                if unit == t:
                    video, unit = video + 1, 0
                i = j
            rows.append((out_ids, out_kinds, source))
        width = max(len(out_ids) for out_ids, _, _ in rows)
        expanded_ids = input_ids.new_zeros((B, width))
        expanded_kinds = mm_token_type_ids.new_zeros((B, width))
        expanded_mask = torch.zeros((B, width), dtype=torch.long, device=input_ids.device)
        sources = []
        for b, (out_ids, out_kinds, source) in enumerate(rows):
            n = len(out_ids)
            expanded_ids[b, :n] = torch.tensor(out_ids, dtype=input_ids.dtype)
            expanded_kinds[b, :n] = torch.tensor(out_kinds, dtype=mm_token_type_ids.dtype)
            expanded_mask[b, :n] = 1
            sources.append(torch.tensor(source, dtype=torch.long, device=input_ids.device))
        return expanded_ids, expanded_kinds, expanded_mask, valid, sources


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (and Qwen3-VL-MoE, below): each temporal unit is written
    ``<{t:.1f} seconds><|vision_start|>`` + h'·w' pads + ``<|vision_end|>`` and gets its own
    (1, h', w') grid in get_rope_index; the vision model also returns deepstack features.
    VTok: the key unit keeps its h'·w' pads, every other unit one pad with its timestamp and
    markers; every deepstack level pooled as the main features."""

    model_type = "qwen3_vl"
    per_unit_placeholders = True
    has_deepstack = True


# ------------------------------------------------------------------------- bound methods
def _qwen_get_video_features(self, pixel_values_videos: Tensor, video_grid_thw: Optional[Tensor] = None,
                             **kwargs):
    """VTok's ``get_video_features``, bound by apply_vtok to this model instance.

    The model's own method runs the vision model; its per-video ``pooler_output`` (and each
    deepstack level) becomes VTok's: h'·w' + t' - 1 tokens per video, in temporal order. Same
    signature as the model's method, which ``forward`` and ``generate`` call.
    """
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if video_grid_thw is None:
        raise ValueError("video_grid_thw: required with pixel_values_videos (the processor returns it)")
    outputs = type(self).get_video_features(self, pixel_values_videos, video_grid_thw, return_dict=True, **kwargs)
    adapter = _find(self)[1]
    deepstack = getattr(outputs, "deepstack_features", None) if adapter.has_deepstack else None
    outputs.pooler_output, deepstack = adapter.video_tokens(self, self.vtok, video_grid_thw,
                                                            outputs.pooler_output, deepstack)
    if deepstack is not None:
        outputs.deepstack_features = deepstack
    return outputs if return_dict else outputs.to_tuple()


def _qwen_get_rope_index(self, input_ids: Tensor, *args, **kwargs):
    """VTok's ``get_rope_index``, bound by apply_vtok to this model instance: the model's own
    positions of the prompt without VTok, read at the tokens VTok keeps (see the module
    docstring); ``rope_deltas`` so that the tokens after the prompt continue as without VTok."""
    original = type(self).get_rope_index
    bound = inspect.signature(original).bind(self, input_ids, *args, **kwargs)
    arguments = bound.arguments
    kinds, grids = arguments.get("mm_token_type_ids"), arguments.get("video_grid_thw")
    if input_ids is None or kinds is None or grids is None:
        return original(self, input_ids, *args, **kwargs)
    adapter = _find(self)[1]
    merge = self.config.vision_config.spatial_merge_size
    videos = []
    for t, height, width in grids.tolist():
        h, w = height // merge, width // merge
        videos.append((t, h * w, unit_key(self.vtok.key_index, t), (h // 2) * w + w // 2))
    kinds = torch.as_tensor(kinds, device=input_ids.device)
    expanded_ids, expanded_kinds, expanded_mask, valid, sources = adapter.expand_for_positions(
        input_ids, kinds, arguments.get("attention_mask"), videos, self.config.video_token_id)
    arguments.update(input_ids=expanded_ids, mm_token_type_ids=expanded_kinds, attention_mask=expanded_mask)
    positions, deltas = original(*bound.args, **bound.kwargs)
    out = torch.zeros((3,) + tuple(input_ids.shape), dtype=positions.dtype, device=positions.device)
    shift = []
    for b, source in enumerate(sources):
        out[:, b, valid[b]] = positions[:, b, source.to(positions.device)]
        shift.append(int(expanded_mask[b].sum()) - int(valid[b].sum()))
    deltas = deltas + torch.tensor(shift, dtype=deltas.dtype, device=deltas.device).view(deltas.shape)
    return out, deltas


# ---------------------------------------------------------------------------- processor
class _QwenVideoPlaceholders:
    """``processor.replace_video_token`` after apply_vtok: the processor's own string (and
    timestamps), its runs of pads cut to VTok's counts."""

    def __init__(self, processor, adapter: Qwen2VLAdapter, key_index) -> None:
        self.processor, self.adapter, self.key_index = processor, adapter, key_index

    def __call__(self, video_inputs: dict, video_idx: int = 0, **kwargs) -> str:
        processor = self.processor
        text = type(processor).replace_video_token(processor, video_inputs, video_idx, **kwargs)
        t, height, width = (int(v) for v in video_inputs["video_grid_thw"][video_idx])
        hw = height * width // processor.video_processor.merge_size ** 2
        return self.adapter.rewrite_placeholders(text, processor.video_token, t, hw, unit_key(self.key_index, t))

    def __deepcopy__(self, memo):
        # As _NumMultimodalTokens: follow a copy of the processor, never copy it for this.
        return _QwenVideoPlaceholders(memo.get(id(self.processor), self.processor), self.adapter, self.key_index)


class _QwenNumMultimodalTokens:
    """``processor._get_num_multimodal_tokens`` after apply_vtok: the processor's own counts
    (t'·h'·w' pads per video) turned into VTok's (h'·w' + t' - 1); images unchanged."""

    def __init__(self, processor, key_index) -> None:
        self.processor, self.key_index = processor, key_index

    def __call__(self, image_sizes=None, video_sizes=None, **kwargs):
        processor = self.processor
        data = type(processor)._get_num_multimodal_tokens(processor, image_sizes=image_sizes,
                                                          video_sizes=video_sizes, **kwargs)
        if video_sizes is not None:
            videos_kwargs = processor._merge_kwargs(**kwargs).get("videos_kwargs", {})
            temporal = videos_kwargs.get("temporal_patch_size") or processor.video_processor.temporal_patch_size
            counts = []
            for sizes, plain in zip(video_sizes, data.num_video_tokens):
                t = math.ceil(int(sizes[0]) / temporal)
                unit_key(self.key_index, t)
                counts.append(int(plain) // t + t - 1)
            data.num_video_tokens = counts
        return data

    def __deepcopy__(self, memo):
        return _QwenNumMultimodalTokens(memo.get(id(self.processor), self.processor), self.key_index)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_type = "qwen2_5_vl"


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_type = "qwen3_vl_moe"


# ----------------------------------------------------------------------------- registry
for _name, _adapter in (("Qwen2VLModel", Qwen2VLAdapter), ("Qwen2_5_VLModel", Qwen2_5_VLAdapter),
                        ("Qwen3VLModel", Qwen3VLAdapter), ("Qwen3VLMoeModel", Qwen3VLMoeAdapter)):
    if getattr(transformers, _name, None) is not None:  # a release without the family: no adapter
        register_adapter(getattr(transformers, _name), _adapter())

__all__ = ["QWEN_MIN_TRANSFORMERS", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter", "Qwen3VLMoeAdapter",
           "unit_key"]
