"""apply_vtok on the Qwen-VL families: tiny random Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE
models built from configs (no download), on the CPU.

Placeholders per video = h'·w' + t' - 1 (Qwen3-VL: the exact string with its timestamps); the
key unit's tokens (and deepstack levels) are the unpatched model's, the residual tokens g_phi of
the reference pooling; the positions of the kept tokens are the unpatched model's; an image +
video prompt is unchanged up to the video; a one-unit video gives identical logits; gradients;
greedy cached generate against an uncached forward with left padding; beams; save and reload;
refusals and the guard on transformers.

The Qwen video processors need torchvision, which has no build for this torch on the CPU: the
processors here are the real Qwen2VLProcessor / Qwen2_5_VLProcessor / Qwen3VLProcessor (their
own placeholder and timestamp logic, patched by apply_vtok) around stub image and video
processors that cut frames into patches in the layout of the real ones (rows in (t', h', w')
order, each 2x2 merge group consecutive), and a word-level tokenizer.
"""
from __future__ import annotations

import copy
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.feature_extraction_utils import BatchFeature  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402
from tests.utils import fresh_copies  # noqa: E402

from vtok_kernels import backends, reference  # noqa: E402
from vtok_kernels.integrations.transformers import (  # noqa: E402
    QWEN_MIN_TRANSFORMERS,
    adapter_for_config,
    apply_vtok,
    num_video_tokens,
)

BACKEND = "cpu" if backends.unavailable_reason("cpu", "cpu") is None else "torch"
ROOT = Path(__file__).resolve().parents[1]
PATCH, MERGE, TEMPORAL = 4, 2, 2  # a merged patch covers 8x8 pixels of 2 frames
WORDS = ["<unk>", "<pad>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<", ">",
         ".", "seconds", *"0123456789", "USER:", "ASSISTANT:", "what", "is", "this", "?", "a", "the"]
PAD, IMAGE, VIDEO, VSTART, VEND = 1, 2, 3, 4, 5
TOKEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
HIDDEN = 32

