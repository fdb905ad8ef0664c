"""Does token merging pay on MiT/SegFormer? FLOPs per stage and op kind, the ceiling of each "merge, compute, unmerge"
variant, the prototypes' measured FLOPs and times, and (with a checkpoint) their validation mIoU.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_mit_merging --results benchmarks/RESULTS.md
    ... --ckpt runs/segformer_b0/checkpoints/last.ckpt   (a checkpoint of configs/segformer_b0.yaml: mIoU per setting)

MiT's blocks are bound to the full grid: keys and values come from the map shrunk by the spatial-reduction (SR)
convolution, and Mix-FFN runs a 3x3 depth-wise convolution between its two linears. So tokens cannot stay merged
from block to block as in ViT's ToMe; the sound form is ToMe for Stable Diffusion's (Bolya & Hoffman, 2023): inside a
block, merge the tokens, run the token-wise linears on the merged ones, unmerge (each merged token copied back to its
positions) before anything that needs the grid. Which parts can run merged:

- ``attn``: the queries, the attention itself and its output projection (keys/values come from the SR convolution of
  the full, unmerged map, as in the dense block);
- ``fc2``: Mix-FFN's second linear (merge after the depth-wise convolution and GELU, unmerge after fc2);
- ``mlp``: both linears of Mix-FFN (merge before fc1, unmerge before the depth-wise convolution; then as ``fc2``);
- ``attn+mlp``: all of them.

Merges are placed in stages 1 and 2 (strides 4 and 8, most of the tokens; one setting adds stage 3); ``ratio`` is
the fraction of a stage's tokens merged away in each block. Partners are found by ToMe's bipartite matching (cosine
similarity of the block's normalised input), either ``global`` (``backbones.token_merging.bipartite_matching``: every
token of set A against every token of set B, quadratic in the tokens) or ``local`` (candidates within 4x4 windows,
the best pairs chosen over the whole map: linear in the tokens), both at most half of the tokens; or ``corner`` (ToMe
for Stable Diffusion's partition: each 2x2 window's top-left token takes the others, up to three quarters). Ratio 0
runs the dense blocks (asserted equal).

FLOPs are FlopCounterMode's (matmul, convolution, attention; norms, GELU, gather/scatter not counted). Times:
inference of backbone + SegFormer decoder, each setting in turn (interleaved), medians.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from backbones.mix_transformer import MixBlock, MixTransformer, map_to_tokens, tokens_to_map
from backbones.token_merging import bipartite_matching, merge_units, unmerge_units
from benchmarks.harness import bench_parser, cpu_model, interleaved_medians, parse_bench_args, write_section

CONFIG = "configs/segformer_b0.yaml"
KINDS = ("patch embed", "q", "kv", "SR conv", "attention", "proj", "fc1", "dwconv", "fc2")
PARTS = {"attn": ("q", "attention", "proj"), "fc2": ("fc2",), "mlp": ("fc1", "fc2"),
         "attn+mlp": ("q", "attention", "proj", "fc1", "fc2")}


@dataclass(frozen=True)
class Setting:
    """Where merged tokens are computed (``PARTS``), the fraction of tokens merged per stage, and the matching."""

    variant: str
    ratios: tuple[float, ...]
    matching: str = "local"

    @property
    def name(self) -> str:
        return f"{self.variant}, ratios {'/'.join(f'{r:g}' for r in self.ratios)}, {self.matching}"


SETTINGS = [Setting(v, (r, r)) for v in PARTS for r in (0.25, 0.5)] + [
    Setting("attn+mlp", (0.5, 0.5), "global"),  # ToMe's matching: quadratic in the tokens
    Setting("attn+mlp", (0.5, 0.5, 0.5)),  # stage 3 too
    Setting("attn", (0.75, 0.75), "corner"),  # three quarters: ToMe for Stable Diffusion's most
]


# --- matching, merge, unmerge ------------------------------------------------------------------------------------


def window_tokens(size: tuple[int, int], window: int, device: torch.device) -> torch.Tensor:
    """``[windows, window * window]``: the token indices of each ``window`` x ``window`` window (row-major)."""
    h, w = size
    if h % window or w % window:
        raise ValueError(f"matching in {window}x{window} windows needs a grid divisible by {window}, got {size}")
    index = torch.arange(h * w, device=device).view(h // window, window, w // window, window)
    return index.permute(0, 2, 1, 3).reshape(-1, window * window)


def merge_steps(n: int, sources: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``step`` ``[B, N]`` (the new index of each token, as ``bipartite_matching``) when the tokens ``sources``
    ``[B, r]`` merge into ``targets`` ``[B, r]`` (tokens that stay), and the new count."""
    b, r = sources.shape
    destination = torch.arange(n, device=sources.device).repeat(b, 1).scatter_(1, sources, targets)
    keep = torch.ones(b, n, device=sources.device).scatter_(1, sources, 0.0)
    return (keep.cumsum(1) - 1).long().gather(1, destination), n - r


