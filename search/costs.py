"""What a sub-network of any super-network (``backbones.base.Supernet``) costs, and the budget it must meet.

A cost is the sub-network's MACs and parameters (counted by the super-network without building it), its latency on
this machine (from a ``LatencyTable``, when measured) and its Mobile Efficiency Score (Li et al., 2022, "Rethinking
Vision Transformers for MobileNet Size and Speed", section 4.2), with ``M`` the parameters and the latency and ``U``
their units::

    MES = score * (params / params_unit) ** -alpha_params * (latency / latency_unit_ms) ** -alpha_latency

(the paper's: score 100, units 3 M parameters and 1 ms, both alphas 0.5). A budget in MACs, parameters, latency or
MES, alone or together, applies to either strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backbones.base import Supernet

from .latency import LatencyTable


@dataclass
class Budget:
    """At most ``macs`` MACs (the evolution's candidates also at least ``(1 - macs_tolerance) * macs``), at most
    ``params`` parameters, at most ``latency_ms`` milliseconds per batch of ``latency.batch_size`` on this machine,
    a Mobile Efficiency Score ``mes`` at least. Unset (``None``) ones do not apply; a search needs one."""

    macs: float | None = None
    macs_tolerance: float = 0.025
    params: float | None = None
    latency_ms: float | None = None
    mes: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.macs, self.params, self.latency_ms, self.mes))

    @property
    def needs_latency(self) -> bool:
        return self.latency_ms is not None or self.mes is not None

    def admits(self, cost: Cost, *, window: bool = False) -> bool:
        """Whether ``cost`` meets the budget (the MACs window's lower end too with ``window``); a latency or MES the
        cost lacks (not measured yet) is not checked."""
        if self.macs is not None and (cost.macs > self.macs or window and cost.macs < self.macs_floor):
            return False
        if self.params is not None and cost.params > self.params:
            return False
        if self.latency_ms is not None and cost.latency_ms is not None and cost.latency_ms > self.latency_ms:
            return False
        return self.mes is None or cost.mes is None or cost.mes >= self.mes

    @property
    def macs_floor(self) -> float:
        return (1 - self.macs_tolerance) * self.macs if self.macs is not None else 0.0

    def text(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in ("macs", "params", "latency_ms", "mes")
                         if getattr(self, k) is not None)


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


@dataclass(frozen=True)
class Cost:
    """A sub-network's MACs and parameters (its backbone's), latency (ms, this machine) and MES; the last two
    ``None`` when not measured."""

    macs: int
    params: int
    latency_ms: float | None = None
    mes: float | None = None

    def text(self) -> str:
        parts = [f"{self.macs / 1e9:.4f} GMACs", f"{self.params / 1e6:.3f} M parameters"]
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:.3f} ms on this machine")
        if self.mes is not None:
            parts.append(f"MES {self.mes:.2f}")
        return ", ".join(parts)


class Costs:
    """The cost of a sub-network of ``supernet``: latency from ``table`` (``None``: not measured), MES by ``mes``."""

    def __init__(self, supernet: Supernet, table: LatencyTable | None, mes: MobileEfficiency) -> None:
        self.net, self.table, self.mes = supernet, table, mes

    def __call__(self, config: Any, *, measure: bool = True) -> Cost:
        """The cost of ``config``; without ``measure`` only what is counted (MACs, parameters), which is quick."""
        macs, params = self.net.macs_params(config)
        if not measure or self.table is None:
            return Cost(macs, params)
        latency = self.table.latency_ms(config)
        return Cost(macs, params, latency, self.mes(params, latency))

    def check_reachable(self, budget: Budget, *, window: bool) -> None:
        """Refuse a budget no sub-network meets, naming what the space reaches (the MACs window's lower end too with
        ``window``)."""
        small = self(self.net.extreme_subnet(largest=False))
        if budget.macs is not None and small.macs > budget.macs:
            raise ValueError(f"MACs budget {budget.macs:.4g} is below the smallest reachable MACs {small.macs} "
                             f"({small.macs / 1e9:.3f} G) of this search space")
        if not budget.admits(small):
            raise ValueError(
                f"budget {budget.text()} is out of reach: the smallest network of this search space has {small.params} "
                f"parameters, {small.macs} MACs" + ("" if small.latency_ms is None else
                                                    f", {small.latency_ms:.3f} ms on this machine, MES {small.mes:.2f}"))
        if window and budget.macs is not None:
            large = self(self.net.extreme_subnet(largest=True), measure=False)
            if large.macs < budget.macs_floor:
                raise ValueError(f"MACs budget {budget.macs:.4g}: candidates must have at least {budget.macs_floor:.4g} "
                                 f"MACs, but the largest network has {large.macs}")
