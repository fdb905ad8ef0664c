"""The evolutionary algorithm of ViT-ResNAS's search, over gene tuples of a ``SearchSpace``.

Generation 0 is ``population`` random candidates; every later generation is ``mutations`` children of parents
drawn from the best ``parents`` candidates seen so far (each gene redrawn with probability ``mutation_prob``) and
``crossovers`` children of two such parents (each gene from either). Every candidate meets the budget (``fits``)
and is new. Draws come from a generator seeded by ``(seed, generation)``, so a resumed search makes the same
children as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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

    def generation(self, index: int, seen: set[Genes], ranked: Sequence[Genes]) -> list[Genes]:
        """The new candidates of generation ``index``; ``ranked`` holds the candidates seen, best first."""
        rng = random.Random(f"{self.settings.seed}-{index}")
        s = self.settings
        if index == 0:
            return self._fill(s.population, lambda: tuple(rng.choice(ch) for ch in self.choices), seen, "random")
        parents = list(ranked[: s.parents])
        mutate = lambda: tuple(rng.choice(ch) if rng.random() < s.mutation_prob else g  # noqa: E731
                               for g, ch in zip(rng.choice(parents), self.choices))
        children = self._fill(s.mutations, mutate, seen, "mutated")
        if len(parents) > 1:
            def cross() -> Genes:
                a, b = rng.sample(parents, 2)
                return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))
            children += self._fill(s.crossovers, cross, seen | set(children), "crossed")
        return children

    def _fill(self, count: int, draw: Callable[[], Genes], seen: set[Genes], kind: str) -> list[Genes]:
        found: list[Genes] = []
        taken = set(seen)
        for _ in range(self.settings.max_tries):
            if len(found) == count:
                break
            genes = draw()
            if genes not in taken and self.fits(genes):
                taken.add(genes)
                found.append(genes)
        if not found:
            raise RuntimeError(f"no {kind} candidate within the budget in {self.settings.max_tries} draws; "
                               "widen the budget (macs_tolerance) or raise max_tries")
        return found
