"""VTok inside a Hugging Face video-language model: train a few steps, then generate.

    python examples/llava_video_vtok.py                              # tiny LLaVA-OneVision
    python examples/llava_video_vtok.py --family llava_next_video    # tiny LLaVA-NeXT-Video

A tiny model with random weights is built from a config (nothing is downloaded). Each video shows
a bright square that moves left or right; the model must answer which. The key frame alone cannot
tell: the direction is in the residual tokens. The vision tower stays frozen; VTok's query and
g_phi, the projector and the language model train. A pretrained checkpoint takes the same three
lines, and its processor then writes VTok's number of placeholders itself:

    model = LlavaOnevisionForConditionalGeneration.from_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-hf")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-hf")
    apply_vtok(model, processor)

Here the prompts are written by hand with ``num_video_tokens(model.config, T)`` placeholders
(the real video processors need torchvision).
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

from vtok_kernels.integrations.transformers import adapter_for_config, apply_vtok, num_video_tokens

PAD, BOS, IMAGE, VIDEO, LEFT, RIGHT, QUESTION, EOS = range(8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32)
FAMILIES = {
    "llava_onevision": (transformers.LlavaOnevisionConfig, transformers.LlavaOnevisionForConditionalGeneration,
                        dict(model_type="siglip_vision_model", image_size=28, patch_size=4), "qwen2"),
    "llava_next_video": (transformers.LlavaNextVideoConfig, transformers.LlavaNextVideoForConditionalGeneration,
                         dict(model_type="clip_vision_model", image_size=32, patch_size=4), "llama"),
}


def tiny_model(family: str):
    config_class, model_class, vision, text_type = FAMILIES[family]
    vision = dict(vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = config_class(vision_config=vision, text_config=dict(TEXT, model_type=text_type),
                          image_token_index=IMAGE, video_token_index=VIDEO)
    model = model_class(config)
    model.generation_config.update(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    return model


def moving_squares(batch: int, frames: int, side: int, generator: torch.Generator):
    """Videos [B, T, 3, side, side] of a square moving 2 px per frame; labels LEFT or RIGHT."""
    right = torch.rand(batch, generator=generator) < 0.5
    videos = 0.1 * torch.randn(batch, frames, 3, side, side, generator=generator)
    for b in range(batch):
        start = int(torch.randint(0, side - 8 - 2 * (frames - 1) + 1, (1,), generator=generator))
        row = int(torch.randint(0, side - 8 + 1, (1,), generator=generator))
        for t in range(frames):
            col = start + 2 * t if right[b] else side - 8 - start - 2 * t
            videos[b, t, :, row:row + 8, col:col + 8] += 2.0
    return videos, torch.where(right, RIGHT, LEFT)


def prompts(num_videos: int, placeholders: int, answers=None):
    """[BOS, <video> x placeholders, ?] (+ [answer, EOS]) and labels on the answer only."""
    prompt = torch.tensor([BOS] + [VIDEO] * placeholders + [QUESTION]).repeat(num_videos, 1)
    if answers is None:
        return prompt
    input_ids = torch.cat([prompt, answers[:, None], torch.full((num_videos, 1), EOS)], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]
    return input_ids, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava_onevision")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="auto", help="VTok kernels: auto, cpu, triton, cuda, torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    model = tiny_model(args.family).to(args.device)
    plain = adapter_for_config(model.config).num_plain_video_tokens(model.config, args.frames)
    encoder = apply_vtok(model, pool="attn", backend=args.backend)  # + processor with a real checkpoint
    tokens = num_video_tokens(model.config, args.frames)
    print(f"{args.family}: {args.frames} frames per video -> {plain} tokens without VTok, {tokens} with VTok")
    print(f"VTok encoder (model.model.vtok): {sum(p.numel() for p in encoder.parameters()):,} parameters, "
          f"backend {encoder.backend!r}")

    model.model.vision_tower.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    side = model.config.vision_config.image_size
    start = time.perf_counter()
    for step in range(args.steps):
        videos, answers = moving_squares(args.batch, args.frames, side, generator)
        input_ids, labels = prompts(args.batch, tokens, answers)
        loss = model(input_ids=input_ids.to(args.device), pixel_values_videos=videos.to(args.device),
                     labels=labels.to(args.device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0 or (step + 1) % 25 == 0:
            print(f"step {step + 1:3d}  loss {loss.item():.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")

    model.eval()
    videos, answers = moving_squares(16, args.frames, side, generator)
    videos = videos.to(args.device)
    with torch.no_grad():
        out = model.generate(input_ids=prompts(16, tokens).to(args.device), pixel_values_videos=videos,
                             max_new_tokens=2, do_sample=False)
        beams = model.generate(input_ids=prompts(2, tokens).to(args.device), pixel_values_videos=videos[:2],
                               max_new_tokens=2, num_beams=2, do_sample=False)
    predicted = out[:, tokens + 2].cpu()
    words = {LEFT: "left", RIGHT: "right"}
    print("greedy answers:", " ".join(words.get(int(t), "?") for t in predicted[:8]), "...")
    print("truth:         ", " ".join(words[int(t)] for t in answers[:8]), "...")
    print(f"accuracy on 16 new videos: {(predicted == answers).float().mean().item():.0%}; "
          f"beam search (2 beams) generated {beams.shape[1] - tokens - 2} tokens per video")


if __name__ == "__main__":
    main()
