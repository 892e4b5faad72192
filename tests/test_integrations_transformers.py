"""apply_vtok on Hugging Face video-language models: tiny random LLaVA-NeXT-Video and
LLaVA-OneVision models built from configs (no download), on the CPU.

Placeholders written by the processor = tokens made by the model = S + G (+ newline); the key
tokens are the unpatched model's tokens for the key frame; residual tokens against the reference;
gradients; greedy and beam-search generate; save / from_pretrained / apply_vtok restores the same
logits; images untouched; unsupported families and bad arguments.

The real video processors need torchvision, which has no build matching this torch on the CPU:
the processors here are the real LlavaNextVideoProcessor / LlavaOnevisionProcessor (their own
placeholder logic, patched by apply_vtok) around a stub video processor that stacks the frames
it is given, and a word-level tokenizer.
"""
from __future__ import annotations

import copy
import math
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import vtok_kernels as vk  # noqa: E402
from vtok_kernels import backends, reference  # noqa: E402
from vtok_kernels.integrations.transformers import (  # noqa: E402
    adapter_for_config,
    apply_vtok,
    num_video_tokens,
)
from transformers.feature_extraction_utils import BatchFeature  # noqa: E402
from transformers.image_processing_utils import ImageProcessingMixin  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402
from tests.utils import fresh_copies  # noqa: E402

BACKEND = "cpu" if backends.unavailable_reason("cpu", "cpu") is None else "torch"
IMAGE, VIDEO = 2, 3  # token ids of <image> and <video> in the tokenizer below
ROOT = Path(__file__).resolve().parents[1]

# Tiny configs: NeXT-Video with CLIP (CLS dropped, 8x8 grid pooled 2x2 -> 4x4) and a Llama;
# OneVision with SigLIP (no CLS, 7x7 grid -> bilinear ceil -> 4x4, then a newline) and a Qwen2.
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)
FAMILIES = {
    "llava_next_video": dict(
        config="LlavaNextVideoConfig", model="LlavaNextVideoForConditionalGeneration",
        frame=32, grid=8, pooled=4, newline=0,
        vision=dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=4),
        text=dict(TEXT, model_type="llama"), extra=dict(image_grid_pinpoints=[[32, 32], [32, 64]])),
    "llava_onevision": dict(
        config="LlavaOnevisionConfig", model="LlavaOnevisionForConditionalGeneration",
        frame=28, grid=7, pooled=4, newline=1,
        vision=dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=3, image_size=28, patch_size=4),
        text=dict(TEXT, model_type="qwen2"), extra=dict(image_grid_pinpoints=[[28, 28], [28, 56]])),
}


def _build(family: str, seed: int = 0):
    spec = FAMILIES[family]
    config = getattr(transformers, spec["config"])(
        vision_config=spec["vision"], text_config=spec["text"], image_token_index=IMAGE,
        video_token_index=VIDEO, **spec["extra"])
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model"])(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


# A new instance of a family's tiny model.
fresh_model = fresh_copies(_build)


class StubVideoProcessor:
    """Stacks videos [T, 3, H, W] (already at the model's frame size) into pixel_values_videos."""

    def __call__(self, videos, **kwargs):
        return BatchFeature({"pixel_values_videos": torch.stack([torch.as_tensor(np.asarray(v)) for v in videos])})


def _check_argument_for_proper_class(self, name, argument):
    # The real check wants transformers' video-processor base class, which exists only with
    # torchvision installed.
    if name == "video_processor":
        return StubVideoProcessor
    return ProcessorMixin.check_argument_for_proper_class(self, name, argument)


class NextVideoProcessor(transformers.LlavaNextVideoProcessor):
    check_argument_for_proper_class = _check_argument_for_proper_class


class OnevisionProcessor(transformers.LlavaOnevisionProcessor):
    check_argument_for_proper_class = _check_argument_for_proper_class


