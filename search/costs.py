"""What a sub-network of any super-network (``backbones.base.Supernet``) costs, and the budget it must meet.

A cost is the sub-network's MACs and parameters (counted by the super-network without building it), its latency on
this machine (from a ``LatencyTable``, when measured) and its Mobile Efficiency Score (Li et al., 2022, "Rethinking
Vision Transformers for MobileNet Size and Speed", section 4.2: ``MES = Score * prod_i (M_i / U_i) ** -alpha_i`` over
the metrics ``M_i`` with units ``U_i``), here over parameters and latency::

    MES = score * (params / params_unit) ** -alpha_params * (latency_ms / latency_unit_ms) ** -alpha_latency

The paper's constants are score 100, both alphas 0.5 and the units of MobileNetV2 x1.0 on its device: 3 M parameters
and 1 ms (its iPhone 12 latency). A latency measured on another machine is only on that scale in units of MobileNetV2's
latency *on that machine*, so ``latency_unit_ms: auto`` (the default) times timm's ``mobilenetv2_100`` here at the
candidates' input shape, batch size and threads (``LatencyTable.reference_ms``) and uses that: an MES budget then
means the same on any host. A number sets the unit in milliseconds instead.

A budget in MACs, parameters, latency or MES, alone or together, applies to either strategy; parameters and MES may
also be set relative to the space (``params_fraction``, ``mes_fraction``), which any machine reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from backbones.base import Supernet

from .latency import LatencyTable

FRACTIONS = {"params_fraction": "params", "mes_fraction": "mes"}


@dataclass
class Budget:
    """At most ``macs`` MACs (the evolution's candidates also at least ``(1 - macs_tolerance) * macs``), at most
    ``params`` parameters, at most ``latency_ms`` milliseconds per batch of ``latency.batch_size`` on this machine,
    a Mobile Efficiency Score ``mes`` at least. Unset (``None``) ones do not apply; a search needs one.

    ``params_fraction`` and ``mes_fraction`` set ``params`` and ``mes`` relative to the space: the fraction of the
    way from the smallest network's figure (0) to the largest network's (1), so 1 admits the largest network and
    0 only networks as small (as efficient) as the smallest; ``Costs.resolve`` turns them into figures."""

    macs: float | None = None
    macs_tolerance: float = 0.025
    params: float | None = None
    latency_ms: float | None = None
    mes: float | None = None
    params_fraction: float | None = None
    mes_fraction: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.macs, self.params, self.latency_ms, self.mes, self.params_fraction,
                                           self.mes_fraction))

    @property
    def needs_latency(self) -> bool:
        return self.latency_ms is not None or self.mes is not None or self.mes_fraction is not None

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
        return ", ".join(f"{k}={getattr(self, k)}" for k in ("macs", "params", "latency_ms", "mes", *FRACTIONS)
                         if getattr(self, k) is not None)


@dataclass
class MobileEfficiency:
    """The Mobile Efficiency Score's constants (see the module docstring); ``latency_unit_ms: auto`` is MobileNetV2's
    latency on this machine, which ``Costs`` measures before it scores."""

    score: float = 100.0
    params_unit: float = 3e6
    latency_unit_ms: float | Literal["auto"] = "auto"
    alpha_params: float = 0.5
    alpha_latency: float = 0.5

    def __call__(self, params: float, latency_ms: float) -> float:
        if self.latency_unit_ms == "auto":
            raise ValueError("latency_unit_ms: auto is MobileNetV2's latency on this machine; measure it first "
                             "(search.costs.Costs does)")
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
    """The cost of a sub-network of ``supernet``: latency from ``table`` (``None``: not measured), MES by ``mes``, its
    ``latency_unit_ms: auto`` measured on ``table``'s machine (and printed)."""

    def __init__(self, supernet: Supernet, table: LatencyTable | None, mes: MobileEfficiency) -> None:
        self.net, self.table, self.mes = supernet, table, mes
        if table is not None and mes.latency_unit_ms == "auto":
            self.mes = replace(mes, latency_unit_ms=table.reference_ms())
            shape = "x".join(map(str, supernet.input_shape))
            print(f"MES latency unit: {self.mes.latency_unit_ms:.3f} ms, MobileNetV2 (timm mobilenetv2_100) at {shape}, "
                  f"batch {table.batch_size}, {table.signature['threads']} thread(s) on {table.signature['processor']}",
                  flush=True)

    def __call__(self, config: Any, *, measure: bool = True) -> Cost:
        """The cost of ``config``; without ``measure`` only what is counted (MACs, parameters), which is quick."""
        macs, params = self.net.macs_params(config)
        if not measure or self.table is None:
            return Cost(macs, params)
        latency = self.table.latency_ms(config)
        return Cost(macs, params, latency, self.mes(params, latency))

    def resolve(self, budget: Budget) -> Budget:
        """``budget`` with its fractions of the space (``params_fraction``, ``mes_fraction``) turned into figures
        between the smallest and the largest network's, each printed; a ValueError for a fraction outside [0, 1] or
        given beside its figure."""
        given = {name: getattr(budget, name) for name in FRACTIONS if getattr(budget, name) is not None}
        if not given:
            return budget
        measure = "mes_fraction" in given
        small = self(self.net.extreme_subnet(largest=False), measure=measure)
        large = self(self.net.extreme_subnet(largest=True), measure=measure)
        figures = {}
        for name, fraction in given.items():
            key = FRACTIONS[name]
            if not 0 <= fraction <= 1:
                raise ValueError(f"budget.{name}={fraction} must lie in [0, 1] (0: the smallest network's {key}, 1: the "
                                 "largest's)")
            if getattr(budget, key) is not None:
                raise ValueError(f"budget.{name} and budget.{key} both given: set one")
            low, high = getattr(small, key), getattr(large, key)
            if low is None:
                raise ValueError(f"budget.{name} needs latency.measure: true")
            figures[key] = low + fraction * (high - low)
            bound = "at most" if key == "params" else "at least"
            print(f"budget {name}={fraction}: {key} {bound} {figures[key]:.6g} (the smallest network's {low:.6g}, the "
                  f"largest's {high:.6g})", flush=True)
        return replace(budget, params_fraction=None, mes_fraction=None, **figures)

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
                                                    f", {small.latency_ms:.3f} ms on this machine, MES {small.mes:.2f} "
                                                    f"(latency unit {self.mes.latency_unit_ms:.3f} ms)"))
        if window and budget.macs is not None:
            large = self(self.net.extreme_subnet(largest=True), measure=False)
            if large.macs < budget.macs_floor:
                raise ValueError(f"MACs budget {budget.macs:.4g}: candidates must have at least {budget.macs_floor:.4g} "
                                 f"MACs, but the largest network has {large.macs}")
