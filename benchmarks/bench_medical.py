"""Speed of our UNETR-Base against MONAI's, and the memory of sliding-window inference on a large CT volume.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_medical --results benchmarks/RESULTS.md

1. Training step (forward + DiceCE + backward + AdamW) and inference of UNETR-Base, 14 classes, one 96³ crop,
   ours (channels-last decoder, the default, and NCDHW) and ``monai.networks.nets.UNETR`` with the same weights,
   timed interleaved in one process (``benchmarks/harness.py``). Wall-clock medians; the same comparison is also
   timed in CPU time, which a machine shared with other jobs distorts less (``--threads 1``: the thread's own CPU
   time, the figure to take on a loaded machine; ``--skip-memory --size 64`` for a quick check).
2. Peak resident memory of ``MedicalSegmentationModule.sliding_window`` over a 512x512x200 volume with the
   logits stitched in CPU memory, measured in a fresh process (``ru_maxrss``). A full UNETR-Base would need
   hundreds of 96³ windows of ~150 GFLOP each, too slow for this CPU; the decoder width and the 14-class
   output that dominate the memory are kept, the ViT is made small (see ``SW_MODEL``).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNETR

from backbones.unetr import convert_monai_unetr
from benchmarks.harness import Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from tasks.medical import MedicalSegmentationModule
from heads.unetr_weights import monai_unetr_head

SW_MODEL = dict(img_size=96, embed_dim=192, depth=4, num_heads=3, out_indices=[0, 1, 2, 3])


def unetr_pair(
    in_chans: int = 1, num_classes: int = 14, size: int = 96, channels_last: bool = True
) -> tuple[MedicalSegmentationModule, UNETR]:
    """Ours and MONAI's UNETR-Base with identical weights (ours loaded from MONAI's state dict)."""
    torch.manual_seed(0)
    reference = UNETR(
        in_channels=in_chans, out_channels=num_classes, img_size=size, feature_size=16, hidden_size=768,
        mlp_dim=3072, num_heads=12, proj_type="perceptron", norm_name="instance", res_block=True,
    )
    ours = MedicalSegmentationModule(
        backbone="unetr_vit_base", num_classes=num_classes, backbone_kwargs={"img_size": size}, channels_last=channels_last,
        cpu_kernels=cpu_kernels(),
    )
    state = convert_monai_unetr(reference.state_dict())
    foreign = {k.removeprefix("foreign."): state.pop(k) for k in [k for k in state if k.startswith("foreign.")]}
    state.update({f"head.{k}": v for k, v in monai_unetr_head(foreign).items()})
    result = ours.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"MONAI weights do not cover our model: {result}")
    return ours, reference


def cpu_time_ratio(entries: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int) -> str:
    """Median CPU seconds per training step and per inference, interleaved: a check on the wall-clock table
    when other jobs share the cores (CPU time counts the work done, not the waiting). On one thread the
    calling thread's CPU time (``time.thread_time``), else the process's (which counts spinning worker threads)."""
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in entries.items()}
    cpu: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in entries}
    for step in range(steps + 1):
        for name, model in entries.items():
            model.train()
            t = clock()
            loss(model(x), y).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            train_s = clock() - t
            model.eval()
            t = clock()
            with torch.inference_mode():
                model(x)
            if step:
                cpu[name]["train"].append(train_s)
                cpu[name]["infer"].append(clock() - t)
    med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in cpu.items()}
    monai = med["monai"]
    parts = [
        f"{name} {m['train']:.2f} / {m['infer']:.2f} s ({monai['train'] / m['train']:.2f}x / {monai['infer'] / m['infer']:.2f}x)"
        for name, m in med.items() if name != "monai"
    ]
    kind = "thread" if clock is time.thread_time else "process"
    return (
        f"{kind.capitalize()} CPU time per sample, training / inference ({torch.get_num_threads()} thread(s), median of "
        f"{steps} interleaved steps, our CPU kernels {cpu_kernels()}), and MONAI's over it: " + "; ".join(parts)
        + f"; MONAI {monai['train']:.2f} / {monai['infer']:.2f} s."
    )


def speed(steps: int, warmup: int, size: int = 96) -> str:
    ours, reference = unetr_pair(size=size)
    ncdhw, _ = unetr_pair(size=size, channels_last=False)
    x, y = torch.randn(1, 1, size, size, size), torch.randint(0, 14, (1, 1, size, size, size))
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    entries = [Entry("ours", ours, ours), Entry("ours NCDHW", ncdhw, ncdhw), Entry("monai", reference, reference)]
    title = (
        f"UNETR-Base (14 classes, feature size 16) vs `monai.networks.nets.UNETR` (perceptron patches), {size}³, batch 1; "
        "ours: channels-last decoder (default), ours NCDHW: `channels_last=False`"
    )
    table = compare(entries, x, y, loss, steps=steps, warmup=warmup, title=title)
    return table + "\n\n" + cpu_time_ratio({"ours": ours, "ours NCDHW": ncdhw, "monai": reference}, x, y, steps)


def sw_memory_child(shape: tuple[int, int, int], overlap: float, sw_batch_size: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS of one sliding-window pass with CPU stitching, and its parts."""
    torch.manual_seed(0)
    module = MedicalSegmentationModule(
        backbone="unetr_vit_base", backbone_kwargs=SW_MODEL, num_classes=14, feature_size=16,
        sw_overlap=overlap, sw_batch_size=sw_batch_size, sw_stitch_on_cpu=True, cpu_kernels=cpu_kernels(),
    ).eval()
    x = torch.rand(1, 1, *shape)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    t = time.perf_counter()
    with torch.inference_mode():
        labels = module.sliding_window(x).argmax(1)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    voxels = x.numel()
    return {
        "peak_gib": peak, "before_gib": before, "seconds": seconds, "labels": tuple(labels.shape),
        "logits_gib": 14 * voxels * 4 / 2**30, "input_gib": voxels * 4 / 2**30,
    }


