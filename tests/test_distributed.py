"""Several processes give the numbers one process gives: DDP on CPU (gloo, two processes) against one process,
the training order shared by the ranks, evaluation shards that count every sample once, predictions written once."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn
from torchmetrics import MetricCollection

import datamodules.common as common
from datamodules.common import make_loader
from datamodules.sampling import EpochShuffleSampler, ResumableDataLoader
from tasks.classification import ClassificationModule, main
from engine.distributed import SyncBatchNormWhenDistributed

from cli_runs import TINY_VIT, last_value, read_metrics, run_task, write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=8, val_per_class=5)  # 24 / 15 images


def cli_args(root: Path, out: Path) -> list[str]:
    return [
        "--seed_everything=3", "--model.backbone=vit_tiny_patch16", TINY_VIT, f"--data.root={root}",
        "--data.image_size=32", "--data.num_workers=0", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out}",
        f"--trainer.default_root_dir={out}",
    ]


@pytest.fixture(scope="module")
def ddp_fit(shapes: Path, tmp_path_factory: pytest.TempPathFactory, synthetic_cache: str) -> Path:
    """Two processes, batch 4 each; ``sync_batchnorm`` must not break CPU processes."""
    out = tmp_path_factory.mktemp("ddp")
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.sync_batchnorm=true"]
    run_task("classification", ["fit", *cli_args(shapes, out), "--trainer.max_epochs=2", "--data.batch_size=4", *ddp],
             cache=synthetic_cache)
    return out


@pytest.mark.distributed
def test_ddp_training_matches_one_process_with_the_global_batch(ddp_fit: Path, shapes: Path, tmp_path: Path) -> None:
    """Ranks split each global batch of the one-process run, so 2 x 4 trains like 1 x 8 (up to float order)."""
    main(["fit", *cli_args(shapes, tmp_path), "--trainer.max_epochs=2", "--data.batch_size=8", "--trainer.devices=1"])
    one, two = read_metrics(tmp_path), read_metrics(ddp_fit)
    for key in ("train/loss_epoch", "val/loss"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-5)
    for key in ("train/top1", "val/top1"):
        assert [r[key] for r in two if key in r] == [r[key] for r in one if key in r]


@pytest.mark.distributed
def test_ddp_validation_counts_every_sample_once(ddp_fit: Path, shapes: Path, tmp_path: Path) -> None:
    """The same weights validated by one process: equal to the last digit float addition order allows; with the
    padded DistributedSampler the 15 images would be 16 and the loss a mean of per-rank means."""
    main(["validate", *cli_args(shapes, tmp_path), "--data.batch_size=4", f"--ckpt_path={ddp_fit / 'checkpoints' / 'last.ckpt'}"])
    one, two = read_metrics(tmp_path), read_metrics(ddp_fit)
    assert last_value(two, "val/loss") == pytest.approx(last_value(one, "val/loss"), rel=1e-6, abs=0)
    top1 = last_value(two, "val/top1")
    assert top1 == last_value(one, "val/top1") and round(top1 * 15) == pytest.approx(top1 * 15, abs=1e-5)


@pytest.mark.distributed
def test_ddp_predict_writes_each_output_once(ddp_fit: Path, shapes: Path, tmp_path: Path, synthetic_cache: str) -> None:
    out = tmp_path / "preds"
    run_task("classification", [
        "predict", *cli_args(shapes, tmp_path), "--data.batch_size=4", "--trainer.devices=2", "--trainer.strategy=ddp",
        f"--ckpt_path={ddp_fit / 'checkpoints' / 'last.ckpt'}", f"--predictions.output_dir={out}",
    ], cache=synthetic_cache)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in (shapes / "val").rglob("*.png"))
    assert [p.name for p in out.iterdir()] == ["predictions.csv"]  # the per-rank parts are merged and removed


def test_ranks_split_the_one_process_batches() -> None:
    data = range(48)
    one = list(EpochShuffleSampler(data, seed=5))
    ranks = [list(EpochShuffleSampler(data, seed=5, num_replicas=3, rank=r)) for r in range(3)]
    for b in range(4):  # global batch b of 12 = batch b of 4 on each of 3 ranks
        assert sorted(i for r in ranks for i in r[b * 4 : (b + 1) * 4]) == sorted(one[b * 12 : (b + 1) * 12])
    sampler = EpochShuffleSampler(data, seed=5)
    sampler.set_epoch(1)
    assert [e for e, _ in sampler] == [1] * 48 and [i for _, i in sampler] != [i for _, i in one]


def test_resumed_loader_starts_after_the_trained_batches() -> None:
    dataset = [{"input": torch.tensor(float(i)), "index": i} for i in range(20)]
    loader = make_loader(dataset, batch_size=4, num_workers=0, shuffle=True)
    assert isinstance(loader, ResumableDataLoader)
    loader.sampler.set_epoch(2)
    full = [b["index"].tolist() for b in loader]
    loader.resume(epoch=2, batches=3)
    assert [b["index"].tolist() for b in loader] == full[3:]
    assert [b["index"].tolist() for b in loader] == full  # once only


def test_evaluation_shards_are_disjoint_and_unpadded(monkeypatch: pytest.MonkeyPatch) -> None:
    shards = []
    for rank in range(4):
        monkeypatch.setattr(common, "process_group", lambda rank=rank: (rank, 4))
        shards.append([i for b in make_loader(list(range(13)), batch_size=2, num_workers=0, shuffle=False) for i in b.tolist()])
    assert sorted(i for s in shards for i in s) == list(range(13))


def test_sync_batchnorm_only_where_processes_can_share_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert isinstance(SyncBatchNormWhenDistributed().apply(model)[1], nn.BatchNorm2d)  # one process
    from engine.cli import run_cli
    from datamodules.classification import ClassificationDataModule

    args = ["--model.backbone=vit_tiny_patch16", TINY_VIT, "--trainer.sync_batchnorm=true", "--trainer.strategy=ddp",
            "--trainer.devices=1", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    cli = run_cli(ClassificationModule, ClassificationDataModule, args=args, run=False)
    assert isinstance(cli.trainer.strategy._layer_sync, SyncBatchNormWhenDistributed)


def tiny_task_metrics() -> dict[str, tuple[MetricCollection, tuple[torch.Tensor, ...]]]:
    """Each task's validation metrics and one batch of what ``metric_inputs`` feeds them."""
    from engine.volume_metrics import volume_metrics
    from tasks.segmentation import SegmentationModule

    mit = {"embed_dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 4)}
    segmentation = SegmentationModule(backbone="mit_b0", backbone_kwargs=mit, decoder_dim=16, num_classes=4)
    labels = torch.randint(0, 4, (2, 16, 16))
    return {
        "classification": (ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs={"img_size": 32, "depth": 1},
                                                num_classes=7).build_metrics("val"), (torch.randn(10, 7), torch.randint(0, 7, (10,)))),
        "segmentation": (segmentation.build_metrics("val"), (labels, torch.where(labels == 3, 255, torch.randint(0, 4, (2, 16, 16))))),
        "medical": (volume_metrics(3), (torch.randint(0, 3, (2, 8, 8, 8)), torch.randint(0, 3, (2, 8, 8, 8)))),
    }


