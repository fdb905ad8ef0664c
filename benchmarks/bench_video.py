"""Video speed: how fast the loader decodes clips against how fast TimeSformer trains on them, and our
TimeSformer against Hugging Face transformers' ``TimesformerForVideoClassification`` at the same
configuration (the same weights, checked), timed interleaved in one process by ``benchmarks.harness``.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_video --results benchmarks/RESULTS.md

Needs ``pip install -e ".[bench]"`` (transformers).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from benchmarks.harness import Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from datamodules.synthetic import draw_shape, ensure_written, textured_background
from datamodules.synthetic_videos import write_mp4
from datamodules.video import VideoDataModule
from tasks.video import VideoClassificationModule


def write_kinetics_like(root: Path, count: int = 8, frames: int = 300) -> None:
    """``count`` 10 s, 30 fps, 340x256 H.264 clips (the usual size of prepared Kinetics videos)."""
    rng = np.random.default_rng(0)
    lines = []
    for n in range(count):
        background = Image.fromarray(textured_background(rng, 340)[:256])
        clip = []
        for t in range(frames):
            frame = background.copy()
            draw_shape(ImageDraw.Draw(frame), "circle", 20 + t, 128 + 60 * np.sin(t / 20), 30, 0.0, (250, 40, 40))
            clip.append(np.asarray(frame))
        write_mp4(root / f"{n}.mp4", np.stack(clip), fps=30)
        lines.append(f"{n}.mp4 {n % 2}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")


def loader_clips_per_s(batches: int = 6, workers: int = 2) -> float:
    root = ensure_written("bench-kinetics-like-v1", write_kinetics_like)
    dm = VideoDataModule(
        str(root), train_list="train.csv", val_list="train.csv", num_frames=8, sampling_rate=32, target_fps=30,
        batch_size=8, num_workers=workers,
    )
    dm.setup("fit")
    dm.datasets["train"].samples *= 8  # enough clips for the timed batches
    loader = iter(dm.train_dataloader())
    next(loader)  # workers started, first batch ready
    start = time.perf_counter()
    clips = sum(next(loader)["input"].shape[0] for _ in range(batches))
    return clips / (time.perf_counter() - start)


BLOCK_NAMES = [  # names inside a block: ours (the release's) -> Hugging Face's
    ("temporal_attn.qkv", "temporal_attention.attention.qkv"), ("temporal_attn.proj", "temporal_attention.output.dense"),
    ("temporal_norm1", "temporal_layernorm"), ("temporal_fc", "temporal_dense"), ("attn.qkv", "attention.attention.qkv"),
    ("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
]
EMBED_NAMES = {"cls_token": "cls_token", "pos_embed": "position_embeddings", "time_embed": "time_embeddings",
               "patch_embed.proj": "patch_embeddings.projection"}


def to_hf_state(module: VideoClassificationModule) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's TimeSformer names, so both models compute the same function."""
    out = {}
    for key, value in module.state_dict().items():
        if key.startswith("head.fc."):
            out["classifier." + key.removeprefix("head.fc.")] = value
        elif key.startswith("backbone.blocks."):
            index, rest = key.removeprefix("backbone.blocks.").split(".", 1)
            ours, theirs = next((o, t) for o, t in BLOCK_NAMES if rest.startswith(o + "."))
            out[f"timesformer.encoder.layer.{index}.{theirs}{rest.removeprefix(ours)}"] = value
        elif key.startswith("backbone.norm."):
            out["timesformer.layernorm." + key.removeprefix("backbone.norm.")] = value
        elif key.startswith("backbone."):
            name = key.removeprefix("backbone.")
            stem = next(s for s in EMBED_NAMES if name.startswith(s))
            value = value[:, :, 0] if name == "patch_embed.proj.weight" else value  # [C, 3, 1, p, p] -> 2-D kernel
            out[f"timesformer.embeddings.{EMBED_NAMES[stem]}{name.removeprefix(stem)}"] = value
    return out


def build_pair(frames: int, size: int, classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    torch.manual_seed(0)
    ours = VideoClassificationModule(
        backbone="timesformer_base_patch16", backbone_kwargs={"num_frames": frames, "img_size": size}, num_classes=classes,
        cpu_kernels=cpu_kernels(),
    )
    config = TimesformerConfig(image_size=size, num_frames=frames, num_labels=classes, attention_type="divided_space_time")
    theirs = TimesformerForVideoClassification(config)
    theirs.load_state_dict(to_hf_state(ours), strict=True)
    return ours, theirs


def train_clips_per_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> float:
    """Our training rate, to unrounded precision, for the loader comparison."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = bench_parser(__doc__, steps=5, warmup=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--skip-loader", action="store_true", help="only the model comparison")
    args = parse_bench_args(parser)
    loader_rate = None if args.skip_loader else loader_clips_per_s(workers=args.loader_workers)
    ours, theirs = build_pair(args.frames, args.size, 400)
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size)
    y = torch.randint(0, 400, (args.batch,))
    hf_forward = lambda clip: theirs(pixel_values=clip.transpose(1, 2)).logits  # noqa: E731  [B, T, C, H, W]
    with torch.no_grad():
        diff = (ours.eval()(x) - hf_forward(x)).abs().max().item()
    title = (f"TimeSformer-B/16 divided (400 classes) vs transformers `TimesformerForVideoClassification`, "
             f"{args.frames}x{args.size}x{args.size}, batch {args.batch}; max logit difference {diff:.1e}")
    entries = [Entry("ours", ours, ours), Entry("transformers", theirs, hf_forward)]
    table = compare(entries, x, y, F.cross_entropy, steps=args.steps, warmup=args.warmup, title=title)
    body = "`python -m benchmarks.bench_video`\n\n" + table
    if loader_rate is not None:
        train_rate = train_clips_per_s(ours, x, y)
        body += (
            f"\n\nLoader (`VideoDataModule`, decord, the Kinetics recipe: 8 frames at sampling rate 32 of 340x256 30 fps "
            f"H.264, short side jittered to 256-320, 224 crop, flip), {args.loader_workers} workers, batch 8: "
            f"**{loader_rate:.2f} clips/s** ({loader_rate / args.loader_workers:.1f} per worker), "
            f"{loader_rate / train_rate:.0f}x the {train_rate:.3f} clips/s our model above trains at on this CPU."
        )
    print(body)
    if args.results:
        write_section(args.results, "Video", body)


if __name__ == "__main__":
    main()