def local_matching(metric: torch.Tensor, size: tuple[int, int], r: int, window: int = 4) -> tuple[torch.Tensor, int]:
    """Bipartite soft matching with candidates in ``window`` x ``window`` windows: in each window its tokens alternate
    between sets A and B (row-major), each A-token takes the most similar B-token of its window, and the ``r`` best
    pairs over the whole map merge (at most half of the tokens)."""
    b, n, _ = metric.shape
    index = window_tokens(size, window, metric.device)
    with torch.no_grad():
        m = F.normalize(metric.detach().float(), dim=-1)[:, index]  # [B, windows, k*k, C]
        best, partner = (m[:, :, 0::2] @ m[:, :, 1::2].transpose(-1, -2)).max(dim=-1)  # [B, windows, k*k/2]
        partner = index[:, 1::2].expand(b, -1, -1).gather(-1, partner).flatten(1)  # [B, N/2]: token index
        merged = best.flatten(1).topk(min(r, n // 2), dim=-1).indices  # [B, r]: positions in A of the best pairs
        return merge_steps(n, index[:, 0::2].reshape(-1)[merged], partner.gather(1, merged))


def corner_matching(metric: torch.Tensor, size: tuple[int, int], r: int) -> tuple[torch.Tensor, int]:
    """ToMe for Stable Diffusion's partition: the top-left token of each 2x2 window stays, and the ``r`` of the other
    three tokens most similar to their window's top-left one merge into it (up to three quarters of the tokens)."""
    n = metric.shape[1]
    index = window_tokens(size, 2, metric.device)  # [windows, 4]
    with torch.no_grad():
        m = F.normalize(metric.detach().float(), dim=-1)
        similarity = (m[:, index[:, 1:]] * m[:, index[:, :1]]).sum(-1).flatten(1)  # [B, 3 windows]
        merged = similarity.topk(min(r, 3 * n // 4), dim=-1).indices
        return merge_steps(n, index[:, 1:].reshape(-1)[merged], index[:, :1].expand(-1, 3).reshape(-1)[merged])


class Merge:
    """One block's merge: ``merge`` averages each group of tokens, ``unmerge`` copies them back to the full grid."""

    def __init__(self, metric: torch.Tensor, size: tuple[int, int], r: int, matching: str) -> None:
        if matching == "global":
            self.step, self.count = bipartite_matching(metric, r)
        elif matching == "corner":
            self.step, self.count = corner_matching(metric, size, r)
        else:
            self.step, self.count = local_matching(metric, size, r)
        self.ones = metric.new_ones(metric.shape[:2])

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return merge_units(x, self.ones, self.step, self.count)[0]

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        return unmerge_units(x, self.step)


# --- the merged forward -------------------------------------------------------------------------------------------


def merged_attention(attn: nn.Module, x: torch.Tensor, size: tuple[int, int], merge: Merge) -> torch.Tensor:
    """``EfficientSelfAttention`` with the queries, attention and projection on merged tokens; keys and values from
    the full map (``x`` ``[B, N, C]``); returns ``[B, N, C]``."""
    b, _, c = x.shape
    h = attn.num_heads
    xm = merge.merge(x)  # [B, N', C]
    q = attn.q(xm).view(b, xm.shape[1], h, c // h).transpose(1, 2)  # [B, heads, N', d]
    if attn.sr_ratio > 1:
        x = attn.norm(map_to_tokens(attn.sr(tokens_to_map(x, size))))  # [B, N / sr^2, C]
    k, v = attn.kv(x).view(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, xm.shape[1], c)
    return merge.unmerge(attn.proj(out))


def merged_mlp(mlp: nn.Module, x: torch.Tensor, size: tuple[int, int], merge: Merge, fc1_merged: bool) -> torch.Tensor:
    """``MixFFN`` with fc2 (and fc1 when ``fc1_merged``) on merged tokens; the depth-wise convolution on the full map."""
    y = merge.unmerge(mlp.fc1(merge.merge(x))) if fc1_merged else mlp.fc1(x)
    y = mlp.act(map_to_tokens(mlp.dwconv(tokens_to_map(y.contiguous(), size))))
    return merge.unmerge(mlp.fc2(merge.merge(y)))


def merged_block(block: MixBlock, x: torch.Tensor, size: tuple[int, int], r: int, setting: Setting) -> torch.Tensor:
    """``MixBlock.forward`` merging ``r`` tokens around the parts of ``setting.variant``; the dense block at ``r`` 0."""
    if r == 0:
        return block(x, size)
    parts = PARTS[setting.variant]
    y = block.norm1(x)
    merge = Merge(y, size, r, setting.matching)
    x = x + (merged_attention(block.attn, y, size, merge) if "q" in parts else block.attn(y, size))
    y = block.norm2(x)
    if "fc2" in parts:
        return x + merged_mlp(block.mlp, y, size, merge, fc1_merged="fc1" in parts)
    return x + block.mlp(y, size)


def merged_forward(backbone: MixTransformer, setting: Setting, x: torch.Tensor) -> list[torch.Tensor]:
    """``MixTransformer.forward`` (inference) with ``setting``'s merges."""
    backbone.check_input(x)
    outs = []
    for i, stage in enumerate(backbone.stages):
        x, size = stage.patch_embed(x)
        ratio = setting.ratios[i] if i < len(setting.ratios) else 0.0
        r = int(ratio * x.shape[1])
        for block in stage.blocks:
            x = merged_block(block, x, size, r, setting)
        x = tokens_to_map(stage.norm(x), size)
        if i in backbone.out_indices:
            outs.append(x)
    return outs


class MergedSegFormer(nn.Module):
    """Backbone + head of a segmentation module, the backbone run by ``merged_forward``."""

    def __init__(self, module: nn.Module, setting: Setting | None) -> None:
        super().__init__()
        self.backbone, self.head, self.setting = module.backbone, module.head, setting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x) if self.setting is None else merged_forward(self.backbone, self.setting, x)
        return self.head(feats)


# --- FLOPs -------------------------------------------------------------------------------------------------------


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU kernel of ``F.scaled_dot_product_attention`` (it has no formula)."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})


def flop_breakdown(module: nn.Module, x: torch.Tensor) -> dict[tuple[str, str], float]:
    """Dense forward FLOPs per sample of backbone + head by (stage, op kind); the decoder as ("decoder", "all")."""
    model = MergedSegFormer(module, None).eval()
    with torch.no_grad(), flop_counter() as counter:
        model(x)
    totals = {name: sum(ops.values()) / x.shape[0] for name, ops in counter.get_flop_counts().items()}
    leaf = {"patch_embed.proj": "patch embed", "attn.q": "q", "attn.kv": "kv", "attn.sr": "SR conv",
            "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.dwconv": "dwconv", "mlp.fc2": "fc2"}
    out: dict[tuple[str, str], float] = defaultdict(float)
    for name, flops in totals.items():
        parts = name.split(".")
        if parts[1:2] == ["head"] and len(parts) == 2:
            out[("decoder", "all")] += flops
        if parts[1:3] != ["backbone", "stages"]:
            continue
        stage, rest = f"stage {int(parts[3]) + 1}", ".".join(parts[4:])
        for suffix, kind in leaf.items():
            if rest.endswith(suffix) and (suffix == "patch_embed.proj" or rest.startswith("blocks.")):
                out[(stage, kind)] += flops
        if rest.endswith(".attn") and rest.startswith("blocks."):  # the attention op itself: attn less its linears
            out[(stage, "attention")] += flops - sum(totals.get(f"{name}.{p}", 0.0) for p in ("q", "kv", "sr", "proj"))
    return dict(out)


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), flop_counter() as counter:
        model(x)
    return counter.get_total_flops() / x.shape[0]


def ceiling(breakdown: dict[tuple[str, str], float], setting: Setting) -> float:
    """Dense FLOPs over the FLOPs left when the merged parts shrink by their ratio (matching and merging free)."""
    total = sum(breakdown.values())
    saved = sum(breakdown.get((f"stage {i + 1}", kind), 0.0) * ratio
                for i, ratio in enumerate(setting.ratios) for kind in PARTS[setting.variant])
    return total / (total - saved)


def breakdown_table(breakdown: dict[tuple[str, str], float], size: int) -> str:
    total = sum(breakdown.values())
    stages = sorted({s for s, _ in breakdown if s.startswith("stage")})
    title = (f"Dense forward at {size}x{size}: {total / 1e6:.1f} MFLOP per image (MFLOP per stage and op kind, "
             "share of the whole forward)")
    lines = [title, "",
             "| op | " + " | ".join(stages) + " | all | share |", "|---" * (len(stages) + 3) + "|"]
    for kind in KINDS:
        row = [breakdown.get((s, kind), 0.0) for s in stages]
        lines.append(f"| {kind} | " + " | ".join(f"{v / 1e6:.1f}" for v in row) + f" | {sum(row) / 1e6:.1f} | "
                     f"{sum(row) / total:.1%} |")
    dec = breakdown.get(("decoder", "all"), 0.0)
    lines.append("| decoder | " + " | ".join("" for _ in stages) + f" | {dec / 1e6:.1f} | {dec / total:.1%} |")
    per_stage = [sum(v for (s, _), v in breakdown.items() if s == st) for st in stages]
    lines.append("| stage total | " + " | ".join(f"{v / 1e6:.1f}" for v in per_stage) + f" | {total / 1e6:.1f} | 100% |")
    return "\n".join(lines)


# --- timing and mIoU ---------------------------------------------------------------------------------------------


def time_inference(models: dict[str, nn.Module], x: torch.Tensor, steps: int, warmup: int) -> dict[str, float]:
    """Images/s of each model's inference, interleaved (each goes first as often), medians."""
    with torch.inference_mode():
        seconds = interleaved_medians({k: partial(m, x) for k, m in models.items()}, steps, warmup)
    return {k: x.shape[0] / v for k, v in seconds.items()}


def validate_all(ckpt: str, settings: Sequence[Setting | None], root: Path, limit: int | None) -> dict[str, float]:
    """val/miou of ``ckpt`` through the task's CLI (dense), then with each setting's forward in its place."""
    from tasks.segmentation import main

    args = ["validate", "--config", CONFIG, "--ckpt_path", ckpt, "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    if limit:
        args += ["--trainer.limit_val_batches", str(limit)]
    cli = main(args)
    module, dense_forward = cli.model, cli.model.backbone.forward
    result = {}
    for setting in settings:
        if setting is None:
            result["dense"] = float(cli.trainer.callback_metrics["val/miou"])
            continue
        module.backbone.forward = partial(merged_forward, module.backbone, setting)  # this run only
        cli.trainer.validate(module, datamodule=cli.datamodule, verbose=False)
        result[setting.name] = float(cli.trainer.callback_metrics["val/miou"])
        module.backbone.forward = dense_forward
    return result


def build(ckpt: str | None) -> nn.Module:
    from tasks.segmentation import SegmentationModule

    if ckpt:
        return SegmentationModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    torch.manual_seed(0)
    return SegmentationModule(backbone="mit_b0", backbone_kwargs={"drop_path_rate": 0.0}, num_classes=5,
                              decoder_dim=256).eval()


def check_ratio_zero(module: nn.Module, x: torch.Tensor) -> None:
    dense = MergedSegFormer(module, None).eval()
    with torch.no_grad():
        expected = dense(x)
        for variant in PARTS:
            for matching in ("local", "global", "corner"):
                got = MergedSegFormer(module, Setting(variant, (0.0, 0.0), matching)).eval()(x)
                assert torch.equal(got, expected), f"{variant}/{matching} at ratio 0 differs from the dense model"


def size_section(module: nn.Module, size: int, batch: int, miou: dict[str, float], steps: int, warmup: int) -> str:
    """The FLOP breakdown at ``size`` and every setting's ceiling, FLOPs, speed and (given) mIoU."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    breakdown = flop_breakdown(module, x[:1])
    models: dict[str, nn.Module] = {"dense": MergedSegFormer(module, None).eval()}
    models.update({s.name: MergedSegFormer(module, s).eval() for s in SETTINGS})
    flops = {k: forward_flops(m, x[:1]) for k, m in models.items()}
    rates = time_inference(models, x, steps, warmup)
    title = f"Settings at {size}x{size}, batch {batch}"
    if miou:
        title += "; val/miou of the checkpoint on the run's validation set (its own size)"
    lines = [breakdown_table(breakdown, size), "", title, "",
             "| setting | ceiling | fwd MFLOP | FLOPs vs dense | images/s | speed vs dense |" + (" val/miou | Δ |" if miou else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if miou else "")]
    for name, model in models.items():
        cap = 1.0 if model.setting is None else ceiling(breakdown, model.setting)
        row = (f"| {name} | {cap:.3f}x | {flops[name] / 1e6:.1f} | {flops['dense'] / flops[name]:.3f}x | "
               f"{rates[name]:.1f} | {rates[name] / rates['dense']:.2f}x |")
        if miou:
            row += f" {miou[name]:.4f} | {miou[name] - miou['dense']:+.4f} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, steps=10, warmup=2)
    parser.add_argument("--ckpt", default=None, help=f"checkpoint of {CONFIG}: also validate mIoU per setting")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512],
                        help="input sides: the default run's 128 (its crops) and SegFormer's 512")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 2], help="timed batch per size")
    parser.add_argument("--limit-val-batches", type=int, default=None, help="validate on fewer batches (a check)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_mit_merging"))
    args = parse_bench_args(parser)
    module = build(args.ckpt)
    torch.manual_seed(0)
    check_ratio_zero(module, torch.randn(2, 3, 64, 64))
    miou = validate_all(args.ckpt, [None, *SETTINGS], args.work, args.limit_val_batches) if args.ckpt else {}
    head = (
        f"`python -m benchmarks.bench_mit_merging{' --ckpt ' + Path(args.ckpt).name if args.ckpt else ''}`; "
        f"MiT-B0 + SegFormer decoder ({'the checkpoint' if args.ckpt else 'random weights'}), fp32, "
        f"{torch.get_num_threads()} thread(s), median of {args.steps} interleaved inference steps after "
        f"{args.warmup}; {cpu_model()}, torch {torch.__version__}. Ratio 0 of every variant equals the dense model "
        "(asserted). Ceiling: dense FLOPs over those left when the merged parts shrink by the ratio (matching, "
        "merge and unmerge free); fwd MFLOP: FlopCounterMode of the prototype (matching included)."
    )
    sections = [head] + [size_section(module, size, batch, miou, args.steps, args.warmup)
                         for size, batch in zip(args.sizes, args.batch)]
    body = "\n\n".join(sections)
    print(body)
    if args.results:
        write_section(args.results, "Token merging on MiT (SegFormer-B0)", body)


if __name__ == "__main__":
    main()
