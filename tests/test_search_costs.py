"""A search's costs mean the same on every machine: the MES latency unit is MobileNetV2's latency where the search
runs (so a machine twice as slow scores the same MES), budgets relative to the space resolve between its smallest and
largest networks, a latency table timed on another processor is timed again (with a line saying so) while one from
this machine is reused, and ``pareto.png`` has its colour key, the budget as a line and the found network. Latency is
faked (``fake_time``: a fixed function of the part) except in the one test that times for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backbones import create_backbone
from search.costs import Budget, Costs, MobileEfficiency
from search.latency import LatencyTable
from search.results import Candidate, pareto_figure
from search.run import build_parser

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"img_size": 32, "embed_dims": (32, 32, 48, 64), "min_embed_dims": (16, 16, 32, 48), "depths": (2, 2, 2, 2),
        "attention_blocks": 1, "mlp_ratio_choices": (4, 2)}
CPU_CONFIG = Path(__file__).parents[1] / "configs" / "search" / "efficientformerv2_cpu.yaml"


def fake_time(slowdown: float = 1.0):
    """A ``LatencyTable._time`` that times nothing: milliseconds from the part's parameters and input size, times
    ``slowdown`` (a slower machine)."""

    def time(table: LatencyTable, module: torch.nn.Module, inputs: tuple) -> float:
        return slowdown * (0.05 + sum(p.numel() for p in module.parameters()) * 1e-5 + inputs[0].numel() * 1e-5)

    return time


@pytest.fixture(scope="module")
def supernet():
    return create_backbone("efficientformerv2_supernet_s", **TINY).eval()


def test_mes_is_in_mobilenetv2_units_so_a_slower_machine_scores_the_same(supernet, tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    config = supernet.sample_subnet(torch.Generator().manual_seed(1)).configs[2]
    scores = []
    for slowdown in (1.0, 2.5):
        monkeypatch.setattr(LatencyTable, "_time", fake_time(slowdown))
        table = LatencyTable(supernet, tmp_path / f"table{slowdown}.json")
        costs = Costs(supernet, table, MobileEfficiency())
        cost = costs(config)
        unit = costs.mes.latency_unit_ms
        assert unit == table.reference_ms() and unit > 0
        assert cost.mes == pytest.approx(100 * (cost.params / 3e6) ** -0.5 * (cost.latency_ms / unit) ** -0.5)
        scores.append(cost.mes)
        # the same network in milliseconds (latency_unit_ms: 1) scores by this machine's speed
        assert Costs(supernet, table, MobileEfficiency(latency_unit_ms=1.0))(config).mes != pytest.approx(cost.mes)
    assert scores[0] == pytest.approx(scores[1])
    capsys.readouterr()
    unit = Costs(supernet, LatencyTable(supernet, tmp_path / "table1.0.json"), MobileEfficiency()).mes.latency_unit_ms
    assert (f"MES latency unit: {unit:.3f} ms, MobileNetV2 (timm mobilenetv2_100) at 3x32x32, batch 1, 1 thread(s) "
            "on ") in capsys.readouterr().out


def test_budgets_relative_to_the_space_resolve_between_its_extremes(supernet, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(LatencyTable, "_time", fake_time())
    costs = Costs(supernet, LatencyTable(supernet, tmp_path / "table.json"), MobileEfficiency())
    small, large = (costs(supernet.extreme_subnet(largest=flag)) for flag in (False, True))
    resolved = costs.resolve(Budget(mes_fraction=0.25, params_fraction=0.5, macs=1e9))
    assert resolved.mes == pytest.approx(small.mes + 0.25 * (large.mes - small.mes))
    assert resolved.params == pytest.approx((small.params + large.params) / 2)
    assert resolved.macs == 1e9 and resolved.mes_fraction is None and resolved.params_fraction is None
    assert costs.resolve(Budget(mes_fraction=1.0)).admits(large) and not costs.resolve(Budget(mes_fraction=0.9)).admits(large)
    costs.check_reachable(costs.resolve(Budget(mes_fraction=0.0)), window=False)  # the smallest network meets it
    with pytest.raises(ValueError, match=r"budget.mes_fraction=1.5 must lie in \[0, 1\]"):
        costs.resolve(Budget(mes_fraction=1.5))
    with pytest.raises(ValueError, match="budget.params_fraction and budget.params both given"):
        costs.resolve(Budget(params_fraction=0.5, params=1e6))
    with pytest.raises(ValueError, match=r"budget mes=10000.0 is out of reach: .* MES \d+\.\d\d"):
        costs.check_reachable(Budget(mes=1e4), window=False)


def test_a_latency_table_from_another_machine_is_timed_again(supernet, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(LatencyTable, "_time", fake_time())
    config = supernet.extreme_subnet(largest=True)
    path = tmp_path / "latency_table.json"
    here = LatencyTable(supernet, path)
    expected = here.latency_ms(config)
    assert json.loads(path.read_text())["signature"]["processor"] == here.signature["processor"]
    saved = json.loads(path.read_text())
    saved["entries"] = {k: 1000.0 for k in saved["entries"]}  # a fake table: every part 1 s
    path.write_text(json.dumps(saved))
    assert LatencyTable(supernet, path).latency_ms(config) >= 1000.0  # this machine's own table is reused
    saved["signature"] = {**saved["signature"], "processor": "AMD EPYC 7B13", "threads": 64}
    path.write_text(json.dumps(saved))
    capsys.readouterr()
    elsewhere = LatencyTable(supernet, path)
    out = capsys.readouterr().out
    assert f"latency table {path} was timed elsewhere (processor 'AMD EPYC 7B13' there" in out
    assert "threads 64 there, 1 here" in out and "timing every part again" in out
    assert elsewhere.latency_ms(config) == pytest.approx(expected)
    assert json.loads(path.read_text())["signature"] == here.signature  # and saved as this machine's


def test_the_pareto_figure_has_a_colour_key_the_budget_and_the_found_network() -> None:
    candidates = [Candidate(step, {"n": i}, 0.5 + 0.01 * i, 10**6 * (10 - i), 10**5 * (10 - i), 1.0 + 0.1 * (10 - i),
                            40.0 + 5 * i, chosen=i % 3 == 0) for i, step in enumerate([0, 1, 1, 2, 2, 3, 3, 4])]
    found = candidates[-2]
    fig = pareto_figure(candidates, found, "step", Budget(mes=62.0), MobileEfficiency(latency_unit_ms=2.5))
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "step"
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert "Mobile Efficiency Score" in panels[0].get_xlabel() and "2.5 ms" in panels[0].get_xlabel()  # budget first
    assert [ax.get_xlabel() for ax in panels[1:]] == ["MACs (M)", "parameters (M)", "latency (ms on the searching machine)"]
    budget_lines = [line for ax in panels for line in ax.lines if line.get_label().startswith("budget")]
    assert len(budget_lines) == 1 and list(budget_lines[0].get_xdata()) == [62.0, 62.0]
    assert budget_lines[0].get_label() == "budget: at least 62"
    stars = [line for line in panels[2].lines if line.get_label() == "found"]
    assert list(stars[0].get_xdata()) == [found.params / 1e6] and list(stars[0].get_ydata()) == [found.top1]


def test_the_shipped_cpu_budget_is_reachable_when_timed_for_real(tmp_path: Path) -> None:
    """The EfficientFormerV2 CPU demo's budget, timed on this machine (any x86 host): resolved between the space's
    extremes and met by its smallest network; MobileNetV2 timed as the unit."""
    parser = build_parser()
    cfg = parser.instantiate(parser.parse_args([f"--config={CPU_CONFIG}", "--ckpt_path=x.ckpt"]))
    net = create_backbone(cfg.supernet, **TINY).eval()
    table = LatencyTable(net, tmp_path / "table.json", repeats=2, warmup=1)
    assert cfg.mes.latency_unit_ms == "auto"
    costs = Costs(net, table, cfg.mes)
    assert 0 < costs.mes.latency_unit_ms < 1000
    budget = costs.resolve(cfg.budget)
    costs.check_reachable(budget, window=False)
    assert budget.admits(costs(net.extreme_subnet(largest=False)))