def make_processor(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "<image>", "<video>", "USER:", "ASSISTANT:", "what", "is", "this", "?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    spec = FAMILIES[family]
    if family == "llava_next_video":
        return NextVideoProcessor(video_processor=StubVideoProcessor(), image_processor=ImageProcessingMixin(),
                   tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default")
    return OnevisionProcessor(image_processor=ImageProcessingMixin(), tokenizer=tokenizer,
                              video_processor=StubVideoProcessor(), num_image_tokens=spec["grid"] ** 2,
                              vision_feature_select_strategy="full")


def videos(family: str, num_videos: int, num_frames: int, seed: int = 1) -> torch.Tensor:
    side = FAMILIES[family]["frame"]
    return torch.randn(num_videos, num_frames, 3, side, side, generator=torch.Generator().manual_seed(seed))


def video_prompt(model, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """input_ids [B, L]: a few text tokens around as many <video> placeholders as the model makes."""
    with torch.no_grad():
        L = model.model.get_video_features(pixel_values_videos, return_dict=True).pooler_output.shape[1]
    B = pixel_values_videos.shape[0]
    text = torch.randint(4, 10, (B, 7), generator=torch.Generator().manual_seed(2))
    return torch.cat([text[:, :3], torch.full((B, L), VIDEO), text[:, 3:]], dim=1)


def video_tokens(model, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """[B, L, D]: each video's tokens, in order."""
    with torch.no_grad():
        tokens = model.model.get_video_features(pixel_values_videos, return_dict=True).pooler_output
    if isinstance(tokens, (list, tuple)):  # LLaVA-NeXT-Video before 5.20: [T, N', D] per video
        tokens = torch.stack(list(tokens)).flatten(1, 2)
    return tokens


def features_of(model, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """The vision tower's features [B, T, N, C], selected as the model selects them."""
    B, T = pixel_values_videos.shape[:2]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True).hidden_states
    x = hidden[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        x = x[:, 1:]
    return x.unflatten(0, (B, T))


def _randomize_vtok(encoder, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def _expected_count(family: str, num_frames: int, spatial=None, frames_per_token: int = 1) -> int:
    spec = FAMILIES[family]
    S = spatial[0] * spatial[1] if spatial is not None else spec["pooled"] ** 2
    return S + math.ceil((num_frames - 1) / frames_per_token) + spec["newline"]


# ---------------------------------------------------------------------------------- importing
def test_vtok_kernels_imports_without_transformers():
    code = ("import sys, vtok_kernels, vtok_kernels.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_frames, spatial, frames_per_token, key_index", [
    (1, None, 1, 0), (2, None, 1, -1), (5, None, 1, 0), (5, None, 2, 2), (6, (2, 3), 1, "medoid"),
    (7, (3, 3), 3, "middle")])
def test_placeholders_equal_tokens(family, num_frames, spatial, frames_per_token, key_index):
    model, processor = fresh_model(family), make_processor(family)
    clips = videos(family, 2, num_frames)
    prompts = ["USER: <video> what is this ?", "<video> what ?"]
    plain = processor(text=prompts, videos=list(clips.numpy()), padding=True, return_tensors="pt")
    apply_vtok(model, processor, pool="attn", spatial=spatial, frames_per_token=frames_per_token,
               key_index=key_index, backend=BACKEND)
    expected = _expected_count(family, num_frames, spatial, frames_per_token)
    inputs = processor(text=prompts, videos=list(clips.numpy()), padding=True, return_tensors="pt")
    placeholders = (inputs["input_ids"] == VIDEO).sum(-1).tolist()
    tokens = video_tokens(model, inputs["pixel_values_videos"])
    counted = processor._get_num_multimodal_tokens(video_sizes=[(num_frames, 8, 8)]).num_video_tokens
    assert placeholders == [expected, expected]
    assert tokens.shape == (2, expected, TEXT["hidden_size"])
    assert counted == [expected]
    assert num_video_tokens(model.config, num_frames, spatial=spatial, frames_per_token=frames_per_token) == expected
    plain_count = adapter_for_config(model.config).num_plain_video_tokens(model.config, num_frames)
    assert (plain["input_ids"] == VIDEO).sum(-1).tolist() == [plain_count, plain_count]
    with torch.no_grad():  # forward checks placeholders x width == feature values, then scatters
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


# -------------------------------------------------------------------------- what the tokens are
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_index", [0, 2, -1])
def test_key_tokens_are_the_models_own(family, key_index):
    """VTok sits before the projector: the key tokens are the unpatched model's tokens for the key
    frame (its pooling and projector on that frame), then the residual tokens, then (OneVision)
    the model's newline."""
    model = fresh_model(family)
    clips = videos(family, 2, 4)
    own = video_tokens(model, clips)
    apply_vtok(model, key_index=key_index, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    tokens = video_tokens(model, clips)
    S, newline = FAMILIES[family]["pooled"] ** 2, FAMILIES[family]["newline"]
    frames = own[:, : own.shape[1] - newline].unflatten(1, (4, S))
    torch.testing.assert_close(tokens[:, :S], frames[:, key_index], rtol=1e-5, atol=1e-6)
    if newline:
        assert torch.equal(tokens[:, -1], own[:, -1])
        assert torch.equal(tokens[:, -1], model.model.image_newline.expand(2, -1))
    assert not torch.allclose(tokens[:, :S], frames[:, (key_index + 1) % 4])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pool, frames_per_token, spatial", [("mean", 1, None), ("mean", 2, (3, 2)),
                                                             ("attn", 2, None), ("attn", 1, (2, 2))])
def test_tokens_against_reference(family, pool, frames_per_token, spatial):
    """Residual tokens = g_phi(pooled residuals of the vision features), mean pooling written out
    by hand, attention pooling from vtok_kernels.reference; spatial key tokens = the projector on
    adaptive_avg_pool2d of the key frame."""
    model = fresh_model(family)
    encoder = apply_vtok(model, pool=pool, frames_per_token=frames_per_token, spatial=spatial,
                         key_index=1, backend=BACKEND)
    _randomize_vtok(encoder)
    clips = videos(family, 2, 6)
    x = features_of(model, clips).double()  # [B, T, N, C]
    T, grid = x.shape[1], FAMILIES[family]["grid"]
    if pool == "mean":
        rest = [t for t in range(T) if t != 1]
        groups = [rest[i:i + frames_per_token] for i in range(0, len(rest), frames_per_token)]
        pooled = torch.stack([(x[:, g] - x[:, 1:2]).mean(dim=(1, 2)) for g in groups], dim=1)
    else:
        seq = reference.encode(x, 1, pool="attn", query=encoder.query.detach().double(),
                               num_heads=encoder.num_heads, frames_per_token=frames_per_token)
        pooled = seq[:, grid * grid:]
    mlp = encoder.residual_mlp.double()
    expected_residuals = mlp(pooled).float()
    encoder.float()
    tokens = video_tokens(model, clips)
    S = spatial[0] * spatial[1] if spatial else FAMILIES[family]["pooled"] ** 2
    G = math.ceil((T - 1) / frames_per_token)
    torch.testing.assert_close(tokens[:, S:S + G], expected_residuals, rtol=1e-5, atol=1e-5)
    if spatial is not None:
        key = x[:, 1].unflatten(1, (grid, grid)).permute(0, 3, 1, 2)
        key = F.adaptive_avg_pool2d(key, spatial).flatten(2).transpose(1, 2).float()
        with torch.no_grad():
            expected_keys = model.model.multi_modal_projector(key)
        torch.testing.assert_close(tokens[:, :S], expected_keys, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_reaches_vtok(family):
    model = fresh_model(family).train()
    encoder = apply_vtok(model, backend=BACKEND)
    assert model.model.vtok is encoder
    names = {name for name, _ in model.named_parameters()}
    assert {"model.vtok.query", "model.vtok.residual_mlp.0.weight"} <= names
    assert "model.vtok.query" in model.state_dict()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    clips = videos(family, 2, 5)
    input_ids = video_prompt(model, clips)
    labels = input_ids.masked_fill(input_ids == VIDEO, -100)
    loss = model(input_ids=input_ids, pixel_values_videos=clips, labels=labels).loss
    loss.backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0  # the key tokens
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in encoder.named_parameters())


def _loss_and_grads(model, clips, backend: str):
    """The language-model loss of a video prompt and the gradients it sends to VTok and to the
    projector, with VTok's kernels on ``backend``."""
    apply_vtok(model, backend=backend)
    model.zero_grad()
    input_ids = video_prompt(model, clips)
    labels = input_ids.masked_fill(input_ids == VIDEO, -100)
    loss = model(input_ids=input_ids, pixel_values_videos=clips, labels=labels).loss
    loss.backward()
    watched = {"model.vtok.query", "model.vtok.residual_mlp.0.weight",
               "model.multi_modal_projector.linear_1.weight"}
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                           if name in watched}


def _check_backend_in_model(family: str, backend: str, device: str) -> None:
    if backends.unavailable_reason(backend, device) is not None:
        pytest.skip(backends.unavailable_reason(backend, device))
    model = fresh_model(family).to(device).train()
    apply_vtok(model, frames_per_token=2, backend="torch")
    _randomize_vtok(model.model.vtok)
    clips = videos(family, 2, 6, seed=int(torch.randint(0, 2**31, ()))).to(device)
    want_loss, want = _loss_and_grads(model, clips, "torch")
    got_loss, got = _loss_and_grads(model, clips, backend)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert want.keys() == got.keys() and len(got) == 3
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_backends_train_the_model(family, backend):
    """The model's loss and gradients with VTok on a kernel backend (triton: under the
    interpreter here) equal those with the reference backend."""
    _check_backend_in_model(family, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernel_backends_train_the_model(family, backend):
    _check_backend_in_model(family, backend, "cuda")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_greedy_and_beam(family):
    model = fresh_model(family)
    apply_vtok(model, frames_per_token=2, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    clips = videos(family, 2, 5)
    input_ids = video_prompt(model, clips)
    with torch.no_grad():
        last = model(input_ids=input_ids, pixel_values_videos=clips).logits[:, -1]
    greedy = model.generate(input_ids=input_ids, pixel_values_videos=clips, max_new_tokens=3, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(greedy.logits[0], last, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy.sequences[:, :input_ids.shape[1]], input_ids)
    assert torch.equal(greedy.sequences[:, input_ids.shape[1]], last.argmax(-1))
    beams = model.generate(input_ids=input_ids, pixel_values_videos=clips, max_new_tokens=3, num_beams=3,
                           num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, input_ids.shape[1] + 3)
    assert torch.equal(beams[:, :input_ids.shape[1]], input_ids.repeat_interleave(2, dim=0))


# ----------------------------------------------------------------------- saving and reapplying
@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_restore_the_model(family, tmp_path):
    model = fresh_model(family)
    apply_vtok(model, pool="mean", spatial=(3, 3), frames_per_token=2, key_index=-1, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    clips = videos(family, 2, 5)
    input_ids = video_prompt(model, clips)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values_videos=clips).logits
    model.save_pretrained(tmp_path)  # no shared-tensor error: the projector is registered once

    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.vtok == model.config.vtok
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fresh weights" warning: they come from the checkpoint
        encoder = apply_vtok(loaded, backend=BACKEND)
    assert (encoder.pool, encoder.spatial, encoder.frames_per_token, encoder.key_index) == ("mean", (3, 3), 2, -1)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids, pixel_values_videos=clips).logits, logits)
    with pytest.raises(ValueError, match="frames_per_token: model.config.vtok records frames_per_token=2"):
        apply_vtok(loaded, frames_per_token=1)


def test_reload_without_vtok_weights_warns(tmp_path):
    model = fresh_model("llava_next_video")
    apply_vtok(model, backend=BACKEND)
    model.config.save_pretrained(tmp_path)
    plain = fresh_model("llava_next_video")
    plain.config.vtok, plain.name_or_path = dict(model.config.vtok), str(tmp_path)
    with pytest.warns(UserWarning, match="holds no VTok weights"):
        apply_vtok(plain, backend=BACKEND)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_twice_is_harmless(family):
    model, processor = fresh_model(family), make_processor(family)
    encoder = apply_vtok(model, processor, pool="attn", frames_per_token=2, backend=BACKEND)
    _randomize_vtok(encoder)
    clips = videos(family, 1, 5)
    tokens = video_tokens(model, clips)
    again = apply_vtok(model, processor)
    assert again is encoder and again.backend == BACKEND
    assert apply_vtok(model, processor, frames_per_token=2) is encoder
    assert torch.equal(video_tokens(model, clips), tokens)
    assert sum(".vtok." in name for name in model.state_dict()) == len(encoder.state_dict())
    inputs = processor(text=["<video> what ?"], videos=list(clips.numpy()), return_tensors="pt")
    assert (inputs["input_ids"] == VIDEO).sum() == tokens.shape[1] == _expected_count(family, 5, None, 2)
    with pytest.raises(ValueError, match="pool: model.config.vtok records pool='attn'"):
        apply_vtok(model, pool="mean")
    processor.to_dict()  # the patched processor still serialises, pickles and copies
    for other in (pickle.loads(pickle.dumps(processor)), copy.deepcopy(processor)):
        ids = other(text=["<video>"], videos=list(clips.numpy()), return_tensors="pt")["input_ids"]
        assert ids.tolist() == [[VIDEO] * tokens.shape[1]]
    twin = copy.deepcopy(model)  # the bound method follows the copy
    assert twin.model.get_video_features.__self__ is twin.model
    assert torch.equal(video_tokens(twin, clips), tokens)


def test_base_model_alone():
    base = fresh_model("llava_onevision").model
    encoder = apply_vtok(base, backend=BACKEND)
    assert base.vtok is encoder and "vtok.query" in base.state_dict()
    tokens = base.get_video_features(videos("llava_onevision", 1, 4), return_dict=True).pooler_output
    assert tokens.shape == (1, _expected_count("llava_onevision", 4), TEXT["hidden_size"])


def test_encoder_follows_the_model():
    model = fresh_model("llava_onevision")
    encoder = apply_vtok(model, backend=BACKEND)
    model.to(torch.float64)
    assert encoder.query.dtype == torch.float64
    model.to(torch.bfloat16)
    clips = videos("llava_onevision", 1, 3).bfloat16()
    tokens = video_tokens(model, clips)
    assert tokens.dtype == torch.bfloat16 and tokens.shape[1] == _expected_count("llava_onevision", 3)


# ------------------------------------------------------------------------------------- images
def _image_inputs(family: str, model):
    side = FAMILIES[family]["frame"]
    generator = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(1, 2, 3, side, side, generator=generator)  # anyres: base + 1 tile
    image_sizes = torch.tensor([[side, side]])
    with torch.no_grad():
        n = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output[0].shape[0]
    input_ids = torch.cat([torch.tensor([[4, 5]]), torch.full((1, n), IMAGE), torch.tensor([[6, 7]])], dim=1)
    return dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)


@pytest.mark.parametrize("family", FAMILIES)
def test_images_go_through_unchanged(family):
    model = fresh_model(family)
    inputs = _image_inputs(family, model)
    with torch.no_grad():
        before = model(**inputs).logits
    apply_vtok(model, backend=BACKEND)
    _randomize_vtok(model.model.vtok)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


# ------------------------------------------------------------------------------ what it refuses
def test_other_models_are_refused():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))
    with pytest.raises(NotImplementedError, match="no VTok adapter for LlamaForCausalLM"):
        apply_vtok(llama)
    with pytest.raises(TypeError, match="model: expected a transformers PreTrainedModel"):
        apply_vtok(torch.nn.Linear(2, 2))


def _encode_error(options: dict) -> tuple[type, str]:
    """What vtok_kernels.encode raises for these options, on features of the tiny OneVision's
    width (24 channels)."""
    options = dict(options)
    pool = options.setdefault("pool", "mean")
    try:
        vk.encode(torch.randn(1, 3, 4, 4, 24), query=torch.randn(24) if pool == "attn" else None, **options)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    raise AssertionError(f"encode accepted {options}")


@pytest.mark.parametrize("options", [
    dict(pool="max"), dict(pool=3), dict(frames_per_token=0), dict(frames_per_token=1.5),
    dict(spatial=(2, 0)), dict(spatial="2x2"), dict(pool="mean", num_heads=2), dict(num_heads=0)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_bad_arguments_get_encodes_errors(options):
    kind, message = _encode_error(options)
    model = fresh_model("llava_onevision")
    with pytest.raises(kind) as raised:
        apply_vtok(model, **options)
    assert str(raised.value) == message
    assert "vtok" not in model.model._modules and getattr(model.config, "vtok", None) is None


def test_bad_arguments_that_depend_on_the_model():
    # encode says "spatial: (9, 1) must not exceed the grid (4, 4)" of its x; here the grid is
    # the config's; and "C = 24" where the encoder says "in_dim = 24".
    for options, message in [(dict(spatial=(9, 1)), "spatial: (9, 1) must not exceed the grid (7, 7)"),
                             (dict(pool="attn", num_heads=5),
                              "num_heads: in_dim = 24 must be divisible by num_heads = 5")]:
        assert _encode_error(options)[0] is ValueError
        with pytest.raises(ValueError, match=re.escape(message)):
            apply_vtok(fresh_model("llava_onevision"), **options)


@pytest.mark.parametrize("options, kind, match", [
    (dict(key_index="last"), ValueError, "key_index: expected an int or one of"),
    (dict(key_index=1.0), TypeError, "key_index: expected an int or one of"),
    (dict(backend="nope"), ValueError, "nope"),
    (dict(hidden_dim=0), ValueError, "hidden_dim: expected a positive int")])
def test_other_bad_arguments(options, kind, match):
    with pytest.raises(kind, match=match):
        apply_vtok(fresh_model("llava_next_video"), **options)


def test_processor_of_another_model_is_refused():
    model, processor = fresh_model("llava_next_video"), make_processor("llava_next_video")
    model.config.video_token_id = 7
    with pytest.raises(ValueError, match="video_token_id 3 is not the model's 7"):
        apply_vtok(model, processor)
    with pytest.raises(TypeError, match="processor: expected the model's processor"):
        apply_vtok(fresh_model("llava_next_video"), processor.tokenizer.backend_tokenizer)


# --------------------------------------------------------------------------------- the README
def real_configs():
    """The real 7B configs' sizes (no download): vision tower, pooling, language-model width."""
    clip_l_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
    next_video = transformers.LlavaNextVideoConfig(
        vision_config=clip_l_336, text_config=dict(model_type="llama", hidden_size=4096),
        vision_feature_layer=-2, vision_feature_select_strategy="default", spatial_pool_stride=2)
    onevision = transformers.LlavaOnevisionConfig(  # SigLIP-so400m/384 is the config's default tower
        text_config=dict(model_type="qwen2", hidden_size=3584), vision_feature_layer=-1,
        vision_feature_select_strategy="full")
    return {"LLaVA-NeXT-Video-7B": next_video, "LLaVA-OneVision-7B": onevision}


def test_readme_table_is_what_the_adapters_compute():
    readme = (ROOT / "README.md").read_text()
    for name, config in real_configs().items():
        adapter = adapter_for_config(config)
        for frames in (16, 32, 64):
            plain = adapter.num_plain_video_tokens(config, frames)
            vtok = num_video_tokens(config, frames)
            row = f"| {name} | {frames} | {plain:,} | {vtok:,} | {plain / vtok:.1f}× |"
            assert row in readme, row
