"""Speed of ViT-ResNAS: a found network against DeiT-Base, and the super-network's multi-architectural step
against its largest network alone, side by side in one process.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_vit_resnas --results benchmarks/RESULTS.md

The super-network part times three training steps at the same batch: the super-network with a fresh draw of
``max_groups`` sub-networks per step, one per group of ``examples_per_subnet`` examples (every choice allowed,
as after the warm-up); the super-network with ``set_subnet(None)`` (its largest network, no masks); and the
largest network extracted as a plain ``ViTResNAS``. Masks keep the full width's compute, so the first is the
price of sampling over running the largest network, which the paper bounds by 1.25x.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from backbones import create_backbone
from backbones.vit_resnas_supernet import ViTResNASSupernet
from benchmarks.harness import Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from heads.classification import Classifier, classification_head
from tasks.classification import ClassificationModule


def found_vs_deit(batch: int, size: int, steps: int, warmup: int) -> str:
    torch.manual_seed(0)
    module = ClassificationModule(
        backbone="vit_resnas_small", backbone_kwargs={"img_size": size}, num_classes=1000, cpu_kernels=cpu_kernels()
    )
    reference = timm.create_model("deit_base_patch16_224", img_size=size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    entries = [Entry("ours", module, module), Entry("timm", reference, reference)]
    title = f"ViT-ResNAS-Small (1000 classes) vs timm `deit_base_patch16_224`, {size}x{size}, batch {batch}"
    return compare(entries, x, y, F.cross_entropy, steps=steps, warmup=warmup, title=title)


def sampled_forward(model: Classifier, generator: torch.Generator):
    """A forward that draws the step's sub-networks first, as ``DynamicChoices`` does before every step."""
    supernet = model.backbone
    assert isinstance(supernet, ViTResNASSupernet)

    def forward(x: torch.Tensor) -> torch.Tensor:
        supernet.set_subnet(supernet.sample_subnet(generator))
        return model(x)

    return forward


def supernet_vs_largest(batch: int, size: int, steps: int, warmup: int, examples_per_subnet: int) -> str:
    torch.manual_seed(0)
    groups = batch // examples_per_subnet

    def classifier(backbone) -> Classifier:
        return Classifier(backbone, classification_head(backbone, 1000, "avg"))

    def supernet() -> ViTResNASSupernet:
        return create_backbone("vit_resnas_supernet_tiny", img_size=size, examples_per_subnet=examples_per_subnet,
                               max_groups=groups, num_warmup_epochs=0)

    sampled, unmasked = classifier(supernet()), classifier(supernet())
    unmasked.load_state_dict(sampled.state_dict())
    unmasked.backbone.set_subnet(None)
    largest_config = sampled.backbone.space.extreme(largest=True)
    extracted = classifier(sampled.backbone.extract(largest_config))
    extracted.head.load_state_dict(sampled.head.state_dict())
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    entries = [
        Entry("sampled", sampled, sampled_forward(sampled, torch.Generator().manual_seed(0))),
        Entry("largest, set_subnet(None)", unmasked, unmasked),
        Entry("largest, extracted", extracted, extracted),
    ]
    title = (f"Tiny super-network (1000 classes), {groups} sub-networks per step ({examples_per_subnet} examples "
             f"each), vs its largest network, {size}x{size}, batch {batch}")
    return compare(entries, x, y, F.cross_entropy, steps=steps, warmup=warmup, title=title, baseline="sampled")


def main() -> None:
    parser = bench_parser(__doc__, steps=5, warmup=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--examples-per-subnet", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["deit", "supernet"], choices=["deit", "supernet"])
    args = parse_bench_args(parser)
    tables = []
    if "deit" in args.parts:
        tables.append(found_vs_deit(args.batch, args.size, args.steps, args.warmup))
    if "supernet" in args.parts:
        tables.append(supernet_vs_largest(args.batch, args.size, args.steps, args.warmup, args.examples_per_subnet))
    body = "`python -m benchmarks.bench_vit_resnas`\n\n" + "\n\n".join(tables)
    print(body)
    if args.results:
        write_section(args.results, "ViT-ResNAS", body)


if __name__ == "__main__":
    main()
