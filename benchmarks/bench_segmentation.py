"""Speed of our SegFormer-B0 against segmentation-models-pytorch's and Hugging Face transformers'.

Training step (forward, cross-entropy on full-resolution logits, backward, AdamW) and inference, timed
interleaved in one process (``benchmarks/harness.py``). transformers' model returns logits at 1/4
resolution; they are upsampled bilinearly as in its own loss. Our decoder multiplies each stage's
projection into the fuse convolution before upsampling (``SegFormerHead``): the same function and
parameters with fewer FLOPs, so compare samples/s, and read each model's MFU against its own FLOPs.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_segmentation --results benchmarks/RESULTS.md
    ... --efficientformer   (also EfficientFormerV2-S2 + SegFormer head beside SegFormer-B1, 150 classes)
"""

from __future__ import annotations

import copy

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from benchmarks.bench_efficientformer_v2 import time_inference
from benchmarks.harness import Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from tasks.segmentation import SegmentationModule


def entries(classes: int) -> list[Entry]:
    ours = SegmentationModule(backbone="mit_b0", num_classes=classes, cpu_kernels=cpu_kernels())
    reference = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=classes)
    found = [Entry("ours", ours, ours), Entry("smp", reference, reference)]
    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError:  # the optional `bench` extra
        return found
    hf = SegformerForSemanticSegmentation(SegformerConfig(num_labels=classes))

    def hf_forward(x: torch.Tensor) -> torch.Tensor:
        logits = hf(pixel_values=x).logits  # [B, K, H/4, W/4]
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)

    return [*found, Entry("transformers", hf, hf_forward)]


def run(batch: int, size: int, classes: int, steps: int, warmup: int) -> str:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch, size, size))
    title = f"SegFormer-B0 ({classes} classes) vs smp `Segformer(mit_b0)` and transformers, {size}x{size}, batch {batch}"
    return compare(entries(classes), x, y, F.cross_entropy, steps=steps, warmup=warmup, title=title)


def run_efficientformer(batch: int, size: int, steps: int, warmup: int) -> str:
    """EfficientFormerV2-S2 with the SegFormer head beside SegFormer-B1 (12.7M and 13.7M backbone parameters), ADE20K's
    150 classes; inference also of S2's fused form (``backbone.fuse()``)."""
    torch.manual_seed(0)
    classes = 150
    s2 = SegmentationModule(
        backbone="efficientformerv2_s2", backbone_kwargs={"img_size": size}, num_classes=classes, cpu_kernels=cpu_kernels()
    )
    b1 = SegmentationModule(backbone="mit_b1", num_classes=classes, cpu_kernels=cpu_kernels())
    smp_b1 = smp.Segformer(encoder_name="mit_b1", encoder_weights=None, classes=classes)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch, size, size))
    title = (f"EfficientFormerV2-S2 + SegFormer head vs SegFormer-B1 (ours and smp), {classes} classes, {size}x{size}, "
             f"batch {batch}")
    table = compare([Entry("s2", s2, s2), Entry("b1", b1, b1), Entry("smp b1", smp_b1, smp_b1)], x, y,
                    F.cross_entropy, steps=steps, warmup=warmup, title=title, baseline="s2")
    fused = copy.deepcopy(s2).eval()
    fused.backbone.fuse()
    for m in (s2, b1, smp_b1):
        m.eval()
    rates = time_inference([Entry("s2 fused", fused, fused), Entry("s2", s2, s2), Entry("b1", b1, b1),
                            Entry("smp b1", smp_b1, smp_b1)], x, steps=steps, warmup=warmup)
    row = " | ".join(f"{rates[k]:.2f}" for k in rates)
    fused_rows = (
        "Inference with S2's fused form (same run of interleaved passes, samples/s):\n\n"
        f"| {' | '.join(rates)} | S2 fused vs B1 | S2 fused vs smp B1 |\n|{'---|' * (len(rates) + 2)}\n"
        f"| {row} | {rates['s2 fused'] / rates['b1']:.2f}x | {rates['s2 fused'] / rates['smp b1']:.2f}x |"
    )
    return f"{table}\n\n{fused_rows}"


def main() -> None:
    parser = bench_parser(__doc__, steps=7, warmup=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--efficientformer", action="store_true", help="also EfficientFormerV2-S2 vs SegFormer-B1")
    args = parse_bench_args(parser)
    table = run(args.batch, args.size, args.classes, args.steps, args.warmup)
    if args.efficientformer:
        table += "\n\n" + run_efficientformer(args.batch, args.size, args.steps, args.warmup)
    print(table)
    if args.results:
        write_section(args.results, "Segmentation", f"`python -m benchmarks.bench_segmentation`\n\n{table}")


if __name__ == "__main__":
    main()
