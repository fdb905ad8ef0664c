"""Token merging (ToMe) speed against accuracy, no retraining: the default runs of three tasks, evaluated as they were
trained (dense) and merged with several ``r``, side by side in one process, with DynamicViT beside ViT-S.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_token_merging --results benchmarks/RESULTS.md
    ... --vit-ckpt runs/dense/checkpoints/last.ckpt --dynamicvit-ckpt runs/dynamicvit/checkpoints/last.ckpt
        --video-ckpt ... --unetr-ckpt ...   (checkpoints of the configs below; missing ones are trained first)
    ... --train-merged 1   (also train ViT-S with token_merging 1: the paper's training with merging)
    ... --quick   (2 training steps and 2 validation batches per run: checks the script, not a figure)

Runs: ViT-S/16 of ``configs/vit_small_patch16.yaml`` (the README's main command; DynamicViT from
``configs/dynamicvit_vit_small_cpu.yaml`` on it), TimeSformer of ``configs/timesformer_nano.yaml`` (divided attention)
and UNETR of ``configs/unetr.yaml``. Each setting is validated through the task's CLI (``validate --ckpt_path ..
--model.token_merging ..``: the user's command) for its metric; then inference (a forward pass of the task module on
the run's batch: UNETR one sliding window) and a training step (forward, loss, backward, AdamW) are timed for all
settings interleaved, medians. ``r`` values are chosen from token counts: the default runs are small (ViT-S at 64²
has 16 patch tokens, TimeSformer-nano 16 positions of 8 frames, UNETR 27 tokens), so ``r`` of 1-4 already removes
most tokens; forward GFLOPs are counted (FlopCounterMode) beside the times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import (
    bench_parser,
    cpu_kernels,
    cpu_model,
    interleaved_medians,
    parse_bench_args,
    write_section,
)


@dataclass
class Run:
    """A default run of a task and the merge settings swept on it."""

    name: str
    task: str
    config: str
    metric: str
    batch: tuple[int, ...]  # the timed input, batch first
    settings: list[Any]  # token_merging values (None: dense)
    classes: int = 4
    val_per_class: int = 0  # validation images or clips per class of the built-in set (0: the config's)
    rows: list[dict[str, Any]] = field(default_factory=list)


RUNS = {
    # 16 patch tokens + class token, 12 blocks: each block merges at most half of its patch tokens, so a per-block list
    # places the merges. Forward FLOPs, dense over merged (FlopCounterMode): [2, 2, 1] 1.36x, [2, 2, 2] 1.45x, [1] * 8
    # 1.46x, [2, 2, 2, 2] 1.65x, [3, 2, 2, 1] 1.69x, [3, 3, 2, 2] 2.01x. Top-1 of the dense run over 1000 validation
    # images per class (0.954) with them, measured 2026-12-08: 0.952, 0.952, 0.950, 0.940, 0.938, 0.900; others tried:
    # r 1 (1.56x) 0.934, [4, 2, 1] (1.60x) 0.937, [0, 0, 2, 2, 2, 2] (1.46x) 0.947, r 1 decreasing (1.56x) 0.934;
    # r 2 in every block (one patch token from block 8 on) fell to 0.62 (2026-12-07, 100 per class)
    "vit": Run("ViT-S/16, 64x64", "classification", "configs/vit_small_patch16.yaml", "val/top1", (32, 3, 64, 64),
               [None, [2, 2, 1], [2, 2, 2], [1] * 8, [2, 2, 2, 2], [3, 2, 2, 1], [3, 3, 2, 2]]),
    # 16 positions x 8 frames, 4 divided blocks: r 2, 3, 4 positions per block: 1.31x, 1.54x, 1.84x fewer FLOPs;
    # val top-1 of the default run (0.977, the config's 128 clips) with them, measured 2026-12-07: 0.977, 0.977, 0.906.
    # Per-block lists placing more merges early, 2026-12-08 (FLOP ratio, top-1 on those 128 clips): [5, 3, 3, 2] 1.82x
    # 0.977, [5, 4, 3, 2] 1.95x 0.977, [4, 3, 3, 2] 1.66x 0.953, [4, 4, 3, 2] 1.77x 0.930, [6, 2, 2, 2] 1.79x 0.969,
    # [6, 3, 2, 2] 1.92x 0.914, [7, 3, 2, 1] 2.10x 0.961, [8, 2, 2, 1] 2.17x 0.922: one clip is 0.8 points, so the two
    # best were picked on these clips and are reported on more (--video-val-per-class)
    "video": Run("TimeSformer-nano, 8x32x32, divided", "video", "configs/timesformer_nano.yaml", "val/top1",
                 (16, 3, 8, 32, 32), [None, 2, 3, 4, [5, 3, 3, 2], [5, 4, 3, 2]]),
    # 27 tokens, 4 blocks; the convolutional decoder at 48³ does 96 % of the work, which merging leaves as it is (at
    # UNETR-Base's 96³, 216 tokens, the encoder is 26 % of 145 GFLOP: r 16 saves 12 %, so 1.36x is the ceiling there)
    "unetr": Run("UNETR (192 wide, 4 blocks), 48³ windows", "medical", "configs/unetr.yaml", "val/dice",
                 (1, 1, 48, 48, 48), [None, 2, 4, 6], classes=5),
}


def label(setting: Any) -> str:
    if setting is None:
        return "dense"
    if isinstance(setting, list):
        return f"r {setting}"
    if isinstance(setting, dict):
        return f"r {setting['r']} {setting.get('schedule', 'constant')}"
    return f"r {setting}"


def cli_main(task: str):
    import importlib

    return importlib.import_module(f"tasks.{task}").main


def fit(run: Run, root: Path, quick: bool, extra: list[str] = ()) -> str:
    """Train the run's config (the user's command) and return its last checkpoint."""
    args = ["fit", "--config", run.config, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
            "false", "--trainer.logger", "false", *extra]
    if quick:
        args += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "1"]
    cli = cli_main(run.task)(args)
    return cli.trainer.checkpoint_callback.last_model_path


def validate(run: Run, ckpt: str, root: Path, quick: bool, setting: Any, extra: list[str] = ()) -> tuple[float, nn.Module]:
    """The metric of ``ckpt`` validated with ``token_merging: setting``, and the module (``run.val_per_class``
    validation images per class of the built-in set when set: the same training images, more held-out ones)."""
    args = ["validate", "--config", run.config, "--ckpt_path", ckpt, "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra]
    if run.val_per_class:
        args += ["--data.synthetic_val_per_class", str(run.val_per_class)]
    if setting is not None:
        args += ["--model.token_merging", str(setting)]
    if quick:
        args += ["--trainer.limit_val_batches", "2"]
    cli = cli_main(run.task)(args)
    return float(cli.trainer.callback_metrics[run.metric]), cli.model.cpu()


def loss_of(task: str, classes: int, batch: tuple[int, ...]):
    """A loss and target for a training step on the timed input."""
    if task == "medical":
        y = torch.randint(0, classes, (batch[0], *batch[2:]))
    else:
        y = torch.randint(0, classes, (batch[0],))
    return F.cross_entropy, y


def forward_gflops(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / x.shape[0] / 1e9


def time_all(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, loss, steps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Inference and training samples/s of each model, medians: all inference passes first, then all training steps
    (a training step's large buffers would otherwise change the memory an inference pass finds), each phase with the
    models interleaved (each goes first as often)."""
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()}

    def infer(model: nn.Module) -> None:
        with torch.inference_mode():
            model(x)

    def train(model: nn.Module, name: str) -> None:
        loss(model(x).float(), y).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for model in models.values():
        model.eval()
    infer_s = interleaved_medians({k: partial(infer, m) for k, m in models.items()}, steps, warmup)
    for model in models.values():
        model.train()
    train_s = interleaved_medians({k: partial(train, m, k) for k, m in models.items()}, steps, warmup)
    return {k: (x.shape[0] / infer_s[k], x.shape[0] / train_s[k]) for k in models}