TEXT = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, vocab_size=len(WORDS) + 4, pad_token_id=PAD,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
VISION = dict(depth=1, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
FAMILIES = {
    "qwen2_vl": dict(config="Qwen2VLConfig", model="Qwen2VLForConditionalGeneration", processor="Qwen2VLProcessor",
                     vision=dict(VISION, embed_dim=16, hidden_size=HIDDEN, mlp_ratio=2), text=TEXT),
    "qwen2_5_vl": dict(config="Qwen2_5_VLConfig", model="Qwen2_5_VLForConditionalGeneration",
                       processor="Qwen2_5_VLProcessor",
                       vision=dict(VISION, hidden_size=16, intermediate_size=32, out_hidden_size=HIDDEN), text=TEXT),
    "qwen3_vl": dict(config="Qwen3VLConfig", model="Qwen3VLForConditionalGeneration", processor="Qwen3VLProcessor",
                     vision=dict(VISION, hidden_size=16, intermediate_size=32, out_hidden_size=HIDDEN,
                                 num_position_embeddings=16, deepstack_visual_indexes=[0]), text=TEXT),
    "qwen3_vl_moe": dict(config="Qwen3VLMoeConfig", model="Qwen3VLMoeForConditionalGeneration",
                         processor="Qwen3VLProcessor",
                         vision=dict(VISION, depth=2, hidden_size=16, intermediate_size=32, out_hidden_size=HIDDEN,
                                     num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
                         text=dict(TEXT, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
}
DEEPSTACK = ("qwen3_vl", "qwen3_vl_moe")


def _build(family: str):
    spec = FAMILIES[family]
    config = getattr(transformers, spec["config"])(vision_config=spec["vision"], text_config=spec["text"],
                                                   **TOKEN_IDS)
    torch.manual_seed(0)
    model = getattr(transformers, spec["model"])(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


# A new instance of a family's tiny model.
fresh_model = fresh_copies(_build)


def patchify(frames) -> tuple[torch.Tensor, list[int]]:
    """frames [T, 3, H, W] -> rows [t'·h·w, 3·2·4·4] and the grid [t', h, w] in patches, the
    layout of the Qwen-VL video processors (a short last unit repeats the last frame)."""
    frames = torch.as_tensor(np.asarray(frames)).float()
    if frames.shape[0] % TEMPORAL:
        frames = torch.cat([frames, frames[-1:].expand(TEMPORAL - frames.shape[0] % TEMPORAL, -1, -1, -1)])
    T, C, H, W = frames.shape
    t, h, w = T // TEMPORAL, H // PATCH, W // PATCH
    x = frames.view(t, TEMPORAL, C, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * TEMPORAL * PATCH * PATCH), [t, h, w]


class StubVideoProcessor:
    """Videos [T, 3, H, W] (H, W multiples of 8) -> pixel_values_videos, video_grid_thw and the
    metadata the processors read (video i sampled at fps[i % len(fps)])."""

    merge_size, temporal_patch_size, patch_size = MERGE, TEMPORAL, PATCH

    def __init__(self, fps=(1.0, 3.0)) -> None:
        self.fps = fps

    def __call__(self, videos, **kwargs):
        rows, grids, metadata = [], [], []
        for i, video in enumerate(videos):
            x, grid = patchify(video)
            rows.append(x)
            grids.append(grid)
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=self.fps[i % len(self.fps)],
                                          frames_indices=list(range(len(video)))))
        return BatchFeature({"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": metadata})

    def get_num_of_video_patches(self, num_frames, height, width, videos_kwargs=None):
        return math.ceil(num_frames / TEMPORAL) * (height // PATCH) * (width // PATCH)


class StubImageProcessor:
    """Images [3, H, W] -> pixel_values, image_grid_thw (an image is one unit of two equal frames)."""

    merge_size, temporal_patch_size, patch_size = MERGE, TEMPORAL, PATCH

    def fetch_images(self, images):
        return images

    def __call__(self, images, **kwargs):
        pairs = [patchify(np.stack([image, image])) for image in images]
        return BatchFeature({"pixel_values": torch.cat([x for x, _ in pairs]),
                             "image_grid_thw": torch.tensor([grid for _, grid in pairs])})


def _check_argument_for_proper_class(self, name, argument):
    # The real checks want transformers' image/video processor classes, which need torchvision.
    if name in ("video_processor", "image_processor"):
        return type(argument)
    return ProcessorMixin.check_argument_for_proper_class(self, name, argument)


class Qwen2VLProcessor(transformers.Qwen2VLProcessor):
    check_argument_for_proper_class = _check_argument_for_proper_class


class Qwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
    check_argument_for_proper_class = _check_argument_for_proper_class


class Qwen3VLProcessor(transformers.Qwen3VLProcessor):
    check_argument_for_proper_class = _check_argument_for_proper_class


PROCESSORS = {cls.__name__: cls for cls in (Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor)}


def make_processor(family: str, fps=(1.0, 3.0)):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    cls = PROCESSORS[FAMILIES[family]["processor"]]
    return cls(image_processor=StubImageProcessor(), tokenizer=tokenizer, video_processor=StubVideoProcessor(fps))


def clips(*shapes):
    """Fresh random videos, one per (frames, height, width)."""
    return [torch.randn(t, 3, h, w).numpy() for t, h, w in shapes]


def grid_of(frames: int, height: int, width: int) -> tuple[int, int]:
    """(t', h'·w') of a video."""
    t, h, w = merged_grid(frames, height, width)
    return t, h * w


def merged_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(t', h', w') of a video: units of two frames, merged patches of 8x8 pixels."""
    return math.ceil(frames / TEMPORAL), height // (PATCH * MERGE), width // (PATCH * MERGE)


def _randomize_vtok(encoder) -> None:
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)


def _prompt(n_videos: int) -> str:
    return " ".join(["USER:"] + ["<|vision_start|><|video_pad|><|vision_end|> what"] * n_videos + ["is this ?"])


SHAPES = [(4, 16, 16), (5, 16, 24)]  # mixed grids: t' = 2 and 3, h'·w' = 4 and 6
PROMPTS = ["what is <|vision_start|><|video_pad|><|vision_end|> ?", _prompt(1)]


def _key(key_index, t: int) -> int:
    if key_index == "middle":
        return t // 2
    return key_index % t


# ------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_index", [0, -1, "middle"])
def test_placeholders_equal_tokens(family, key_index):
    model, processor = fresh_model(family), make_processor(family)
    videos = clips(*SHAPES)
    plain = processor(text=PROMPTS, videos=videos, padding=True, return_tensors="pt")
    apply_vtok(model, processor, key_index=key_index, backend=BACKEND)
    inputs = processor(text=PROMPTS, videos=videos, padding=True, return_tensors="pt")
    grids = [grid_of(*shape) for shape in SHAPES]
    assert (inputs["input_ids"] == VIDEO).sum(-1).tolist() == [hw + t - 1 for t, hw in grids]
    assert (plain["input_ids"] == VIDEO).sum(-1).tolist() == [t * hw for t, hw in grids]
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == VIDEO)
    counted = processor._get_num_multimodal_tokens(video_sizes=SHAPES).num_video_tokens
    assert counted == [hw + t - 1 for t, hw in grids]
    with torch.no_grad():
        tokens = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        logits = model(**inputs).logits  # forward checks placeholders x width == token values
    assert [tuple(x.shape) for x in tokens] == [(hw + t - 1, HIDDEN) for t, hw in grids]
    assert torch.isfinite(logits).all()
    for (frames, height, width), (t, hw) in zip(SHAPES, grids):
        assert num_video_tokens(model.config, frames, frame_size=(height, width)) == hw + t - 1
        assert adapter_for_config(model.config).num_plain_video_tokens(model.config, frames,
                                                                       frame_size=(height, width)) == t * hw


@pytest.mark.parametrize("key_index", [0, 1, -1])
def test_qwen3_placeholder_string(key_index):
    """Each unit keeps its timestamp and markers; the key unit keeps its h'·w' pads, every other
    unit one. Timestamps: the mean time of the unit's two frames at the video's fps."""
    processor = make_processor("qwen3_vl", fps=(2.0,))
    apply_vtok(fresh_model("qwen3_vl"), processor, key_index=key_index, backend=BACKEND)
    frames, height, width = 6, 16, 24
    video_inputs = processor.video_processor(clips((frames, height, width)))
    t, hw = grid_of(frames, height, width)
    k = key_index % t
    fps = 2.0  # unit u holds frames 2u and 2u + 1, at 2u / fps and (2u + 1) / fps seconds
    expected = "".join(f"<{(2 * u / fps + (2 * u + 1) / fps) / 2:.1f} seconds><|vision_start|>"
                       + "<|video_pad|>" * (hw if u == k else 1) + "<|vision_end|>" for u in range(t))
    assert expected.startswith("<0.2 seconds><|vision_start|>")
    assert processor.replace_video_token(video_inputs, video_idx=0) == expected
    ids = processor(text=["<|video_pad|>"], videos=clips((frames, height, width)))["input_ids"][0]
    assert ids.count(VIDEO) == hw + t - 1 and ids.count(VSTART) == ids.count(VEND) == t


# -------------------------------------------------------------------------- what the tokens are
def _own_features(model, inputs):
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return out.pooler_output, getattr(out, "deepstack_features", None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_index", [0, 1, -1, "middle"])
def test_key_unit_tokens_are_the_models_own(family, key_index):
    """The key unit's h'·w' tokens (and every deepstack level's) are the unpatched model's for
    that unit; each other unit is one residual token: g_phi of the attention-pooled difference
    to the key unit (deepstack levels: the pooled difference alone), in temporal order."""
    model, processor = fresh_model(family), make_processor(family)
    inputs = processor(text=PROMPTS, videos=clips(*SHAPES), padding=True, return_tensors="pt")
    own, own_levels = _own_features(model, inputs)
    encoder = apply_vtok(model, key_index=key_index, backend=BACKEND)
    _randomize_vtok(encoder)
    tokens, levels = _own_features(model, inputs)
    assert (levels is not None) == (family in DEEPSTACK)
    query = encoder.query.detach().double()
    for v, (frames, height, width) in enumerate(SHAPES):
        t, hw = grid_of(frames, height, width)
        k = _key(key_index, t)
        units = own[v].unflatten(0, (t, hw))
        torch.testing.assert_close(tokens[v][k:k + hw], units[k], rtol=0, atol=0)
        pooled = reference.encode(units[None].double(), k, pool="attn", query=query,
                                  num_heads=encoder.num_heads)[0, hw:]
        with torch.no_grad():
            expected = encoder.residual_mlp.double()(pooled).float()
        encoder.float()
        residual = torch.cat([tokens[v][:k], tokens[v][k + hw:]])
        torch.testing.assert_close(residual, expected, rtol=1e-5, atol=1e-5)
        for level, own_level in zip(levels or (), own_levels or ()):
            level_units = own_level[v].unflatten(0, (t, hw))
            torch.testing.assert_close(level[v][k:k + hw], level_units[k], rtol=0, atol=0)
            pooled = reference.encode(level_units[None].double(), k, pool="attn", query=query,
                                      num_heads=encoder.num_heads)[0, hw:].float()
            torch.testing.assert_close(torch.cat([level[v][:k], level[v][k + hw:]]), pooled,
                                       rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- positions
def _positions(model, inputs):
    return model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"], image_grid_thw=inputs.get("image_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs["attention_mask"])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("key_index", [0, -1])
def test_positions_of_kept_tokens_are_the_models_own(family, key_index):
    """Left-padded prompts, two videos in one, mixed grids and frame rates: text tokens and
    key-unit tokens keep their positions without VTok, a residual token takes its unit's
    centre token's, and rope_deltas continue the positions after the prompt as without VTok."""
    shapes = [(4, 16, 16), (6, 24, 16), (5, 16, 24)]
    prompts = ["USER: <|vision_start|><|video_pad|><|vision_end|> ?", _prompt(2)]
    model, processor = fresh_model(family), make_processor(family, fps=(1.0, 3.0, 1.5))
    videos = clips(*shapes)
    plain = processor(text=prompts, videos=videos, padding=True, padding_side="left", return_tensors="pt")
    want, want_deltas = _positions(model, plain)
    apply_vtok(model, processor, key_index=key_index, backend=BACKEND)
    inputs = processor(text=prompts, videos=videos, padding=True, padding_side="left", return_tensors="pt")
    got, got_deltas = _positions(model, inputs)
    assert (inputs["attention_mask"] == 0).any()  # the first prompt is padded
    grids = iter([merged_grid(*shape) for shape in shapes])
    for b in range(2):
        valid_plain, valid = plain["attention_mask"][b].bool(), inputs["attention_mask"][b].bool()
        text_plain = valid_plain & (plain["input_ids"][b] != VIDEO)
        text = valid & (inputs["input_ids"][b] != VIDEO)
        assert torch.equal(got[:, b, text], want[:, b, text_plain])
        assert (got[:, b, ~valid] == 0).all()
        video_plain = want[:, b, plain["input_ids"][b] == VIDEO]
        expected, start = [], 0
        while start < video_plain.shape[1]:
            t, h, w = next(grids)
            units = video_plain[:, start:start + t * h * w].unflatten(1, (t, h * w))
            k, centre = key_index % t, (h // 2) * w + w // 2
            expected += [units[:, u] if u == k else units[:, u, [centre]] for u in range(t)]
            start += t * h * w
            if family == "qwen2_5_vl" and b == 0:
                # Δt = tokens_per_second (4) · temporal_patch_size (2) / fps (1.0): the model's own
                # spacing, which the residual tokens keep
                assert int(units[0, 1, 0] - units[0, 0, 0]) == 8
        assert torch.equal(got[:, b, inputs["input_ids"][b] == VIDEO], torch.cat(expected, dim=1))
        shift = int(valid_plain.sum()) - int(valid.sum())
        assert int(got_deltas[b]) == int(want_deltas[b]) + shift


# ----------------------------------------------------------------------------- model outputs
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_image_and_video_prompt_unchanged_up_to_the_video(family):
    model, processor = fresh_model(family), make_processor(family)
    prompt = ["USER: <|vision_start|><|image_pad|><|vision_end|> a <|vision_start|><|video_pad|><|vision_end|> ?"]
    images, videos = [torch.randn(3, 16, 24).numpy()], clips((6, 16, 16))
    plain = processor(text=prompt, images=images, videos=videos, return_tensors="pt")
    with torch.no_grad():
        before = model(**plain).logits
    apply_vtok(model, processor, key_index=1, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    inputs = processor(text=prompt, images=images, videos=videos, return_tensors="pt")
    with torch.no_grad():
        after = model(**inputs).logits
    first = int((inputs["input_ids"][0] == VIDEO).nonzero()[0])
    assert torch.equal(inputs["input_ids"][0, :first], plain["input_ids"][0, :first])
    assert (inputs["input_ids"][0, :first] == IMAGE).sum() == 6  # one unit of 2x3 merged patches
    torch.testing.assert_close(after[0, :first], before[0, :first], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[0, -1], before[0, -1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_unit_video_gives_identical_logits(family):
    """A video of one temporal unit is its own key unit: same tokens, positions and deepstack
    features, so the same logits."""
    model, processor = fresh_model(family), make_processor(family)
    videos = clips((2, 16, 24), (1, 16, 16))  # one frame is repeated into one unit
    plain = processor(text=PROMPTS, videos=videos, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**plain).logits
    apply_vtok(model, processor, key_index=-1, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    inputs = processor(text=PROMPTS, videos=videos, padding=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], plain["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_reaches_vtok(family):
    model, processor = fresh_model(family), make_processor(family)
    encoder = apply_vtok(model, processor, backend=BACKEND)
    model.train()
    assert model.model.vtok is encoder and "model.vtok.query" in model.state_dict()
    inputs = processor(text=PROMPTS, videos=clips(*SHAPES), padding=True, return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["mm_token_type_ids"] != 0, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    watched = dict(encoder.named_parameters())
    watched["merger"] = next(model.model.visual.merger.parameters())
    if family in DEEPSTACK:
        for i, merger in enumerate(model.model.visual.deepstack_merger_list):
            watched[f"deepstack_merger_list.{i}"] = merger.linear_fc2.weight
    for name, p in watched.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    torch.optim.AdamW(encoder.parameters(), lr=1e-2).step()
    assert all(not torch.equal(p, before[name]) for name, p in encoder.named_parameters())


# -------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_greedy_generate_equals_uncached_forward(family):
    """Cached greedy decoding (positions from the prompt's rope_deltas) picks, at every step,
    the argmax of a plain forward over the whole sequence (positions from get_rope_index), with
    left padding and videos of different grids."""
    model, processor = fresh_model(family), make_processor(family)
    apply_vtok(model, processor, key_index=1, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    inputs = processor(text=PROMPTS, videos=clips(*SHAPES), padding=True, padding_side="left",
                       return_tensors="pt")
    steps = 4
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    L = inputs["input_ids"].shape[1]
    sequences = out.sequences
    assert torch.equal(sequences[:, :L], inputs["input_ids"])
    full = dict(inputs, input_ids=sequences,
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"],
                                             torch.zeros(2, steps, dtype=inputs["mm_token_type_ids"].dtype)], 1))
    with torch.no_grad():
        logits = model(**full, use_cache=False).logits
    for step in range(steps):
        torch.testing.assert_close(out.logits[step], logits[:, L - 1 + step], rtol=1e-4, atol=1e-4)
        assert torch.equal(sequences[:, L + step], logits[:, L - 1 + step].argmax(-1))
    # A step by hand without position ids: the model takes them from the prompt's rope_deltas.
    # (Only the unpadded prompt: the model's decode positions with an attention mask span the
    # whole mask, a path generate never takes.)
    row = int(inputs["attention_mask"].sum(-1).argmax())
    assert bool(inputs["attention_mask"][row].all())
    one = {name: value[row:row + 1] for name, value in inputs.items() if name != "pixel_values_videos"}
    first = int(inputs["video_grid_thw"][:row].prod(-1).sum())  # one video per prompt
    rows = int(inputs["video_grid_thw"][row].prod())
    with torch.no_grad():
        prefill = model(**one, pixel_values_videos=inputs["pixel_values_videos"][first:first + rows],
                        use_cache=True)
        step = model(input_ids=sequences[row:row + 1, L:L + 1], past_key_values=prefill.past_key_values,
                     use_cache=True).logits[:, -1]
    torch.testing.assert_close(step[0], logits[row, L], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_beam_search_runs(family):
    model, processor = fresh_model(family), make_processor(family)
    apply_vtok(model, processor, backend=BACKEND)
    inputs = processor(text=PROMPTS, videos=clips(*SHAPES), padding=True, padding_side="left",
                       return_tensors="pt")
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    L = inputs["input_ids"].shape[1]
    assert beams.shape == (4, L + 3)
    assert torch.equal(beams[:, :L], inputs["input_ids"].repeat_interleave(2, dim=0))


# ----------------------------------------------------------------------- saving and reapplying
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_save_and_reload_restore_the_model(family, tmp_path):
    model, processor = fresh_model(family), make_processor(family)
    apply_vtok(model, processor, pool="mean", key_index=-1, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    inputs = processor(text=PROMPTS, videos=clips(*SHAPES), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.vtok == model.config.vtok
    encoder = apply_vtok(loaded, backend=BACKEND)
    assert (encoder.pool, encoder.key_index) == ("mean", -1)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, logits)


def test_apply_twice_copies_and_pickles():
    model, processor = fresh_model("qwen3_vl"), make_processor("qwen3_vl")
    encoder = apply_vtok(model, processor, key_index=1, backend=BACKEND)
    assert apply_vtok(model, processor) is encoder
    videos = clips(*SHAPES)
    ids = processor(text=PROMPTS, videos=videos, padding=True)["input_ids"]
    processor.to_dict()
    for other in (pickle.loads(pickle.dumps(processor)), copy.deepcopy(processor)):
        assert other(text=PROMPTS, videos=videos, padding=True)["input_ids"] == ids
    twin = copy.deepcopy(model)
    assert twin.model.get_rope_index.__self__ is twin.model
    assert twin.model.get_video_features.__self__ is twin.model


def test_nothing_in_transformers_is_modified():
    cls = transformers.Qwen2_5_VLModel
    methods = {name: vars(cls)[name] for name in ("get_rope_index", "get_video_features")}
    model = fresh_model("qwen2_5_vl")
    apply_vtok(model, backend=BACKEND)
    assert type(model.model) is cls
    for name, method in methods.items():
        assert vars(cls)[name] is method
        assert name in vars(model.model)  # bound to the instance only
    other = fresh_model("qwen2_5_vl")
    processor = make_processor("qwen2_5_vl")
    inputs = processor(text=PROMPTS[:1], videos=clips(SHAPES[0]), return_tensors="pt")
    t, hw = grid_of(*SHAPES[0])
    assert _own_features(other, inputs)[0][0].shape[0] == t * hw


# ------------------------------------------------------------------------------ what it refuses
@pytest.mark.parametrize("options, match", [
    (dict(key_index="medoid"), "key_index: 'medoid' is chosen from the features.*before any features exist"),
    (dict(spatial=(1, 1)), "spatial: qwen2_5_vl keeps the key unit at the model's merged grid"),
    (dict(frames_per_token=2), "frames_per_token: qwen2_5_vl gives one residual token per temporal unit")])
def test_settings_that_do_not_fit(options, match):
    model = fresh_model("qwen2_5_vl")
    with pytest.raises(ValueError, match=match):
        apply_vtok(model, **options)
    assert "vtok" not in model.model._modules and getattr(model.config, "vtok", None) is None


def test_key_index_out_of_range_for_a_short_video():
    model, processor = fresh_model("qwen2_5_vl"), make_processor("qwen2_5_vl")
    apply_vtok(model, processor, key_index=2, backend=BACKEND)
    with pytest.raises(ValueError, match=re.escape("key_index: 2 is out of range for a video of 2 temporal units")):
        processor(text=PROMPTS[:1], videos=clips((4, 16, 16)))


def test_guard_on_the_transformers_version(monkeypatch):
    from vtok_kernels.integrations import qwen

    monkeypatch.setattr(qwen.transformers, "__version__", "5.20.0")
    model = fresh_model("qwen3_vl")
    with pytest.raises(RuntimeError, match=re.escape(f"qwen3_vl adapter needs transformers>={QWEN_MIN_TRANSFORMERS}")):
        apply_vtok(model)
    assert "vtok" not in model.model._modules


def test_guard_on_the_signatures(monkeypatch):
    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        raise AssertionError("never called")

    monkeypatch.setattr(transformers.Qwen2_5_VLModel, "get_rope_index", get_rope_index)
    with pytest.raises(RuntimeError, match=r"relies on Qwen2_5_VLModel.get_rope_index\(input_ids, mm_token_type_ids"):
        apply_vtok(fresh_model("qwen2_5_vl"))

    def replace_video_token(self, inputs, index):
        raise AssertionError("never called")

    processor = make_processor("qwen3_vl")
    monkeypatch.setattr(Qwen3VLProcessor, "replace_video_token", replace_video_token)
    with pytest.raises(RuntimeError, match=r"replace_video_token\(video_inputs, video_idx"):
        apply_vtok(fresh_model("qwen3_vl"), processor)


def test_counts_need_the_frame_size():
    config = fresh_model("qwen2_5_vl").config
    with pytest.raises(ValueError, match="frame_size: the grid of qwen2_5_vl follows the frame size"):
        num_video_tokens(config, 8)
    with pytest.raises(ValueError, match="frame_size: 20x16 is not a multiple of"):
        num_video_tokens(config, 8, frame_size=(20, 16))
    llava = transformers.LlavaOnevisionConfig()
    with pytest.raises(ValueError, match="frame_size: llava_onevision resizes every frame"):
        num_video_tokens(llava, 8, frame_size=(384, 384))


# --------------------------------------------------------------------------------- the README
FRAME = (448, 448)


def real_configs():
    """The real sizes (no download) of Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct."""
    qwen2_5 = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064))
    qwen3 = transformers.Qwen3VLConfig(
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24]),
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936))
    return {"Qwen2.5-VL-7B": qwen2_5, "Qwen3-VL-8B": qwen3}


def test_readme_table_is_what_the_adapters_compute():
    readme = (ROOT / "README.md").read_text()
    for name, config in real_configs().items():
        adapter = adapter_for_config(config)
        for frames in (16, 32, 64):
            plain = adapter.num_plain_video_tokens(config, frames, frame_size=FRAME)
            vtok = num_video_tokens(config, frames, frame_size=FRAME)
            row = f"| {name} | {frames} | {plain:,} | {vtok:,} | {plain / vtok:.1f}× |"
            assert row in readme, row
