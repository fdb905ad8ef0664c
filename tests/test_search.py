"""The search over a ViT-ResNAS super-network: a tiny one trained through the CLI (its hold-out left out) is searched
by evolution within a MACs budget, resumes after its last generation, plots its Pareto front, refuses bad budgets and
checkpoints, and its found network runs through the CLI; MES pruning searches the same space; either's found network
gives the super-network's logits for the sub-network it names; the hold-out the search scores on is exactly what
training left out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from backbones import create_backbone
from datamodules.classification import ClassificationDataModule, split_holdout
from datamodules.synthetic import shape_image
from search.holdout import holdout_dataset
from search.network import load_supernet
from search.run import build_parser
from search.run import main as search_main
from tasks.classification import ClassificationModule
from tasks.classification import main as classification_main

from test_vit_resnas_supernet import TINY

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs", "search").glob("*.yaml"))
QUIET = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.logger=false"]


@pytest.fixture(scope="module")
def supernet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny super-network fitted for a few steps on 56² shapes (3 classes, 12 training images each, 4 of them held
    out for the search)."""
    root, out = tmp_path_factory.mktemp("shapes56"), tmp_path_factory.mktemp("supernet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for kind in ("circle", "square", "triangle"):
            (root / split / kind).mkdir(parents=True)
            for i in range(count):
                shape_image(rng, kind, 56).save(root / split / kind / f"{i}.png")
    kwargs = json.dumps({**TINY, "num_warmup_epochs": 1})
    classification_main([
        "fit", "--seed_everything=0", "--model.backbone=vit_resnas_supernet_tiny", f"--model.backbone_kwargs={kwargs}",
        "--model.pool=avg", f"--data.root={root}", "--data.image_size=56", "--data.batch_size=8", "--data.num_workers=0",
        "--data.search_holdout_per_class=4",
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={out}", *QUIET,
    ])
    return root, out / "checkpoints" / "last.ckpt"


def search_args(ckpt: Path, out: Path, **budget: float) -> list[str]:
    args = [f"--ckpt_path={ckpt}", "--supernet=vit_resnas_supernet_tiny", f"--output_dir={out}",
            "--evolution.population=6", "--evolution.generations=2", "--evolution.parents=3",
            "--evolution.mutations=3", "--evolution.crossovers=3", "--data.search_holdout_per_class=4",
            "--latency.repeats=1", "--latency.warmup=0"]
    return args + [f"--budget.{k}={v}" for k, v in budget.items()]


def check_found_network(out: Path, ckpt: Path, supernet: str, size: int) -> dict[str, str]:
    """The ``found.yaml`` a search wrote in ``out`` builds (``ClassificationModule``, weights from ``found.pth``) a
    network whose logits are the super-network's running the found sub-network (the last chosen candidate's
    ``subnet``); returns that candidate's row."""
    with open(out / "candidates.csv") as f:
        found = [r for r in csv.DictReader(f) if r["chosen"] == "1"][-1]
    recipe = yaml.safe_load((out / "found.yaml").read_text())
    assert recipe["data"]["search_holdout_per_class"] == 0  # the found network trains on every training image
    model = ClassificationModule(**recipe["model"], num_classes=3).eval()
    checkpoint = load_supernet(ckpt, supernet)
    checkpoint.supernet.set_subnet(json.loads(found["subnet"]))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (model(x) - checkpoint.network(x)).abs().max() <= 1e-4
    assert recipe["model"]["backbone"] == checkpoint.supernet.subnet_preset
    assert {k: recipe["model"]["backbone_kwargs"][k] for k in json.loads(found["architecture"])} == json.loads(found["architecture"])
    return found


@pytest.mark.slow
def test_search_keeps_the_budget_resumes_and_its_network_runs_through_the_cli(supernet_ckpt, tmp_path: Path) -> None:
    root, ckpt = supernet_ckpt
    out = tmp_path / "search"
    found = search_main(search_args(ckpt, out, macs=1.65e6))
    with open(out / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 + 2 * 6 and {r["generation"] for r in rows} == {"0", "1", "2"}
    assert all(0.975 * 1.65e6 <= int(r["macs"]) <= 1.65e6 and float(r["latency_ms"]) > 0 for r in rows)
    assert float(rows[0]["top1"]) == max(float(r["top1"]) for r in rows)
    assert [r["chosen"] for r in rows] == ["1"] + ["0"] * 17  # the best is the one found
    assert {r["action"] for r in rows} == {"random", "mutation", "crossover"}
    check_found_network(out, ckpt, "vit_resnas_supernet_tiny", 56)
    state = json.loads((out / "state.json").read_text())
    assert state["generation"] == 2 and len(state["records"]) == 18
    with Image.open(out / "pareto.png") as plot:  # top-1 against MACs and against latency, side by side
        assert plot.format == "PNG" and plot.width > plot.height > 100

    # a third generation resumes after the second: the 18 candidates are not evaluated again
    search_main(search_args(ckpt, out, macs=1.65e6)[:4] + ["--evolution.generations=3"] + search_args(ckpt, out, macs=1.65e6)[5:])
    assert len(json.loads((out / "state.json").read_text())["records"]) == 24

    recipe = yaml.safe_load(found.read_text())
    assert recipe["model"]["backbone"] == "vit_resnas" and Path(recipe["model"]["pretrained"]).is_file()
    assert recipe["data"]["search_holdout_per_class"] == 0  # the found network trains on every training image
    common = [f"--config={found}", "--data.num_workers=0", f"--trainer.default_root_dir={tmp_path / 'runs'}", *QUIET]
    classification_main(["fit", *common, "--trainer.fast_dev_run=true"])


@pytest.mark.slow
def test_mes_pruning_searches_the_same_space(supernet_ckpt, tmp_path: Path) -> None:
    _, ckpt = supernet_ckpt
    with torch.device("meta"):
        space = create_backbone("vit_resnas_supernet_tiny", **TINY)
    largest = space.macs_params(space.extreme_subnet(largest=True))[1]
    out = tmp_path / "mes"
    search_main([f"--ckpt_path={ckpt}", "--supernet=vit_resnas_supernet_tiny", "--strategy=mes_pruning",
                 f"--output_dir={out}", "--data.search_holdout_per_class=4", "--latency.repeats=1", "--latency.warmup=0",
                 f"--budget.params={largest - 6000}"])
    with open(out / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    path = [r for r in rows if r["chosen"] == "1"]
    assert path[0]["action"] == "largest" and len(path) >= 2 and int(path[-1]["params"]) <= largest - 6000
    assert all(float(b["mes"]) > float(a["mes"]) for a, b in zip(path, path[1:]))
    assert {r["action"].split()[0] for r in rows} >= {"narrow", "skip", "heads", "MLP"}
    assert check_found_network(out, ckpt, "vit_resnas_supernet_tiny", 56) == path[-1]


def test_bad_budgets_and_checkpoints_are_refused(supernet_ckpt, tmp_path: Path) -> None:
    _, ckpt = supernet_ckpt
    with pytest.raises(ValueError, match=r"below the smallest reachable MACs \d+ "):
        search_main(search_args(ckpt, tmp_path, macs=1e6))
    other = search_args(ckpt, tmp_path, macs=1.65e6)
    other[1] = "--supernet=vit_resnas_supernet_small"
    with pytest.raises(ValueError, match="'vit_resnas_supernet_tiny'.*'vit_resnas_supernet_small'"):
        search_main(other)
    with pytest.raises(ValueError, match="needs a budget: budget.mes"):
        search_main(search_args(ckpt, tmp_path))
    with pytest.raises(ValueError, match="need latency.measure: true"):
        search_main(search_args(ckpt, tmp_path, mes=100) + ["--latency.measure=false"])


def test_holdout_is_a_fixed_part_of_the_training_list() -> None:
    samples = [(Path(f"c{c}/{i}.png"), c) for c in range(3) for i in range(10)]
    train, holdout = split_holdout(samples, 4)
    assert len(holdout) == 12 and not set(train) & set(holdout) and len(train) == 18
    assert split_holdout(list(reversed(samples)), 4) == (train, holdout)
    assert set(split_holdout(samples, 2)[1]) < set(holdout)  # a smaller hold-out is part of a larger one


def test_training_leaves_out_exactly_the_search_holdout(supernet_ckpt) -> None:
    root, _ = supernet_ckpt
    data = ClassificationDataModule(str(root), search_holdout_per_class=4, num_workers=0)
    data.setup("fit")
    trained = set(data.datasets["train"].samples)
    holdout = data.search_holdout(4)
    everything = set(ClassificationDataModule(str(root), num_workers=0).training_samples())
    assert len(trained) == 3 * 8 and len(holdout) == 3 * 4 and not trained & set(holdout)
    assert trained | set(holdout) == everything
    # the search reads the hold-out through the checkpoint's data settings: the same files
    saved = torch.load(supernet_ckpt[1], map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    saved = {k: v for k, v in saved.items() if not k.startswith("_")}
    assert saved["search_holdout_per_class"] == 4
    assert holdout_dataset(saved, 4).samples == holdout
    with pytest.raises(ValueError, match="search_holdout_per_class must be 0 or more, got -1"):
        ClassificationDataModule(str(root), search_holdout_per_class=-1)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_search_configs_parse(config: Path) -> None:
    cfg = build_parser().parse_args([f"--config={config}", "--ckpt_path=x.ckpt"])
    if cfg.strategy == "mes_pruning":  # EfficientFormerV2's search: a Mobile Efficiency Score to reach
        assert cfg.supernet.startswith("efficientformerv2_supernet_") and cfg.mes.latency_unit_ms == "auto"
        assert (cfg.budget.mes or 0) > 0 or 0 < cfg.budget.mes_fraction <= 1
    else:
        assert cfg.supernet.startswith("vit_resnas_supernet_") and cfg.budget.macs > 0