def bench_run(run: Run, args, work: Path) -> str:
    key = next(k for k, v in RUNS.items() if v is run)
    ckpt = getattr(args, f"{key}_ckpt") or fit(run, work / key, args.quick)
    models: dict[str, nn.Module] = {}
    metrics: dict[str, float] = {}
    for setting in run.settings:
        name = label(setting)
        metrics[name], models[name] = validate(run, ckpt, work / f"{key}_val", args.quick, setting)
    if key == "vit":
        dynamicvit = args.dynamicvit_ckpt or fit(
            Run("", "classification", "configs/dynamicvit_vit_small_cpu.yaml", "", (), []), work / "dynamicvit", args.quick,
            ["--model.pretrained", ckpt, "--model.teacher_pretrained", ckpt],
        )
        dvit = Run(run.name, "classification", "configs/dynamicvit_vit_small_cpu.yaml", run.metric, run.batch, [],
                   val_per_class=run.val_per_class)
        metrics["DynamicViT rho 0.7"], models["DynamicViT rho 0.7"] = validate(
            dvit, dynamicvit, work / "dynamicvit_val", args.quick, None, ["--model.teacher_pretrained", ckpt])
    for i, setting in enumerate(args.train_merged if key == "vit" else []):
        # the paper's second setting: trained with merging (the config's epochs), evaluated with it
        name = f"trained with {label(setting)}"
        merged_ckpt = args.merged_ckpt[i] if i < len(args.merged_ckpt) else fit(
            run, work / f"vit_merged_{i}", args.quick, ["--model.token_merging", str(setting)])
        metrics[name], models[name] = validate(run, merged_ckpt, work / "vit_merged_val", args.quick, setting)
    torch.manual_seed(0)
    x = torch.randn(run.batch)
    loss, y = loss_of(run.task, run.classes, run.batch)
    flops = {k: forward_gflops(m, x) for k, m in models.items()}
    rates = time_all(models, x, y, loss, args.steps, args.warmup)
    dense_infer, dense_train = rates["dense"]
    encoder = forward_gflops(models["dense"].backbone, x) / flops["dense"]  # the most merging can save
    lines = [
        (
            f"{run.name} (`{run.config}`, {Path(ckpt).name}), batch {run.batch[0]}: {run.metric} over "
            f"{'the validation set' if not run.val_per_class else f'{run.val_per_class} validation samples per class'} "
            f"({'2 batches, --quick' if args.quick else 'all of it'}); times of the task module's forward and "
            f"training step; the backbone is {encoder:.0%} of the dense forward's FLOPs"
        ),
        "",
        f"| setting | fwd GFLOP/sample | infer samples/s | infer vs dense | train samples/s | train vs dense | {run.metric} | Δ vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (infer, train) in rates.items():
        delta = metrics[name] - metrics["dense"]
        run.rows.append({"setting": name, "speed": infer / dense_infer, "metric": metrics[name]})
        lines.append(
            f"| {name} | {flops[name]:.3f} | {infer:.1f} | {infer / dense_infer:.2f}x | {train:.1f} | {train / dense_train:.2f}x | "
            f"{metrics[name]:.4f} | {delta:+.4f} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        merged = [r for r in run.rows if r["setting"] == "dense" or r["setting"].startswith("r ")]
        ax.plot([r["speed"] for r in merged], [r["metric"] for r in merged], "o", label="ToMe (no retraining)")
        for r in run.rows:
            ax.annotate(r["setting"], (r["speed"], r["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for kind, marker in (("DynamicViT", "s"), ("trained with", "^")):
            others = [r for r in run.rows if r["setting"].startswith(kind)]
            if others:
                name = others[0]["setting"] if kind == "DynamicViT" else "ToMe, trained with the same r"
                ax.plot([r["speed"] for r in others], [r["metric"] for r in others], marker, label=name)
        ax.set(title=run.name, xlabel="inference speed vs dense", ylabel=run.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = bench_parser(__doc__, steps=16, warmup=3)
    for key, run in RUNS.items():
        parser.add_argument(f"--{key}-ckpt", default=None, help=f"checkpoint of {run.config} (trained when missing)")
    parser.add_argument("--dynamicvit-ckpt", default=None, help="checkpoint of configs/dynamicvit_vit_small_cpu.yaml")
    parser.add_argument("--train-merged", type=yaml.safe_load, nargs="+", default=[], metavar="R",
                        help="also train the ViT-S run with token_merging R (the paper's training with merging), "
                             "evaluated with R: e.g. 1 '[3, 3, 2, 2]'")
    parser.add_argument("--merged-ckpt", nargs="+", default=[], metavar="CKPT",
                        help="checkpoints of those runs, in the order of --train-merged (trained when missing)")
    parser.add_argument("--val-per-class", type=int, default=0, metavar="N",
                        help="validate ViT-S on N images per class of the built-in shapes (the config's training set, more held-out "
                             "images): the config's 100 per class put a standard error of about a point on top-1")
    parser.add_argument("--video-val-per-class", type=int, default=0, metavar="N",
                        help="validate TimeSformer on N clips per class of the built-in motion videos (the config's 32 "
                             "per class make each clip 0.8 points of top-1)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--work", type=Path, default=Path("runs/bench_token_merging"), help="where trained runs go")
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/token_merging.png"))
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script, gives no figure")
    parser.add_argument("--note", default="", help="a sentence on the machine's state, written above the tables")
    args = parse_bench_args(parser)
    runs = [RUNS[k] for k in args.runs]
    RUNS["vit"].val_per_class = args.val_per_class
    RUNS["video"].val_per_class = args.video_val_per_class
    tables = [bench_run(run, args, args.work) for run in runs]
    plot(runs, args.plot)
    head = (f"`python -m benchmarks.bench_token_merging`; fp32, {torch.get_num_threads()} thread(s), our CPU kernels "
            f"{cpu_kernels()}, median of {args.steps} interleaved passes after {args.warmup} (inference, then training); {cpu_model()}, torch "
            f"{torch.__version__}. Plot: `{args.plot}`.")
    body = head + "\n\n" + (f"{args.note}\n\n" if args.note else "") + "\n\n".join(tables)
    print(body)
    if args.results:
        write_section(args.results, "Token merging (ToMe)", body)


if __name__ == "__main__":
    main()