def sw_memory(shape: tuple[int, int, int], overlap: float, sw_batch_size: int) -> str:
    code = (
        "import json, sys; from benchmarks.bench_medical import sw_memory_child; "
        f"print(json.dumps(sw_memory_child({tuple(shape)}, {overlap}, {sw_batch_size})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return (
        f"Sliding-window inference, {shape[0]}x{shape[1]}x{shape[2]} volume, 14 classes, 96³ windows, overlap "
        f"{overlap}, Gaussian blending, {sw_batch_size} windows per pass, logits stitched in CPU memory: peak RSS "
        f"**{r['peak_gib']:.2f} GiB** ({r['before_gib']:.2f} GiB before the pass: interpreter, model, input "
        f"{r['input_gib']:.2f} GiB); the stitched fp32 logits alone are {r['logits_gib']:.2f} GiB. Model: our "
        f"decoder at UNETR-Base width (feature size 16) on a small ViT ({SW_MODEL['embed_dim']} wide, "
        f"{SW_MODEL['depth']} blocks) so the pass finishes; {r['seconds']:.0f} s, {torch.get_num_threads()} thread(s)."
    )


def main() -> None:
    parser = bench_parser(__doc__, steps=5, warmup=1)
    parser.add_argument("--sw-shape", type=int, nargs=3, default=[512, 512, 200])
    parser.add_argument("--sw-overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="ROI side of the speed comparison")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parse_bench_args(parser)
    parts = ["`python -m benchmarks.bench_medical`"]
    if not args.skip_speed:
        parts.append(speed(args.steps, args.warmup, args.size))
    if not args.skip_memory:
        parts.append(sw_memory(tuple(args.sw_shape), args.sw_overlap, args.sw_batch_size))
    body = "\n\n".join(parts)
    print(body)
    if args.results:
        write_section(args.results, "Medical", body)


if __name__ == "__main__":
    main()
