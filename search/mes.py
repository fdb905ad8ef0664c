"""The fine-grained joint search of "Rethinking Vision Transformers for MobileNet Size and Speed" (Li et al., 2022,
section 4.2), MES-guided pruning, over any super-network (``strategy: mes_pruning``).

It starts from the largest network and, step by step, takes the reduction (``Supernet.reductions``: drop a block,
narrow a stage, lower a block's expansion ratio, fewer heads, as the space allows) with the smallest hold-out accuracy
drop per gain in the Mobile Efficiency Score (``search.costs``) until the network is within the budget. The latency
is measured on this machine, from a table of every part's latency (``search.latency``). After every step
``<output_dir>/state.json`` holds every network evaluated, so a killed search started again with the same settings
resumes after the last finished step and ends at the same network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .costs import Budget, Cost, Costs, MobileEfficiency  # noqa: F401  (MobileEfficiency: importable from here as before)
from .network import Fitness
from .results import Candidate
from .state import candidate_from, candidate_record, read_state, write_state


@dataclass
class PruningSettings:
    """At most ``max_steps`` reductions."""

    max_steps: int = 10_000


class MESPruning:
    """The pruning of ``fitness``'s super-network down to ``budget``; ``visits`` holds every network evaluated, its
    state ``output_dir/state.json`` (none without ``output_dir``)."""

    def __init__(self, fitness: Fitness, costs: Costs, budget: Budget, settings: PruningSettings,
                 output_dir: Path | None = None) -> None:
        if costs.table is None:
            raise ValueError("the mes_pruning strategy scores latency measured on this machine: set latency.measure: true")
        self.fitness, self.costs, self.budget, self.settings = fitness, costs, budget, settings
        self.net = fitness.supernet
        self.state_path = None if output_dir is None else output_dir / "state.json"
        self.visits: list[Candidate] = []

    def visit(self, step: int, action: str, config: Any) -> Candidate:
        cost = self.costs(config)
        visit = Candidate(step, config, self.fitness(config), cost.macs, cost.params, cost.latency_ms, cost.mes, action)
        self.visits.append(visit)
        return visit

    def within(self, visit: Candidate) -> bool:
        return self.budget.admits(Cost(visit.macs, visit.params, visit.latency_ms, visit.mes))

    def run(self, run_settings: dict[str, Any] | None = None,
            save: Callable[[list[Candidate]], None] | None = None) -> Candidate:
        """The network found (the last one chosen); every visit in ``visits``, the path taken ``chosen``. Resumes a
        previous run with ``run_settings`` after its last finished step; ``save`` gets the visits after each step."""
        done = self.load_state(run_settings or {})
        if done < 0:
            current = self.visit(0, "largest", self.net.extreme_subnet(largest=True))
            current.chosen = True
            self.step_done(0, run_settings, save)
        else:
            current = [v for v in self.visits if v.chosen][-1]
            print(f"resuming {self.state_path} after step {done}: {len(self.visits)} networks evaluated", flush=True)
        for step in range(max(done, 0) + 1, self.settings.max_steps + 1):
            if self.within(current):
                return current
            best = self.choose(step, current)
            best.chosen = True
            current = best
            self.step_done(step, run_settings, save)
            print(f"step {step}: {best.action}: top-1 {best.top1:.4f}, {best.macs / 1e9:.4f} GMACs, "
                  f"{best.params / 1e6:.3f} M parameters, {best.latency_ms:.3f} ms, MES {best.mes:.2f}", flush=True)
        if not self.within(current):
            raise RuntimeError(f"pruning.max_steps={self.settings.max_steps} reductions taken without reaching the budget")
        return current

    def choose(self, step: int, current: Candidate) -> Candidate:
        """Every reduction of ``current`` evaluated; the one with the smallest hold-out top-1 drop per MES gained
        (ties: the larger gain). Where none gains (latencies timed on a busy machine can make a narrower part time
        slower), the one with the highest MES, said so: every reduction makes the network smaller, so the pruning
        still ends, at worst at the smallest network, which meets the budget (``Costs.check_reachable``)."""
        best, best_key, visits = None, None, []
        for reduction in self.net.reductions(current.config):
            visit = self.visit(step, reduction.action, reduction.config)
            visits.append(visit)
            gain = visit.mes - current.mes
            if gain <= 0:
                continue
            key = ((current.top1 - visit.top1) / gain, -gain)
            if best_key is None or key < best_key:
                best, best_key = visit, key
        if best is None:
            if not visits:
                raise RuntimeError(f"step {step}: the network has no reduction left and MES {current.mes:.2f}; budget "
                                   "not reached")
            best = max(visits, key=lambda v: v.mes)
            print(f"step {step}: no reduction raises the MES of {current.mes:.2f} (timing noise?): taking the one "
                  "that keeps it highest", flush=True)
        return best

    def step_done(self, step: int, run_settings: dict[str, Any] | None,
                  save: Callable[[list[Candidate]], None] | None) -> None:
        if self.state_path is not None:
            write_state(self.state_path, run_settings or {}, "step", step, [candidate_record(v) for v in self.visits])
        if save is not None:
            save(self.visits)

    def load_state(self, run_settings: dict[str, Any]) -> int:
        """The last finished step of a previous run with these settings (-1 when none), its visits in ``visits``."""
        state = None if self.state_path is None else read_state(self.state_path, run_settings, "step")
        if state is None:
            return -1
        step, records = state
        self.visits = [candidate_from(r, self.state_path) for r in records]
        if not any(v.chosen for v in self.visits):
            raise ValueError(f"{self.state_path} holds no network chosen; use another output_dir")
        return step
