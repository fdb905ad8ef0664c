"""The evolutionary search of "Searching for Efficient Multi-Stage Vision Transformers" (Liao et al., 2021), over the
genes of any super-network's search space.

Generation 0 is ``population`` random candidates; every later generation is ``mutations`` children of parents
drawn from the best ``parents`` candidates seen so far (each gene redrawn with probability ``mutation_prob``) and
``crossovers`` children of two such parents (each gene from either). Every candidate meets the budget (``fits``)
and is new. Draws come from a generator seeded by ``(seed, generation)``, so a resumed search makes the same
children as an uninterrupted one. After every generation ``<output_dir>/state.json`` holds every evaluated
candidate, so a killed search started again with the same settings resumes after the last finished generation.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .costs import Budget, Costs
from .network import Fitness
from .results import Candidate
from .state import candidate_from, candidate_record, read_state, write_state

Genes = tuple[Any, ...]


@dataclass
class EvolutionSettings:
    """Sizes of the evolution (the paper's: 500 random, then 20 generations of 75 + 75 from the best 75)."""

    population: int = 500
    generations: int = 20
    parents: int = 75
    mutations: int = 75
    crossovers: int = 75
    mutation_prob: float = 0.3
    seed: int = 0
    max_tries: int = 200_000
    """Draws allowed per generation before the budget is declared too tight for the space."""


class Evolution:
    """Children of a generation from ``choices`` (per gene, its values), the ``fits`` budget test and the
    candidates seen (``seen``, gene tuples, which are never proposed again)."""

    def __init__(self, choices: Sequence[tuple[Any, ...]], fits: Callable[[Genes], bool], settings: EvolutionSettings) -> None:
        self.choices, self.fits, self.settings = list(choices), fits, settings

    def generation(self, index: int, seen: set[Genes], ranked: Sequence[Genes]) -> list[tuple[Genes, str]]:
        """The new candidates of generation ``index`` with how each was made (``random``, ``mutation``,
        ``crossover``); ``ranked`` holds the candidates seen, best first."""
        rng = random.Random(f"{self.settings.seed}-{index}")
        s = self.settings
        if index == 0:
            return self._fill(s.population, lambda: tuple(rng.choice(ch) for ch in self.choices), seen, "random")
        parents = list(ranked[: s.parents])
        mutate = lambda: tuple(rng.choice(ch) if rng.random() < s.mutation_prob else g  # noqa: E731
                               for g, ch in zip(rng.choice(parents), self.choices))
        children = self._fill(s.mutations, mutate, seen, "mutation")
        if len(parents) > 1:
            def cross() -> Genes:
                a, b = rng.sample(parents, 2)
                return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))
            children += self._fill(s.crossovers, cross, seen | {g for g, _ in children}, "crossover")
        return children

    def _fill(self, count: int, draw: Callable[[], Genes], seen: set[Genes], kind: str) -> list[tuple[Genes, str]]:
        found: list[tuple[Genes, str]] = []
        taken = set(seen)
        for _ in range(self.settings.max_tries):
            if len(found) == count:
                break
            genes = draw()
            if genes not in taken and self.fits(genes):
                taken.add(genes)
                found.append((genes, kind))
        if not found:
            raise RuntimeError(f"no {kind} candidate within the budget in {self.settings.max_tries} draws; "
                               "widen the budget (macs_tolerance) or raise max_tries")
        return found


class EvolutionSearch:
    """The evolution over ``fitness``'s super-network within ``budget``; its state in ``output_dir/state.json``."""

    def __init__(self, fitness: Fitness, costs: Costs, budget: Budget, settings: EvolutionSettings,
                 output_dir: Path) -> None:
        self.fitness, self.costs, self.budget, self.settings = fitness, costs, budget, settings
        self.net = fitness.supernet
        self.state_path = output_dir / "state.json"
        self.evolution = Evolution([values for _, values in self.net.search_space()], self.fits, settings)
        self.records: dict[Genes, Candidate] = {}

    def fits(self, genes: Genes) -> bool:
        """Within the budget's window: the counted costs first, the measured ones only when the budget needs them."""
        config = self.net.subnet(genes)
        if not self.budget.admits(self.costs(config, measure=False), window=True):
            return False
        return not self.budget.needs_latency or self.budget.admits(self.costs(config), window=True)

    def ranked(self) -> list[Candidate]:
        return [self.records[g] for g in self.ranked_genes()]

    def ranked_genes(self) -> list[Genes]:
        return sorted(self.records, key=lambda g: -self.records[g].top1)

    def run(self, run_settings: dict[str, Any], save: Callable[[list[Candidate]], None]) -> list[Candidate]:
        """Every generation not done yet (resuming a previous run with ``run_settings``); ``save`` gets the candidates,
        best first, after each. Returns them, the best one ``chosen``."""
        done = self.load_state(run_settings)
        generations = self.settings.generations
        for generation in range(done + 1, generations + 1):
            start = time.perf_counter()
            children = self.evolution.generation(generation, set(self.records), self.ranked_genes())
            for genes, kind in tqdm(children, desc=f"generation {generation}/{generations}", leave=False):
                config = self.net.subnet(genes)
                cost = self.costs(config)
                self.records[genes] = Candidate(generation, config, self.fitness(config), cost.macs, cost.params,
                                                cost.latency_ms, cost.mes, kind)
            self.save_state(generation, run_settings)
            save(self.ranked())
            minutes = (time.perf_counter() - start) / 60
            scores = [c.top1 for c in self.records.values()]
            print(f"generation {generation}: {len(children)} candidates ({len(children) / max(minutes, 1e-9):.1f}/min), "
                  f"best top-1 {max(scores):.4f}, median {statistics.median(scores):.4f}, {len(scores)} evaluated",
                  flush=True)
        ranked = self.ranked()
        ranked[0].chosen = True
        return ranked

    def save_state(self, generation: int, run_settings: dict[str, Any]) -> None:
        records = [candidate_record(c, genes=list(genes)) for genes, c in self.records.items()]
        write_state(self.state_path, run_settings, "generation", generation, records)

    def load_state(self, run_settings: dict[str, Any]) -> int:
        """The last finished generation of a previous run with these settings (-1 when none)."""
        state = read_state(self.state_path, run_settings, "generation")
        if state is None:
            return -1
        generation, records = state
        self.records = {tuple(r.pop("genes", ())): candidate_from(r, self.state_path) for r in records}
        return generation
