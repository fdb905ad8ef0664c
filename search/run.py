"""Network search over a trained super-network: evolution for ViT-ResNAS (Liao et al., 2021, below) or, with
``strategy: mes_pruning``, EfficientFormerV2's fine-grained joint search (``search_mes``).

``python -m tasks.search --config configs/search/vit_resnas_tiny.yaml --ckpt_path runs/.../last.ckpt``

A candidate is a sub-network of the checkpoint's super-network whose MACs lie in ``[(1 - macs_tolerance) * C, C]``
for the budget ``C`` (and, when set, whose parameters and latency on this machine, from ``LatencyTable``, are
within theirs). Its fitness is the top-1 accuracy of the extracted network, with the classifier sliced to its
width, on a hold-out of ``data.search_holdout_per_class`` training images per class (never the validation split).
The evolution is ``search_evolution.Evolution``. After every generation ``<output_dir>/state.json`` holds every
evaluated candidate, so a killed search started again with the same config resumes after the last finished
generation. At the end: ``candidates.csv`` (generation, top-1, MACs, params, latency, architecture),
``pareto.png`` (top-1 against MACs, and latency when measured), and the best candidate as ``found.yaml`` (``backbone: vit_resnas``
with its architecture, ``pretrained: found.pth``) plus ``found.pth``, its weights and classifier sliced from the
super-network: ``python -m tasks.classification validate --config found.yaml`` evaluates it, ``fit`` fine-tunes it.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from backbones.vit_resnas_supernet import SubnetConfig, ViTResNASSupernet
from heads.classification import ClassificationHead, Classifier
from tasks.classification import ClassificationModule

from .holdout import check_holdout_unseen, holdout_batches
from .evolution import Evolution, EvolutionSettings, Genes
from .latency import LatencyTable
from .mes import MobileEfficiency, PruningSettings, mes_search



@dataclass
class Budget:
    """MACs budget ``macs`` (candidates within ``[(1 - macs_tolerance) * macs, macs]``; the evolution needs it),
    optional parameter and latency budgets (milliseconds per batch of ``latency.batch_size`` on this machine), and
    for ``mes_pruning`` a Mobile Efficiency Score ``mes`` to reach (``search_mes``)."""

    macs: float | None = None
    macs_tolerance: float = 0.025
    params: float | None = None
    latency_ms: float | None = None
    mes: float | None = None


@dataclass
class HoldoutSettings:
    """Where the fitness images come from: ``root`` (``None``: the checkpoint's data) and how many per class."""

    root: str | None = None
    search_holdout_per_class: int = 25
    batch_size: int = 100
    num_workers: int = 0


@dataclass
class LatencySettings:
    """Measure each candidate's latency from the per-block table (cached as ``latency_table.json``)."""

    measure: bool = True
    batch_size: int = 1
    repeats: int = 10
    warmup: int = 2


@dataclass
class Record:
    generation: int
    genes: list[Any]
    macs: int
    params: int
    latency_ms: float | None
    top1: float = field(default=float("nan"))


def load_supernet(ckpt_path: str, expected: str, kind: type = ViTResNASSupernet,
                  pools: tuple[str, ...] = ("cls", "avg")) -> ClassificationModule:
    """The checkpoint's classification module; refused unless its backbone is the super-network ``expected``, a
    ``kind``, under a head of one of ``pools`` without distillation classifier (its classifier is sliced)."""
    hparams = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    name = hparams.get("backbone")
    if name != expected:
        raise ValueError(f"checkpoint {ckpt_path} holds backbone {name!r}, but this search is over the super-network "
                         f"{expected!r}: search it with a config for {name!r}, or give a {expected!r} checkpoint")
    module = ClassificationModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    if not isinstance(module.backbone, kind):
        raise ValueError(f"checkpoint {ckpt_path}: backbone {name!r} is not a {kind.__name__}")
    if module.head.pool not in pools or module.head.fc_dist is not None:
        raise ValueError(f"a sub-network's classifier is sliced from the super-network's: pool {' or '.join(pools)} "
                         f"without distillation head, got pool {module.head.pool!r}")
    return module.eval()


def subnet_classifier(module: ClassificationModule, config: SubnetConfig) -> Classifier:
    """The sub-network with its classifier, weights sliced from ``module``."""
    backbone = module.backbone.extract(config).eval()
    width = backbone.num_features
    head = ClassificationHead(width, module.num_classes, pool=module.head.pool, num_prefix_tokens=1)
    with torch.no_grad():
        head.fc.weight.copy_(module.head.fc.weight[:, :width])
        head.fc.bias.copy_(module.head.fc.bias)
    return Classifier(backbone, head).eval()


@torch.no_grad()
def top1(network: torch.nn.Module, batches: Any) -> float:
    correct = total = 0
    for batch in batches:
        x, y = (batch["input"], batch["target"]) if isinstance(batch, dict) else batch
        correct += int((network(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


class Search:
    """One search: the super-network, the budget test, the evaluated candidates and their files."""

    def __init__(self, module: ClassificationModule, budget: Budget, evolution: EvolutionSettings,
                 latency: LatencySettings, output_dir: Path) -> None:
        self.module, self.net, self.budget = module, module.backbone, budget
        self.output_dir = output_dir
        self.genes = self.net.space.genes()
        self.table = LatencyTable(self.net, output_dir / "latency_table.json", batch_size=latency.batch_size,
                                  repeats=latency.repeats, warmup=latency.warmup) if latency.measure else None
        if budget.latency_ms is not None and self.table is None:
            raise ValueError("a latency budget needs latency.measure: true")
        self.evolution = Evolution([ch for _, ch in self.genes], self.fits, evolution)
        self.records: dict[Genes, Record] = {}

    def config(self, genes: Genes) -> SubnetConfig:
        return self.net.space.decode(genes)

    def fits(self, genes: Genes) -> bool:
        b = self.budget
        macs, params = self.net.macs_params(self.config(genes))
        if not (1 - b.macs_tolerance) * b.macs <= macs <= b.macs or (b.params is not None and params > b.params):
            return False
        return b.latency_ms is None or self.table.latency_ms(self.config(genes)) <= b.latency_ms

    def check_budget(self) -> None:
        """Refuse a budget no candidate can meet, naming what the space can reach."""
        b, space = self.budget, self.net.space
        (small_macs, small_params), (large_macs, _) = (self.net.macs_params(space.extreme(largest=v)) for v in (False, True))
        if small_macs > b.macs:
            raise ValueError(f"MACs budget {b.macs:.4g} is below the smallest reachable MACs {small_macs} "
                             f"({small_macs / 1e9:.3f} G) of this search space")
        if large_macs < (1 - b.macs_tolerance) * b.macs:
            raise ValueError(f"MACs budget {b.macs:.4g}: candidates must have at least {(1 - b.macs_tolerance) * b.macs:.4g} "
                             f"MACs, but the largest network has {large_macs}")
        if b.params is not None and small_params > b.params:
            raise ValueError(f"parameter budget {b.params:.4g} is below the smallest reachable {small_params}")
        if b.latency_ms is not None:
            fastest = self.table.latency_ms(space.extreme(largest=False))
            if fastest > b.latency_ms:
                raise ValueError(f"latency budget {b.latency_ms} ms is below the smallest network's {fastest:.3f} ms "
                                 "measured on this machine")

    def evaluate(self, genes: Genes, generation: int, batches: Any) -> Record:
        config = self.config(genes)
        macs, params = self.net.macs_params(config)
        latency = self.table.latency_ms(config) if self.table is not None else None
        record = Record(generation, list(genes), macs, params, latency)
        record.top1 = top1(subnet_classifier(self.module, config), batches)
        return record

    def ranked(self) -> list[Genes]:
        return [g for g, _ in sorted(self.records.items(), key=lambda kv: -kv[1].top1)]

    # --- files --------------------------------------------------------------------------------------------

    def save_state(self, generation: int, settings: dict[str, Any]) -> None:
        state = {"settings": settings, "generation": generation, "records": [asdict(r) for r in self.records.values()]}
        path = self.output_dir / "state.json"
        path.with_suffix(".tmp").write_text(json.dumps(state))
        path.with_suffix(".tmp").replace(path)
        if self.table is not None:
            self.table.save()
        self.write_csv()

    def load_state(self, settings: dict[str, Any]) -> int:
        """The last finished generation of a previous run with these settings (-1 when none)."""
        path = self.output_dir / "state.json"
        if not path.is_file():
            return -1
        state = json.loads(path.read_text())
        if state["settings"] != settings:
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise ValueError(f"{path} is a search with other settings ({', '.join(changed)}); use another output_dir")
        self.records = {tuple(r["genes"]): Record(**r) for r in state["records"]}
        return state["generation"]

    def write_csv(self) -> None:
        with open(self.output_dir / "candidates.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["generation", "top1", "macs", "params", "latency_ms", "architecture"])
            for genes in self.ranked():
                r = self.records[genes]
                writer.writerow([r.generation, f"{r.top1:.4f}", r.macs, r.params,
                                 "" if r.latency_ms is None else f"{r.latency_ms:.3f}", json.dumps(self.config(genes))])

    def write_found(self, data_hparams: dict[str, Any]) -> Path:
        """``found.yaml`` and ``found.pth`` of the best candidate."""
        best = self.ranked()[0]
        config = self.config(best)
        network = subnet_classifier(self.module, config)
        weights = self.output_dir / "found.pth"
        torch.save({f"backbone.{k}": v for k, v in network.backbone.state_dict().items()}
                   | {f"head.{k}": v for k, v in network.head.state_dict().items()}, weights)
        recipe = {k: v for k, v in self.module.hparams.items()
                  if k not in ("backbone", "backbone_kwargs", "pretrained", "num_classes", "class_names")
                  and not k.startswith("_")}
        arch = self.net.arch_kwargs(config)
        record = self.records[best]
        found = {
            "seed_everything": 0,
            "model": {"backbone": "vit_resnas", "backbone_kwargs": arch, "pretrained": str(weights.resolve()), **recipe},
            "data": data_hparams,
        }
        header = (f"# Found by python -m tasks.search: hold-out top-1 {record.top1:.4f}, {record.macs / 1e9:.4f} GMACs, "
                  f"{record.params / 1e6:.3f} M parameters (backbone)"
                  + ("" if record.latency_ms is None else f", {record.latency_ms:.2f} ms") + ".\n"
                  "# Weights sliced from the super-network: validate evaluates them, fit fine-tunes them.\n")
        path = self.output_dir / "found.yaml"
        path.write_text(header + yaml.safe_dump(_plain(found), sort_keys=False))
        return path

    def write_plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = list(self.records.values())
        axes_of = [("macs", "MACs")] + ([("latency_ms", "latency (ms)")] if self.table is not None else [])
        fig, axes = plt.subplots(1, len(axes_of), figsize=(6 * len(axes_of), 4.5), squeeze=False)
        for ax, (key, label) in zip(axes[0], axes_of):
            xs, ys = [getattr(r, key) for r in records], [r.top1 for r in records]
            ax.scatter(xs, ys, s=8, c=[r.generation for r in records], cmap="viridis")
            ax.plot(*zip(*pareto_front(xs, ys)), "r-", label="Pareto front")
            ax.set(xlabel=label, ylabel="hold-out top-1")
            ax.legend()
        path = self.output_dir / "pareto.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path


def pareto_front(costs: list[float], scores: list[float]) -> list[tuple[float, float]]:
    """The points no cheaper point beats: ``(cost, score)`` pairs by increasing cost, each scoring higher than all
    cheaper ones."""
    front, best = [], float("-inf")
    for cost, score in sorted(zip(costs, scores)):
        if score > best:
            front.append((cost, score))
            best = score
    return front


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def search(
    *,
    ckpt_path: str,
    supernet: str,
    budget: Budget,
    evolution: EvolutionSettings = EvolutionSettings(),
    data: HoldoutSettings = HoldoutSettings(),
    latency: LatencySettings = LatencySettings(),
    output_dir: str = "search",
    strategy: Literal["evolution", "mes_pruning"] = "evolution",
    mes: MobileEfficiency = MobileEfficiency(),
    pruning: PruningSettings = PruningSettings(),
) -> Path:
    """Run (or resume) the search; returns the path of ``found.yaml``.

    Args:
        ckpt_path: a Lightning checkpoint of ``ClassificationModule`` over the super-network.
        supernet: the super-network preset the checkpoint must hold (``vit_resnas_supernet_tiny``).
        budget, evolution, data, latency: see their classes.
        output_dir: where state, table, CSV, plot and the found network go.
        strategy: ``evolution`` (ViT-ResNAS) or ``mes_pruning`` (EfficientFormerV2's fine-grained joint search,
            ``search_mes``, with ``mes`` and ``pruning``).
    """
    if strategy == "mes_pruning":
        return mes_search(ckpt_path=ckpt_path, supernet=supernet, budget=budget, mes=mes, pruning=pruning, data=data,
                          latency=latency, output_dir=output_dir)
    if budget.macs is None:
        raise ValueError("the evolution strategy needs a MACs budget: budget.macs")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = load_supernet(ckpt_path, supernet)
    run = Search(module, budget, evolution, latency, out)
    run.check_budget()
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters", {})
    data_hparams = {k: v for k, v in saved.items() if not k.startswith("_")}
    if data.root is not None:
        data_hparams["root"] = data.root
    settings = {"ckpt_path": str(Path(ckpt_path).resolve()), "budget": asdict(budget), "evolution": {k: v for k, v in asdict(evolution).items() if k != "generations"},  # more generations resume
                "holdout": data.search_holdout_per_class, "root": data_hparams.get("root")}
    check_holdout_unseen(data_hparams, data.search_holdout_per_class)
    batches = holdout_batches(data_hparams, data.search_holdout_per_class, data.batch_size, data.num_workers)
    done = run.load_state(settings)
    for generation in range(done + 1, evolution.generations + 1):
        start = time.perf_counter()
        children = run.evolution.generation(generation, set(run.records), run.ranked())
        for genes in tqdm(children, desc=f"generation {generation}/{evolution.generations}", leave=False):
            run.records[genes] = run.evaluate(genes, generation, batches)
        run.save_state(generation, settings)
        minutes = (time.perf_counter() - start) / 60
        scores = [r.top1 for r in run.records.values()]
        print(f"generation {generation}: {len(children)} candidates ({len(children) / max(minutes, 1e-9):.1f}/min), "
              f"best top-1 {max(scores):.4f}, median {statistics.median(scores):.4f}, {len(scores)} evaluated", flush=True)
    run.write_plot()
    found = run.write_found({**data_hparams, "search_holdout_per_class": 0})  # the found network trains on all
    initial = [r.top1 for r in run.records.values() if r.generation == 0]
    print(f"best hold-out top-1 {run.records[run.ranked()[0]].top1:.4f} (median of the initial population "
          f"{statistics.median(initial):.4f}); wrote {found}", flush=True)
    return found


def build_parser() -> Any:
    """``--config`` YAML files and ``--<argument>`` overrides of ``search``'s arguments (jsonargparse)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m tasks.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(search)
    return parser


def main(args: list[str] | None = None) -> Path:
    parser = build_parser()
    cfg = parser.parse_args(args)
    init = parser.instantiate(cfg)
    return search(**{k: v for k, v in vars(init).items() if k != "config" and not k.startswith("__")})


if __name__ == "__main__":
    main()
