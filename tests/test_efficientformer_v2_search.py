"""EfficientFormerV2's fine-grained joint search: an extracted sub-network equals the masked super-network running it
(and its analytical MACs and parameter counts the flop counter's and its numel), genes and reductions stay in the
space, the sandwich step sums the four networks' losses into gradients of the shared weights with deterministic
draws, the MES-guided pruning on a tiny super-network trained through the CLI ends within its budget and writes its
CSV, plot and a network the CLI fine-tunes, evolution searches the same space, either's found network gives the
super-network's logits, and bad input is refused clearly."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from backbones import create_backbone
from backbones.base import SubnetPasses
from backbones.efficientformer_v2 import EfficientFormerV2
from backbones.efficientformer_v2_supernet import EfficientFormerV2Supernet
from datamodules.synthetic import shape_image
from tasks.classification import ClassificationModule
from tasks.classification import main as classification_main
from search.costs import MobileEfficiency
from search.latency import LatencyTable
from search.network import Fitness
from search.run import main as search_main

from test_search import check_found_network
from test_search_costs import fake_time

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fake_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency tables time nothing (``fake_time``): searches are deterministic and quick."""
    monkeypatch.setattr(LatencyTable, "_time", fake_time())

TINY = {"img_size": 32, "embed_dims": (32, 32, 48, 64), "min_embed_dims": (16, 16, 32, 48), "depths": (2, 2, 2, 2),
        "attention_blocks": 1, "mlp_ratio_choices": (4, 2)}
QUIET = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.logger=false"]


@pytest.fixture(scope="module")
def supernet() -> EfficientFormerV2Supernet:
    torch.manual_seed(0)
    net = create_backbone("efficientformerv2_supernet_s", **TINY)
    with torch.no_grad():  # statistics and scales far from their initial values, so slicing errors would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "attention_biases")):
                p.normal_()
    return net.eval()


