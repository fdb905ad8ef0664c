"""The fine-grained joint search of "Rethinking Vision Transformers for MobileNet Size and Speed" (Li et al., 2022,
section 4.2), MES-guided pruning, over any super-network (``strategy: mes_pruning``).

It starts from the largest network and, step by step, takes the reduction (``Supernet.reductions``: drop a block,
narrow a stage, lower a block's expansion ratio, fewer heads, as the space allows) with the smallest hold-out accuracy
drop per gain in the Mobile Efficiency Score (``search.costs``) until the network is within the budget. The latency
is measured on this machine, from a table of every part's latency (``search.latency``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .costs import Budget, Cost, Costs, MobileEfficiency  # noqa: F401  (MobileEfficiency: importable from here as before)
from .network import Fitness
from .results import Candidate


@dataclass
class PruningSettings:
    """At most ``max_steps`` reductions."""

    max_steps: int = 10_000


class MESPruning:
    """The pruning of ``fitness``'s super-network down to ``budget``; ``visits`` holds every network evaluated."""

    def __init__(self, fitness: Fitness, costs: Costs, budget: Budget, settings: PruningSettings) -> None:
        if costs.table is None:
            raise ValueError("the mes_pruning strategy scores latency measured on this machine: set latency.measure: true")
        self.fitness, self.costs, self.budget, self.settings = fitness, costs, budget, settings
        self.net = fitness.supernet
        self.visits: list[Candidate] = []

    def visit(self, step: int, action: str, config: Any) -> Candidate:
        cost = self.costs(config)
        visit = Candidate(step, config, self.fitness(config), cost.macs, cost.params, cost.latency_ms, cost.mes, action)
        self.visits.append(visit)
        return visit

    def within(self, visit: Candidate) -> bool:
        return self.budget.admits(Cost(visit.macs, visit.params, visit.latency_ms, visit.mes))

    def run(self) -> Candidate:
        """The network found (the last one chosen); every visit in ``visits``, the path taken ``chosen``."""
        current = self.visit(0, "largest", self.net.extreme_subnet(largest=True))
        current.chosen = True
        for step in range(1, self.settings.max_steps + 1):
            if self.within(current):
                return current
            best, best_key = None, None
            for reduction in self.net.reductions(current.config):
                visit = self.visit(step, reduction.action, reduction.config)
                gain = visit.mes - current.mes
                if gain <= 0:
                    continue
                key = ((current.top1 - visit.top1) / gain, -gain)  # smallest drop per MES gained; ties: larger gain
                if best_key is None or key < best_key:
                    best, best_key = visit, key
            if best is None:
                raise RuntimeError(f"step {step}: no reduction raises the MES of {current.mes:.2f}; budget not reached")
            best.chosen = True
            current = best
            print(f"step {step}: {best.action}: top-1 {best.top1:.4f}, {best.macs / 1e9:.4f} GMACs, "
                  f"{best.params / 1e6:.3f} M parameters, {best.latency_ms:.3f} ms, MES {best.mes:.2f}", flush=True)
        if not self.within(current):
            raise RuntimeError(f"pruning.max_steps={self.settings.max_steps} reductions taken without reaching the budget")
        return current