def test_task_metrics_reduce_over_processes() -> None:
    """``compute`` under DDP reduces the states gathered from every process (list states arrive as one tensor):
    a second process that saw the same samples leaves every mean unchanged."""
    torch.manual_seed(0)
    for task, (metrics, inputs) in tiny_task_metrics().items():
        gathered = metrics.clone()
        for _, metric in gathered.items(keep_base=True):
            metric.dist_sync_fn = lambda t, group=None: [t, t.clone()]
            metric.distributed_available_fn = lambda: True
        metrics.update(*inputs)
        gathered.update(*inputs)
        one, two = metrics.compute(), gathered.compute()
        assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], equal_nan=True) for k in one), task


def segmentation_args(out: Path) -> list[str]:
    return [
        "--config=configs/segformer_b0.yaml", "--seed_everything=3", "--model.decoder_dim=32",
        "--model.backbone_kwargs={embed_dims: [16, 32, 64, 128], depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 4]}",
        "--data.synthetic_size=64", "--data.synthetic_train=16", "--data.synthetic_val=5", "--data.crop_size=[64, 64]",
        "--data.val_batch_size=1", "--data.num_workers=0", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out}",
        f"--trainer.default_root_dir={out}",
    ]


@pytest.mark.distributed
def test_segmentation_ddp_validation_equals_one_process(tmp_path: Path, synthetic_cache: str) -> None:
    """A SegFormer (BatchNorm in the decoder, so ``sync_batchnorm`` is exercised) trained by two processes and
    validated on 5 scenes: its mIoU, accuracies and loss equal one process's (confusion matrices summed)."""
    from tasks.segmentation import main as segmentation_main

    ddp = tmp_path / "ddp"
    run_task("segmentation", [
        "fit", *segmentation_args(ddp), "--data.batch_size=4", "--trainer.max_epochs=1", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.sync_batchnorm=true",
    ], cache=synthetic_cache)
    segmentation_main(["validate", *segmentation_args(tmp_path / "one"), f"--ckpt_path={ddp / 'checkpoints' / 'last.ckpt'}"])
    two, one = read_metrics(ddp)[0], read_metrics(tmp_path / "one")[0]
    val = {k: v for k, v in one.items() if k.startswith("val/") and k in two}
    assert {"val/miou", "val/acc", "val/macc", "val/loss"} <= val.keys()
    assert {k: two[k] for k in val} == pytest.approx(val, rel=1e-6, abs=0)