def test_extracted_subnetwork_equals_the_masked_supernetwork(supernet: EfficientFormerV2Supernet) -> None:
    x = torch.randn(2, 3, 32, 64)
    drawn = supernet.sample_subnet(torch.Generator().manual_seed(3)).configs
    assert any(not all(k) for c in drawn for k in c["keep"])  # dropped blocks among the draws
    for config in drawn:
        supernet.set_subnet(config)
        net = supernet.extract(config).eval()
        assert type(net) is EfficientFormerV2 and [len(s.blocks) for s in net.stages] == [sum(k) for k in config["keep"]]
        with torch.no_grad():
            for mine, theirs in zip(supernet(x), net(x)):
                width = theirs.shape[1]
                assert (mine[:, :width] - theirs).abs().max() <= 1e-5
                assert not mine[:, width:].any()  # inactive channels stay zero
            pooled, ref = supernet.forward_pooled(x), net.forward_pooled(x)
            assert (pooled[:, : ref.shape[1]] - ref).abs().max() <= 1e-5
        assert supernet.params(config) == sum(p.numel() for p in net.parameters())
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            net(torch.randn(1, 3, 32, 32))
        assert supernet.macs_params(config) == (counter.get_total_flops() // 2, supernet.params(config))
    supernet.set_subnet(None)


def test_genes_and_reductions_stay_in_the_space(supernet: EfficientFormerV2Supernet) -> None:
    names = [name for name, _ in supernet.search_space()]
    assert names[:4] == [f"embed_dims[{s}]" for s in range(4)] and "keep[0][1]" in names and "keep[3][1]" not in names
    largest, smallest = supernet.extreme_subnet(largest=True), supernet.extreme_subnet(largest=False)
    assert largest == supernet.space.extreme(largest=True) and smallest == supernet.space.extreme(largest=False)
    for config in (largest, smallest, *supernet.sample_subnet(torch.Generator().manual_seed(3)).configs):
        assert supernet.subnet(supernet.subnet_genes(config)) == config
    moves = supernet.reductions(largest)
    assert {m.action.split()[0] for m in moves} == {"narrow", "drop", "ratio"} and not supernet.reductions(smallest)
    for move in moves:  # one step smaller, in the space
        assert supernet.macs_params(move.config)[1] < supernet.macs_params(largest)[1]
        supernet.subnet_genes(move.config)
    keys = [part.key for part in supernet.latency_parts(largest, batch_size=1)]
    assert keys[0] == "stem:32" and len(keys) == 1 + 3 + sum(sum(k) for k in largest["keep"])


def test_published_s0_lies_in_the_s_space() -> None:
    with torch.device("meta"):
        space = create_backbone("efficientformerv2_supernet_s")
        s0 = create_backbone("efficientformerv2_s0", distilled=False)
    keep = [[True, True, False, False], [True, True, False, False], [True] * 4 + [False] * 6 + [True] * 2,
            [True] * 2 + [False] * 4 + [True] * 2]
    ratios = [[4.0] * 4, [4.0] * 4, [4, 3, 3, 3, 2, 2, 2, 2, 2, 2, 4, 4], [4, 3, 2, 2, 2, 2, 3, 4]]
    config = {"embed_dims": [32, 48, 96, 176], "mlp_ratios": ratios, "keep": keep}
    assert space.params(config) == sum(p.numel() for p in s0.parameters())


def test_sandwich_step_sums_four_networks_into_shared_gradients_with_deterministic_draws() -> None:
    torch.manual_seed(0)
    module = ClassificationModule(backbone="efficientformerv2_supernet_s", backbone_kwargs=TINY, num_classes=3,
                                  pool="native", label_smoothing=0.0)
    net = module.backbone
    draw = lambda seed: net.sample_subnet(torch.Generator().manual_seed(seed))  # noqa: E731
    passes = draw(5)
    assert passes == draw(5) and passes != draw(6) and passes.distill
    assert passes.configs[:2] == (net.space.extreme(largest=True), net.space.extreme(largest=False))
    assert len(passes.configs) == 4
    batch = {"input": torch.randn(4, 3, 32, 32), "target": torch.tensor([0, 1, 2, 0])}
    net.set_subnet(passes)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert net.training_passes() == passes and net.active == passes.configs[0]
    with torch.no_grad():  # the same sum by hand: the largest on the labels, the rest on its predictions
        net.set_subnet(passes.configs[0])
        logits = module(batch["input"])
        expected = module.compute_loss(logits, batch["target"])
        for config in passes.configs[1:]:
            net.set_subnet(config)
            expected += module.compute_loss(module(batch["input"]), logits.softmax(-1))
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    shared = net.stem.conv1.conv.weight.grad  # every network uses the first 8 stem channels
    assert shared is not None and shared[:8].abs().sum() > 0
    stats = net.norm.running_mean.clone()  # only the largest network moves the BatchNorm statistics
    net.set_subnet(passes.configs[1])
    module(batch["input"])
    assert torch.equal(net.norm.running_mean, stats)
    net.set_subnet(None)
    assert net.training_passes() is None
    module(batch["input"])
    assert not torch.equal(net.norm.running_mean, stats)


@pytest.fixture(scope="module")
def supernet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny super-network fitted for 2 epochs of the sandwich rule on 32² shapes (3 classes, 12 training images
    each, 4 of them held out for the search)."""
    root, out = tmp_path_factory.mktemp("shapes32"), tmp_path_factory.mktemp("efv2supernet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the function-scoped one_thread
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 2)):
        for kind in ("circle", "square", "triangle"):
            (root / split / kind).mkdir(parents=True)
            for i in range(count):
                shape_image(rng, kind, 32).save(root / split / kind / f"{i}.png")
    classification_main([
        "fit", "--seed_everything=0", "--model.backbone=efficientformerv2_supernet_s",
        f"--model.backbone_kwargs={json.dumps(TINY)}", "--model.pool=native", f"--data.root={root}",
        "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0", "--data.search_holdout_per_class=4",
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={out}", *QUIET,
    ])
    torch.set_num_threads(threads)
    yield out / "checkpoints" / "last.ckpt"


def search_args(ckpt: Path, out: Path, *budget: str) -> list[str]:
    return [f"--ckpt_path={ckpt}", "--supernet=efficientformerv2_supernet_s", "--strategy=mes_pruning",
            f"--output_dir={out}", "--data.search_holdout_per_class=4", "--data.calibration_batches=1",
            "--latency.repeats=1", "--latency.warmup=0", *budget]


@pytest.mark.slow
def test_mes_search_ends_within_the_budget_and_its_network_runs_through_the_cli(supernet_ckpt: Path, tmp_path: Path) -> None:
    with torch.device("meta"):
        largest = create_backbone("efficientformerv2_supernet_s", **TINY).params(
            create_backbone("efficientformerv2_supernet_s", **TINY).space.extreme(largest=True))
    budget = largest - 100_000  # a few actions away
    out = tmp_path / "search"
    found = search_main(search_args(supernet_ckpt, out, f"--budget.params={budget}"))
    with open(out / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    path = [r for r in rows if r["chosen"] == "1"]
    assert path[0]["action"] == "largest" and int(path[0]["params"]) == largest and len(path) >= 2
    assert int(path[-1]["params"]) <= budget and all(int(r["params"]) > budget for r in path[:-1])
    assert len(rows) > len(path) and {int(r["step"]) for r in rows} == set(range(len(path)))
    table = json.loads((out / "latency_table.json").read_text())["entries"]
    unit = table["reference:mobilenetv2_100:3x32x32"]  # MobileNetV2's latency: the MES unit
    for r in rows:  # MES from the row's own parameters and latency
        expected = MobileEfficiency(latency_unit_ms=unit)(int(r["params"]), float(r["latency_ms"]))
        assert float(r["mes"]) == pytest.approx(expected, rel=1e-3)
    assert all(float(b["mes"]) > float(a["mes"]) for a, b in zip(path, path[1:]))
    with Image.open(out / "pareto.png") as plot:
        assert plot.format == "PNG" and plot.width > plot.height > 100

    recipe = yaml.safe_load(found.read_text())
    arch = json.loads(path[-1]["architecture"])
    assert {k: recipe["model"]["backbone_kwargs"][k] for k in arch} == arch
    assert recipe["data"]["search_holdout_per_class"] == 0 and Path(recipe["model"]["pretrained"]).is_file()
    classification_main(["fit", f"--config={found}", "--data.num_workers=0", "--trainer.fast_dev_run=true",
                         f"--trainer.default_root_dir={tmp_path / 'runs'}", *QUIET])


@pytest.mark.slow
def test_a_killed_mes_search_resumes_to_the_same_network(supernet_ckpt: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--budget.mes_fraction=0.74"]  # two steps
    search_main(search_args(supernet_ckpt, tmp_path / "whole", *args))
    rows = (tmp_path / "whole" / "candidates.csv").read_text().splitlines()
    steps = max(int(r.split(",")[0]) for r in rows[1:])
    assert steps >= 2
    first_two = 1 + sum(1 for r in rows[1:] if r.split(",")[0] == "1")  # the largest network and step 1's
    score, calls, die_at = Fitness.__call__, [], first_two + 5

    def scored(self: Fitness, config: object) -> float:  # killed half-way through the second step's networks
        calls.append(config)
        if len(calls) == die_at:
            raise KeyboardInterrupt
        return score(self, config)

    monkeypatch.setattr(Fitness, "__call__", scored)
    with pytest.raises(KeyboardInterrupt):
        search_main(search_args(supernet_ckpt, tmp_path / "killed", *args))
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["step"] == 1
    calls.clear()
    die_at = -1
    found = search_main(search_args(supernet_ckpt, tmp_path / "killed", *args))
    assert len(calls) == len(rows) - 1 - first_two  # resumed after step 1: only the later networks scored
    assert (tmp_path / "killed" / "candidates.csv").read_text().splitlines() == rows
    assert yaml.safe_load(found.read_text())["model"] == {
        **yaml.safe_load((tmp_path / "whole" / "found.yaml").read_text())["model"], "pretrained": str(found.with_suffix(".pth"))}
    with pytest.raises(ValueError, match=r"state.json is a search with other settings \(budget\)"):
        search_main(search_args(supernet_ckpt, tmp_path / "killed", "--budget.mes_fraction=0.5"))


def test_bad_budgets_spaces_and_configs_are_refused(supernet_ckpt: Path, supernet: EfficientFormerV2Supernet,
                                                    tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"budget params=1000.0 is out of reach: the smallest network .* has \d+ parameters"):
        search_main(search_args(supernet_ckpt, tmp_path, "--budget.params=1000"))
    with pytest.raises(ValueError, match="needs a budget: budget.mes"):
        search_main(search_args(supernet_ckpt, tmp_path))
    with pytest.raises(ValueError, match="holds backbone 'efficientformerv2_supernet_s', but this search is over the "
                                         "super-network 'efficientformerv2_supernet_l'"):
        search_main(search_args(supernet_ckpt, tmp_path, "--budget.mes=100") + ["--supernet=efficientformerv2_supernet_l"])
    with pytest.raises(ValueError, match=r"MACs budget 5e\+05 is below the smallest reachable MACs \d+"):
        search_main(search_args(supernet_ckpt, tmp_path, "--budget.macs=5e5", "--strategy=evolution"))
    with pytest.raises(ValueError, match="stage 1: widths from embed_dims 48 down to min_embed_dims 40 must go in steps of 16"):
        create_backbone("efficientformerv2_supernet_s", **{**TINY, "embed_dims": (32, 48, 48, 64), "min_embed_dims": (16, 40, 32, 48)})
    config = supernet.space.extreme(largest=True)
    config["mlp_ratios"][2][1] = 3
    with pytest.raises(ValueError, match=r"mlp_ratios\[2\]\[1\] = 3 is outside the search space: allowed values \(4.0, 2.0\)"):
        supernet.extract(config)
    config = supernet.space.extreme(largest=True)
    config["keep"][3][1] = False  # an attention block
    with pytest.raises(ValueError, match=r"keep\[3\]\[1\] = False .* cannot be dropped"):
        supernet.set_subnet(config)
    assert isinstance(supernet.sample_subnet(torch.Generator()), SubnetPasses)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["evolution", "mes_pruning"])
def test_either_strategy_finds_a_network_with_the_supernetworks_logits(supernet_ckpt: Path, tmp_path: Path,
                                                                       strategy: str) -> None:
    out = tmp_path / strategy
    args = [f"--ckpt_path={supernet_ckpt}", "--supernet=efficientformerv2_supernet_s", f"--strategy={strategy}",
            f"--output_dir={out}", "--data.search_holdout_per_class=4", "--latency.repeats=1", "--latency.warmup=0"]
    if strategy == "evolution":  # a MACs window of [1.4, 2.0] M
        args += ["--budget.macs=2e6", "--budget.macs_tolerance=0.3", "--evolution.population=4",
                 "--evolution.generations=1", "--evolution.parents=2", "--evolution.mutations=2",
                 "--evolution.crossovers=2"]
    else:
        args += ["--budget.macs=2.5e6"]  # a MACs budget for the pruning too
    search_main(args)
    found = check_found_network(out, supernet_ckpt, "efficientformerv2_supernet_s", 32)
    macs = int(found["macs"])
    assert (1.4e6 <= macs <= 2e6) if strategy == "evolution" else macs <= 2.5e6
