"""What a search writes, whichever the strategy: ``candidates.csv`` (every network evaluated), ``pareto.png`` (hold-out
top-1 against MACs, parameters, latency and MES, the Pareto fronts, the path taken, the budget and the network found) and the found
network as ``found.yaml`` (a task config: the super-network's ``subnet_preset`` with the found architecture as
``backbone_kwargs``, ``pretrained: found.pth``, the super-network's recipe and data) plus ``found.pth`` (its backbone
and classifier, sliced from the super-network): ``python -m tasks.classification validate --config found.yaml``
evaluates it, ``fit`` fine-tunes it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from backbones.base import Supernet
from heads.classification import Classifier

from .costs import Budget, MobileEfficiency

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Candidate:
    """A sub-network evaluated: in ``round`` (the evolution's generation, the pruning's step), by ``action`` (how it
    was made), with its hold-out ``top1`` and costs (backbone MACs and parameters, latency on this machine and MES
    when measured); ``chosen``: on the path the search took (the pruning's steps, the evolution's best)."""

    round: int
    config: Any
    top1: float
    macs: int
    params: int
    latency_ms: float | None = None
    mes: float | None = None
    action: str = ""
    chosen: bool = False


def architecture(supernet: Supernet, config: Any) -> dict[str, Any]:
    """What varies between sub-networks of ``config``'s found YAML: its ``backbone_kwargs`` less the fixed ones."""
    return {k: v for k, v in supernet.arch_kwargs(config).items() if k not in supernet.fixed_kwargs}


