"""Network search over a trained super-network, any that implements the ``Supernet`` contract (``backbones.base``):
evolution (``strategy: evolution``, ``search.evolution``, Liao et al., 2021) or MES-guided pruning
(``strategy: mes_pruning``, ``search.mes``, Li et al., 2022), either over any space.

``python -m tasks.search --config configs/search/<space>.yaml --ckpt_path runs/.../last.ckpt``

The checkpoint is a classification run's over a super-network preset (``supernet``; ``search.network`` reads it).
A budget in MACs, parameters, latency on this machine or Mobile Efficiency Score (``search.costs``) bounds the
networks: the evolution's candidates meet it (MACs within ``[(1 - macs_tolerance) * C, C]`` for a MACs budget ``C``),
the pruning stops once it is met. The MES's latency unit is MobileNetV2's latency on this machine (``latency_unit_ms:
auto``), so an MES budget means the same on any host; ``budget.mes_fraction`` and ``budget.params_fraction`` set a
budget relative to the space instead. A candidate's fitness is the top-1 accuracy of the extracted network, with the
classifier sliced to its width, on a hold-out of ``data.search_holdout_per_class`` training images per class (never
the validation split), optionally after re-estimating its BatchNorm statistics on ``data.calibration_batches``
batches of the other training images. The output (``search.results``): ``candidates.csv``, ``pareto.png``,
``found.yaml`` + ``found.pth``, which ``python -m tasks.classification validate --config found.yaml`` evaluates and
``fit`` fine-tunes; the latency table is cached as ``latency_table.json`` (for the processor, threads and torch that
timed it) and ``state.json`` lets a killed search resume.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from .costs import Budget, Cost, Costs, MobileEfficiency
from .evolution import EvolutionSearch, EvolutionSettings
from .holdout import HoldoutSettings, calibration_batches, check_holdout_unseen, holdout_batches
from .latency import LatencySettings, LatencyTable
from .mes import MESPruning, PruningSettings
from engine.version import __version__
from .network import Fitness, load_supernet
from .results import Candidate, write_candidates, write_found, write_plot

Strategy = Literal["evolution", "mes_pruning"]
ROUND = {"evolution": "generation", "mes_pruning": "step"}


def search(
    *,
    ckpt_path: str,
    supernet: str,
    budget: Budget,
    strategy: Strategy = "evolution",
    evolution: EvolutionSettings = EvolutionSettings(),
    mes: MobileEfficiency = MobileEfficiency(),
    pruning: PruningSettings = PruningSettings(),
    data: HoldoutSettings = HoldoutSettings(),
    latency: LatencySettings = LatencySettings(),
    output_dir: str = "search",
) -> Path:
    """Run or resume the search; returns the path of ``found.yaml``.

    Args:
        ckpt_path: a Lightning checkpoint of a classification run over the super-network.
        supernet: the super-network preset the checkpoint must hold (one of ``configs/search/*.yaml``'s).
        budget: MACs, parameters, latency or MES to meet, or parameters or MES as a fraction of the space (see
            ``Budget``); one at least.
        strategy: ``evolution`` (sized by ``evolution``) or ``mes_pruning`` (at most ``pruning.max_steps`` steps).
        mes: the Mobile Efficiency Score's constants (a ``budget.mes``, and the pruning's guide); its latency unit
            ``auto`` is MobileNetV2's latency on this machine.
        data, latency: the hold-out and calibration data; how latency is measured.
        output_dir: where state, table, CSV, plot and the found network go; a search with the same settings there
            resumes after its last finished generation or step.
    """
    if not budget.is_set:
        raise ValueError(f"the {strategy} strategy needs a budget: budget.mes (a Mobile Efficiency Score to reach), "
                         "budget.macs, budget.params, budget.latency_ms, budget.mes_fraction or budget.params_fraction")
    if (budget.needs_latency or strategy == "mes_pruning") and not latency.measure:
        raise ValueError(f"a latency or MES budget and the mes_pruning strategy need latency.measure: true "
                         f"(strategy {strategy}, budget {budget.text()})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_supernet(ckpt_path, supernet)
    net = checkpoint.supernet
    table = (LatencyTable(net, out / "latency_table.json", batch_size=latency.batch_size, repeats=latency.repeats,
                          warmup=latency.warmup) if latency.measure else None)
    costs = Costs(net, table, mes)
    budget = costs.resolve(budget)
    costs.check_reachable(budget, window=strategy == "evolution")

    data_hparams = dict(checkpoint.data_hparams)
    if data.root is not None:
        data_hparams["root"] = data.root
    per_class = data.search_holdout_per_class
    check_holdout_unseen(data_hparams, per_class)
    batches = holdout_batches(data_hparams, per_class, data.batch_size, data.num_workers)
    calibration = calibration_batches(data_hparams, per_class, data.calibration_batches, data.batch_size)
    fitness = Fitness(checkpoint.network, batches, calibration)

    run_settings = {"ckpt_path": str(Path(ckpt_path).resolve()), "budget": asdict(budget), "holdout": per_class,
                    "calibration_batches": data.calibration_batches, "root": data_hparams.get("root"),
                    "mes": asdict(costs.mes) if budget.mes is not None or strategy == "mes_pruning" else None}
    csv_path, round_name = out / "candidates.csv", ROUND[strategy]

    def save(candidates: list[Candidate]) -> None:
        write_candidates(csv_path, net, candidates, round_name)

    candidates: list[Candidate] = []
    try:
        if strategy == "evolution":
            run_settings["evolution"] = {k: v for k, v in asdict(evolution).items() if k != "generations"}  # more resume
            candidates = EvolutionSearch(fitness, costs, budget, evolution, out).run(run_settings, save)
            found = candidates[0]
            initial = statistics.median(c.top1 for c in candidates if c.round == 0)
            summary = f"median of the initial population {initial:.4f}"
        else:
            run_settings["strategy"] = strategy  # no max_steps: more steps resume
            pruning_run = MESPruning(fitness, costs, budget, pruning, out)
            try:
                found = pruning_run.run(run_settings, save)
            finally:
                candidates = pruning_run.visits
            summary = f"largest {candidates[0].top1:.4f}; {len(candidates)} networks evaluated"
    finally:
        if table is not None:
            table.save()
        if candidates:
            save(candidates)
    write_plot(out / "pareto.png", candidates, found, round_name, budget, costs.mes)
    path = write_found(out, net, found, fitness.classifier(found.config), checkpoint.hparams, data_hparams, strategy)
    cost = Cost(found.macs, found.params, found.latency_ms, found.mes)
    print(f"found: hold-out top-1 {found.top1:.4f} ({summary}), {cost.text()}; wrote {path}", flush=True)
    return path


def build_parser() -> Any:
    """``--config`` YAML files and ``--<argument>`` overrides of ``search``'s arguments (jsonargparse)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m tasks.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--version", action="version", version=f"vision-suite {__version__}")
    parser.add_function_arguments(search)
    return parser


def main(args: list[str] | None = None) -> Path:
    parser = build_parser()
    cfg = parser.parse_args(args)
    init = parser.instantiate(cfg)
    return search(**{k: v for k, v in vars(init).items() if k != "config" and not k.startswith("__")})


if __name__ == "__main__":
    main()
