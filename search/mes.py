"""The fine-grained joint search of EfficientFormerV2 (Li et al., 2022, section 4.2) over a trained super-network.

``python -m tasks.search --config configs/search/efficientformerv2_cpu.yaml --ckpt_path runs/.../last.ckpt``
(``strategy: mes_pruning``)

It starts from the largest network and, step by step, takes the action with the smallest hold-out accuracy drop per
gain in the Mobile Efficiency Score until the network is within the budget. The actions: drop a block (one without
attention, not the first of its stage), narrow a stage by 16 channels, lower a block's expansion ratio to the next
choice. The score, with ``M`` the parameters and the latency and ``U`` their units::

    MES = score * (params / params_unit) ** -alpha_params * (latency / latency_unit_ms) ** -alpha_latency

(the paper's: score 100, units 3 M parameters and 1 ms, both alphas 0.5). The latency is measured on this machine,
from a table of every block configuration's latency in its inference form (``fuse()``), built once and cached as
``latency_table.json``. Accuracy is the top-1 of the extracted network (classifier sliced to its width) on the
search hold-out of ``data.search_holdout_per_class`` training images per class, optionally after re-estimating its
BatchNorm statistics on ``pruning.calibration_batches`` batches of the other training images.
Output in ``output_dir``: ``candidates.csv`` (every network evaluated: step, action, whether taken, top-1, parameters,
latency, MES, architecture), ``pareto.png`` (top-1 against latency and against parameters, the Pareto front and the
path taken) and ``found.yaml`` + ``found.pth`` (the final network and its sliced weights) for
``python -m tasks.classification validate|fit --config found.yaml``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from backbones.efficientformer_v2 import (
    AttentionDownsample, ConvNorm, Downsample, EfficientFormerV2Block, TalkingHeadAttention,
)
from backbones.efficientformer_v2_supernet import WIDTH_STEP, EfficientFormerV2Supernet, SubnetConfig

from .latency import LatencyTable

if TYPE_CHECKING:
    from tasks.classification import ClassificationModule

    from .run import Budget, HoldoutSettings, LatencySettings


@dataclass
class MobileEfficiency:
    """The Mobile Efficiency Score's constants (see the module docstring)."""

    score: float = 100.0
    params_unit: float = 3e6
    latency_unit_ms: float = 1.0
    alpha_params: float = 0.5
    alpha_latency: float = 0.5

    def __call__(self, params: float, latency_ms: float) -> float:
        return (self.score * (params / self.params_unit) ** -self.alpha_params
                * (latency_ms / self.latency_unit_ms) ** -self.alpha_latency)


@dataclass
class PruningSettings:
    """At most ``max_steps`` actions; ``calibration_batches`` batches of training images re-estimate each
    candidate's BatchNorm statistics before its accuracy is measured (0: the super-network's statistics)."""

    max_steps: int = 10_000
    calibration_batches: int = 0