def write_candidates(path: Path, supernet: Supernet, candidates: Sequence[Candidate], round_name: str) -> Path:
    """``candidates.csv``: one row per candidate, in the order given; ``architecture`` is the found YAML's varying
    ``backbone_kwargs``, ``subnet`` the config the super-network runs (``set_subnet``)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([round_name, "action", "chosen", "top1", "macs", "params", "latency_ms", "mes", "architecture",
                         "subnet"])
        for c in candidates:
            writer.writerow([c.round, c.action, int(c.chosen), f"{c.top1:.4f}", c.macs, c.params,
                             "" if c.latency_ms is None else f"{c.latency_ms:.4f}", "" if c.mes is None else f"{c.mes:.3f}",
                             json.dumps(architecture(supernet, c.config)), json.dumps(c.config)])
    tmp.replace(path)
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


def pareto_figure(candidates: Sequence[Candidate], found: Candidate, round_name: str, budget: Budget | None = None,
                  mes: MobileEfficiency | None = None) -> Figure:
    """Hold-out top-1 against MACs, parameters and (when measured) latency and MES, side by side, the budget's
    measures first, each axis in the budget's units: points coloured by round (``round_name``, with its colour key),
    the Pareto front, the chosen path (when it has more than the found network), the found network (a star) and the
    budget (a dotted line where it bounds that measure)."""
    from matplotlib.figure import Figure

    measured = all(c.latency_ms is not None for c in candidates)
    panels = [("macs", *_count_unit([c.macs for c in candidates], "MACs")),
              ("params", *_count_unit([c.params for c in candidates], "parameters"))]
    if measured:
        panels.append(("latency_ms", "latency (ms on the searching machine)", 1.0))
        unit = "" if mes is None else (f" (units: {mes.params_unit / 1e6:g} M parameters, MobileNetV2's "
                                       f"{mes.latency_unit_ms:.3g} ms)")
        panels.append(("mes", f"Mobile Efficiency Score{unit}", 1.0))
    bounds = {} if budget is None else {k: getattr(budget, k) for k in ("macs", "params", "latency_ms", "mes")
                                        if getattr(budget, k) is not None}
    panels.sort(key=lambda panel: panel[0] not in bounds)
    chosen = [c for c in candidates if c.chosen]
    fig = Figure(figsize=(5.5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label, scale) in zip(axes, panels):
        xs, ys = [getattr(c, key) / scale for c in candidates], [c.top1 for c in candidates]
        points = ax.scatter(xs, ys, s=8, c=[c.round for c in candidates], cmap="viridis", label="evaluated")
        sign = -1 if key == "mes" else 1  # a higher MES is the cheaper network
        front = [(sign * x, y) for x, y in pareto_front([sign * x for x in xs], ys)]
        ax.plot(*zip(*front), "r-", label="Pareto front")
        if len(chosen) > 1:
            ax.plot([getattr(c, key) / scale for c in chosen], [c.top1 for c in chosen], "k.--", lw=0.8,
                    label="path taken")
        ax.plot([getattr(found, key) / scale], [found.top1], "k*", ms=12, label="found")
        if key in bounds:
            bound = "at least" if key == "mes" else "at most"
            ax.axvline(bounds[key] / scale, color="tab:red", ls=":", label=f"budget: {bound} {bounds[key] / scale:.4g}")
        ax.set(xlabel=label, ylabel="hold-out top-1")
        ax.legend(fontsize="small")
    fig.colorbar(points, ax=axes.tolist(), label=round_name)
    return fig


def _count_unit(values: Sequence[float], name: str) -> tuple[str, float]:
    """An axis label and scale for a count (``M`` or ``G`` by its size)."""
    scale, prefix = (1e9, "G") if max(values) >= 1e9 else (1e6, "M")
    return f"{name} ({prefix})", scale


def write_plot(path: Path, candidates: Sequence[Candidate], found: Candidate, round_name: str,
               budget: Budget | None = None, mes: MobileEfficiency | None = None) -> Path:
    """``pareto.png``: ``pareto_figure``."""
    fig = pareto_figure(candidates, found, round_name, budget, mes)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and keys as strings (what ``yaml.safe_dump`` writes plainly)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def write_found(output_dir: Path, supernet: Supernet, found: Candidate, network: Classifier,
                hparams: dict[str, Any], data_hparams: dict[str, Any], strategy: str) -> Path:
    """``found.yaml`` and ``found.pth`` of the found sub-network ``network`` (its classifier as scored).

    The recipe is the super-network run's (``hparams``) with the sub-network's backbone; the data its
    (``data_hparams``) with no hold-out left out (the found network trains on every training image).
    """
    weights = output_dir / "found.pth"
    torch.save({f"backbone.{k}": v for k, v in network.backbone.state_dict().items()}
               | {f"head.{k}": v for k, v in network.head.state_dict().items()}, weights)
    recipe = {k: v for k, v in hparams.items()
              if k not in ("backbone", "backbone_kwargs", "pretrained", "num_classes", "class_names")
              and not k.startswith("_")}
    described = supernet.describe(found.config)
    model = {"backbone": described["backbone"], "backbone_kwargs": described["backbone_kwargs"],
             "pretrained": str(weights.resolve()), **recipe}
    recipe_yaml = {"seed_everything": 0, "model": model, "data": {**data_hparams, "search_holdout_per_class": 0}}
    costs = [f"{found.macs / 1e9:.4f} GMACs", f"{found.params / 1e6:.3f} M parameters (backbone)"]
    if found.latency_ms is not None:
        costs.append(f"{found.latency_ms:.3f} ms on the searching machine")
    if found.mes is not None:
        costs.append(f"MES {found.mes:.2f}")
    header = (f"# Found by python -m tasks.search (strategy {strategy}): hold-out top-1 {found.top1:.4f}, "
              f"{', '.join(costs)}.\n"
              f"# The {described['backbone']} preset's class with the found architecture (backbone_kwargs); weights "
              "sliced from the super-network: validate evaluates them, fit fine-tunes them.\n"
              f"# Sub-network of the super-network: {json.dumps(found.config)}\n")
    path = output_dir / "found.yaml"
    path.with_suffix(".tmp").write_text(header + yaml.safe_dump(plain(recipe_yaml), sort_keys=False))
    path.with_suffix(".tmp").replace(path)
    return path
