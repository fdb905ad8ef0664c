"""Speed of our SegFormer-B0 against segmentation-models-pytorch's and Hugging Face transformers'.

Training step (forward, cross-entropy on full-resolution logits, backward, AdamW) and inference, timed
interleaved in one process (``benchmarks/harness.py``). transformers' model returns logits at 1/4
resolution; they are upsampled bilinearly as in its own loss. Our decoder multiplies each stage's
projection into the fuse convolution before upsampling (``SegFormerHead``): the same function and
parameters with fewer FLOPs, so compare samples/s, and read each model's MFU against its own FLOPs.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_segmentation --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from benchmarks.harness import Entry, bench_parser, compare, parse_bench_args, write_section
from tasks.segmentation import SegmentationModule


def entries(classes: int) -> list[Entry]:
    ours = SegmentationModule(backbone="mit_b0", num_classes=classes)
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


def main() -> None:
    parser = bench_parser(__doc__, steps=7, warmup=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=19)
    args = parse_bench_args(parser)
    table = run(args.batch, args.size, args.classes, args.steps, args.warmup)
    print(table)
    if args.results:
        write_section(args.results, "Segmentation", f"`python -m benchmarks.bench_segmentation`\n\n{table}")


if __name__ == "__main__":
    main()