class EfficientFormerV2LatencyTable(LatencyTable):
    """``LatencyTable`` over an EfficientFormerV2 super-network: the stem at its width, every downsampling at its two
    widths, every kept block at its stage, width and hidden width, each timed fused."""

    def parts(self, config: SubnetConfig) -> list[tuple[str, Any]]:
        fixed, b = self.net.fixed_kwargs, self.batch_size
        size, attn_blocks = fixed["img_size"], fixed["attention_blocks"]
        dims = config["embed_dims"]
        grid = lambda s: [math.ceil(v / 2 ** (s + 2)) for v in size]  # noqa: E731

        def stem() -> tuple[nn.Module, tuple[torch.Tensor]]:
            layers = nn.Sequential(ConvNorm(fixed["in_chans"], dims[0] // 2, 3, stride=2, act_layer=nn.GELU),
                                   ConvNorm(dims[0] // 2, dims[0], 3, stride=2, act_layer=nn.GELU))
            return _fused(layers), (torch.randn(b, fixed["in_chans"], *size),)

        parts: list[tuple[str, Any]] = [(f"stem:{dims[0]}", stem)]
        depths = self.net.space.depths
        for s, c in enumerate(dims):
            if s > 0:
                cin, prev = dims[s - 1], grid(s - 1)
                def down(cin: int = cin, c: int = c, prev: list[int] = prev, s: int = s) -> tuple[nn.Module, tuple]:
                    attn = AttentionDownsample(cin, c, table_grid=tuple(prev)) if s >= 3 else None
                    return _fused(Downsample(cin, c, attn)), (torch.randn(b, cin, *prev),)
                parts.append((f"down{s}:{cin}:{c}", down))
            for j in range(depths[s]):
                if not config["keep"][s][j]:
                    continue
                hidden, attn = int(c * config["mlp_ratios"][s][j]), s >= 2 and j >= depths[s] - attn_blocks
                def block(c: int = c, hidden: int = hidden, attn: bool = attn, s: int = s) -> tuple[nn.Module, tuple]:
                    stride, g = (2 if s == 2 else 1), grid(s)
                    mixer = TalkingHeadAttention(c, table_grid=tuple(math.ceil(v / stride) for v in g), stride=stride)
                    return _fused(EfficientFormerV2Block(c, hidden, attn=mixer if attn else None)), (torch.randn(b, c, *g),)
                parts.append((f"block{s}:{c}:{hidden}:{int(attn)}", block))
        return parts


def _fused(module: nn.Module) -> nn.Module:
    module.eval()
    for m in module.children() if isinstance(module, nn.Sequential) else (module,):
        m.fuse()
    return module


def actions(net: EfficientFormerV2Supernet, config: SubnetConfig) -> list[tuple[str, SubnetConfig]]:
    """Every one-step reduction of ``config``: ``(description, new config)``."""
    space, found = net.space, []
    def changed(field: str, s: int, j: int | None, value: Any) -> SubnetConfig:
        new = json.loads(json.dumps(config))
        if j is None:
            new[field][s] = value
        else:
            new[field][s][j] = value
        return new
    for s, width in enumerate(config["embed_dims"]):
        if width > space.embed_dims[s][-1]:
            found.append((f"narrow stage {s} to {width - WIDTH_STEP}", changed("embed_dims", s, None, width - WIDTH_STEP)))
        for j, keep in enumerate(config["keep"][s]):
            if not keep:
                continue
            if j in space.removable[s]:
                found.append((f"drop block {s}.{j}", changed("keep", s, j, False)))
            ratio = config["mlp_ratios"][s][j]
            smaller = [r for r in space.mlp_ratios if r < ratio]
            if smaller:
                found.append((f"ratio of block {s}.{j} to {smaller[0]:g}", changed("mlp_ratios", s, j, smaller[0])))
    return found


@dataclass
class Visit:
    step: int
    action: str
    top1: float
    params: int
    latency_ms: float
    mes: float
    config: SubnetConfig
    chosen: bool = False


class MESPruning:
    """One search: the super-network, MES and budget, the networks visited and their files."""

    def __init__(self, module: ClassificationModule, budget: Budget, mes: MobileEfficiency, latency: LatencySettings,
                 pruning: PruningSettings, output_dir: Path) -> None:
        if not latency.measure:
            raise ValueError("the mes_pruning strategy scores latency measured on this machine: set latency.measure: true")
        if budget.mes is None and budget.params is None and budget.latency_ms is None:
            raise ValueError("the mes_pruning strategy needs a budget: budget.mes (a Mobile Efficiency Score to reach), "
                             "budget.params or budget.latency_ms")
        self.module, self.net, self.budget, self.mes, self.pruning = module, module.backbone, budget, mes, pruning
        self.output_dir = output_dir
        self.table = EfficientFormerV2LatencyTable(self.net, output_dir / "latency_table.json",
                                                   batch_size=latency.batch_size, repeats=latency.repeats,
                                                   warmup=latency.warmup)
        self.visits: list[Visit] = []
        self.scores: dict[str, float] = {}

    def cost(self, config: SubnetConfig) -> tuple[int, float, float]:
        params, latency = self.net.params(config), self.table.latency_ms(config)
        return params, latency, self.mes(params, latency)

    def within(self, params: int, latency: float, mes: float) -> bool:
        b = self.budget
        return ((b.mes is None or mes >= b.mes) and (b.params is None or params <= b.params)
                and (b.latency_ms is None or latency <= b.latency_ms))

    def check_budget(self) -> None:
        """Refuse a budget the smallest network of the space misses, naming what it reaches."""
        params, latency, mes = self.cost(self.net.space.extreme(largest=False))
        if not self.within(params, latency, mes):
            raise ValueError(f"budget {_budget_text(self.budget)} is out of reach: the smallest network of this search "
                             f"space has {params} parameters, {latency:.3f} ms on this machine, MES {mes:.2f}")

    def visit(self, step: int, action: str, config: SubnetConfig, batches: Any, calibration: Any) -> Visit:
        from .run import subnet_classifier, top1

        key = json.dumps(self.net.arch_kwargs(config), sort_keys=True)
        if key not in self.scores:
            network = subnet_classifier(self.module, config)
            if calibration:
                recalibrate_batchnorm(network, calibration)
            self.scores[key] = top1(network, batches)
        visit = Visit(step, action, self.scores[key], *self.cost(config), config)
        self.visits.append(visit)
        return visit

    def run(self, batches: Any, calibration: Any) -> Visit:
        current = self.visit(0, "largest", self.net.space.extreme(largest=True), batches, calibration)
        current.chosen = True
        for step in range(1, self.pruning.max_steps + 1):
            if self.within(current.params, current.latency_ms, current.mes):
                return current
            best, best_key = None, None
            for action, config in actions(self.net, current.config):
                visit = self.visit(step, action, config, batches, calibration)
                gain = visit.mes - current.mes
                if gain <= 0:
                    continue
                key = ((current.top1 - visit.top1) / gain, -gain)  # smallest drop per MES gained; ties: larger gain
                if best_key is None or key < best_key:
                    best, best_key = visit, key
            if best is None:
                raise RuntimeError(f"step {step}: no action raises the MES of {current.mes:.2f}; budget not reached")
            best.chosen = True
            current = best
            print(f"step {step}: {best.action}: top-1 {best.top1:.4f}, {best.params / 1e6:.3f} M parameters, "
                  f"{best.latency_ms:.3f} ms, MES {best.mes:.2f}", flush=True)
        if not self.within(current.params, current.latency_ms, current.mes):
            raise RuntimeError(f"pruning.max_steps={self.pruning.max_steps} actions taken without reaching the budget")
        return current

    # --- files --------------------------------------------------------------------------------------------

    def write_csv(self) -> Path:
        path = self.output_dir / "candidates.csv"
        with open(path.with_suffix(".tmp"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "action", "chosen", "top1", "params", "latency_ms", "mes", "architecture"])
            for v in self.visits:
                arch = {k: a for k, a in self.net.arch_kwargs(v.config).items() if k in ("embed_dims", "depths", "mlp_ratios")}
                writer.writerow([v.step, v.action, int(v.chosen), f"{v.top1:.4f}", v.params, f"{v.latency_ms:.4f}",
                                 f"{v.mes:.3f}", json.dumps(arch)])
        path.with_suffix(".tmp").replace(path)
        return path

    def write_plot(self) -> Path:
        import matplotlib

        from .run import pareto_front  # search imports this module

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path_taken = [v for v in self.visits if v.chosen]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, (key, label) in zip(axes, (("latency_ms", "latency (ms, this machine)"), ("params", "parameters"))):
            xs, ys = [getattr(v, key) for v in self.visits], [v.top1 for v in self.visits]
            ax.scatter(xs, ys, s=8, c=[v.step for v in self.visits], cmap="viridis", label="evaluated")
            ax.plot(*zip(*pareto_front(xs, ys)), "r-", label="Pareto front")
            ax.plot([getattr(v, key) for v in path_taken], [v.top1 for v in path_taken], "k.--", lw=0.8, label="path taken")
            ax.set(xlabel=label, ylabel="hold-out top-1")
            ax.legend()
        path = self.output_dir / "pareto.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    def write_found(self, final: Visit, data_hparams: dict[str, Any], calibration: Any) -> Path:
        from .run import _plain, subnet_classifier

        network = subnet_classifier(self.module, final.config)
        if calibration:
            recalibrate_batchnorm(network, calibration)
        weights = self.output_dir / "found.pth"
        torch.save({f"backbone.{k}": v for k, v in network.backbone.state_dict().items()}
                   | {f"head.{k}": v for k, v in network.head.state_dict().items()}, weights)
        recipe = {k: v for k, v in self.module.hparams.items()
                  if k not in ("backbone", "backbone_kwargs", "pretrained", "num_classes", "class_names")
                  and not k.startswith("_")}
        arch = self.net.arch_kwargs(final.config)
        found = {"seed_everything": 0,
                 "model": {"backbone": "efficientformerv2_l", "backbone_kwargs": arch,
                           "pretrained": str(weights.resolve()), **recipe},
                 "data": data_hparams}
        header = (f"# Found by python -m tasks.search (strategy mes_pruning): hold-out top-1 {final.top1:.4f}, "
                  f"{final.params / 1e6:.3f} M parameters (backbone), {final.latency_ms:.3f} ms on the searching "
                  f"machine, MES {final.mes:.2f}.\n# The efficientformerv2_l preset's class with the found architecture "
                  "(backbone_kwargs); weights sliced from the super-network: validate evaluates them, fit fine-tunes.\n")
        path = self.output_dir / "found.yaml"
        path.with_suffix(".tmp").write_text(header + yaml.safe_dump(_plain(found), sort_keys=False))
        path.with_suffix(".tmp").replace(path)
        return path


def _budget_text(budget: Budget) -> str:
    parts = [f"{k}={getattr(budget, k)}" for k in ("mes", "params", "latency_ms") if getattr(budget, k) is not None]
    return ", ".join(parts)


@torch.no_grad()
def recalibrate_batchnorm(network: nn.Module, batches: Any) -> None:
    """Re-estimate every BatchNorm's running statistics (a cumulative average) on ``batches``; leaves eval mode."""
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    network.train()
    for x, _ in batches:
        network(x)
    for m in norms:
        m.momentum = 0.1
    network.eval()


def calibration_batches(data_hparams: dict[str, Any], count: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of training images outside the search hold-out, evaluation transform, a fixed shuffle."""
    from torch.utils.data import DataLoader

    from datamodules.classification import ClassificationDataModule, ImageFolderDataset

    if count <= 0:
        return []
    data = ClassificationDataModule(**data_hparams)
    samples = data.training_samples()
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    picked = [samples[i] for i in order[: count * batch_size]]
    loader = DataLoader(ImageFolderDataset(picked, data.eval_transform()), batch_size=batch_size)
    return [(b["input"], b["target"]) for b in loader]


def mes_search(*, ckpt_path: str, supernet: str, budget: Budget, mes: MobileEfficiency, pruning: PruningSettings,
               data: HoldoutSettings, latency: LatencySettings, output_dir: str) -> Path:
    """Run the search (``search.run.search`` with ``strategy: mes_pruning``); returns the path of ``found.yaml``."""
    from .run import load_supernet
    from .holdout import check_holdout_unseen, holdout_batches

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = load_supernet(ckpt_path, supernet, kind=EfficientFormerV2Supernet, pools=("native", "avg"))
    run = MESPruning(module, budget, mes, latency, pruning, out)
    run.check_budget()
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters", {})
    data_hparams = {k: v for k, v in saved.items() if not k.startswith("_")}
    if data.root is not None:
        data_hparams["root"] = data.root
    check_holdout_unseen(data_hparams, data.search_holdout_per_class)
    batches = holdout_batches(data_hparams, data.search_holdout_per_class, data.batch_size, data.num_workers)
    calibration = calibration_batches({**data_hparams, "search_holdout_per_class": data.search_holdout_per_class},
                                      pruning.calibration_batches, data.batch_size)
    try:
        final = run.run(batches, calibration)
    finally:
        run.table.save()
        run.write_csv()
    run.write_plot()
    found = run.write_found(final, {**data_hparams, "search_holdout_per_class": 0}, calibration)
    print(f"final network: hold-out top-1 {final.top1:.4f} (largest {run.visits[0].top1:.4f}), {final.params} "
          f"parameters, {final.latency_ms:.3f} ms, MES {final.mes:.2f}; {len(run.visits)} networks evaluated; "
          f"wrote {found}", flush=True)
    return found
