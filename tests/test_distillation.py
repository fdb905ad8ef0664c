"""Knowledge distillation: the student moves toward a fixed teacher, the teacher stays frozen and outside our
checkpoints and optimizer, DeiT's distillation head, and a 2-process run with a teacher."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cli_runs import TINY_VIT, read_metrics, run_task, write_shapes

from datamodules.classification import ClassificationDataModule
from engine.distillation import build_teacher, distillation_loss
from tasks.classification import ClassificationModule

TINY = {"img_size": 32, "depth": 1, "embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, val_per_class=4)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed random teacher with confident, varied predictions (a state dict of one of our classifiers)."""
    torch.manual_seed(1)
    teacher = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=3)
    with torch.no_grad():
        teacher.head.fc.weight.mul_(200.0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    return path


def student(teacher_file: Path, **kwargs) -> ClassificationModule:
    options = dict(teacher="vit_tiny_patch16", teacher_kwargs=TINY, teacher_pretrained=str(teacher_file),
                   distillation="soft", distillation_alpha=0.9, distillation_tau=2.0, lr=2e-3, warmup_steps=0,
                   backbone_kwargs=TINY)
    return ClassificationModule(backbone="vit_tiny_patch16", num_classes=3, **{**options, **kwargs})


def trainer(tmp_path: Path, steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, log_every_n_steps=1, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                     limit_val_batches=0)


def kl_to_teacher(module: ClassificationModule, x: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return float(distillation_loss(module(x), module.teacher(x), "soft"))


@pytest.mark.slow
def test_student_moves_toward_the_teacher_which_stays_frozen_and_unsaved(shapes: Path, teacher_file: Path, tmp_path: Path) -> None:
    data = ClassificationDataModule(str(shapes), image_size=32, batch_size=8, num_workers=0)
    data.setup("fit")
    x = torch.stack([data.datasets["val"][i]["input"] for i in range(12)])
    module = student(teacher_file)
    teacher_before = module.teacher.state_fingerprint()
    before = kl_to_teacher(module, x)
    fit = trainer(tmp_path, steps=30)
    fit.fit(module, data)
    after = kl_to_teacher(module, x)
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_fingerprint().items())
    assert not module.teacher.network.training
    trained = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.parameters()}  # student only
    assert not any(id(p) in trained for p in module.teacher.network.parameters())
    rows = [r for r in read_metrics(tmp_path) if "train/loss_distill_step" in r]
    assert len(rows) == 30 and rows[-1]["train/loss_distill_step"] < rows[0]["train/loss_distill_step"]

    path = tmp_path / "student.ckpt"
    fit.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert not any("teacher" in k for k in saved["state_dict"])
    assert saved["state_dict"].keys() == module.state_dict().keys()
    assert saved["hyper_parameters"]["teacher_pretrained"] == str(teacher_file)
    teacher_file.rename(teacher_file.with_suffix(".moved"))  # evaluating the student needs no teacher
    try:
        restored = ClassificationModule.load_from_checkpoint(path)
        torch.testing.assert_close(restored.eval()(x), module.eval()(x))
    finally:
        teacher_file.with_suffix(".moved").rename(teacher_file)


def test_deit_distillation_token_trains_its_own_head_on_the_teachers_labels(shapes: Path, teacher_file: Path, tmp_path: Path) -> None:
    module = student(teacher_file, backbone_kwargs={**TINY, "distilled": True}, distillation="hard", distillation_alpha=0.5)
    assert module.head.fc_dist is not None
    x = torch.randn(4, 3, 32, 32)
    module.eval()
    features = module.backbone.forward_tokens(x)
    cls, dist = module.head.forward_both(features)
    assert torch.allclose(module(x), (cls + dist) / 2)  # evaluation averages the two heads
    module.train()
    logits = module.forward_stage(x, "train")
    losses = module.auxiliary_losses({"input": x}, logits, "train")
    teacher_labels = module.teacher(x).argmax(-1)
    expected = F.cross_entropy(module.head.fc_dist(module.backbone.forward_tokens(x)[:, 1]), teacher_labels)
    assert module.task_loss_weight("train") == 0.5 and losses["distill"].weight == 0.5
    torch.testing.assert_close(losses["distill"].value, expected)


def test_soft_distillation_is_deits_kl() -> None:
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    tau = 3.0
    reference = (F.softmax(t / tau, -1) * (F.log_softmax(t / tau, -1) - F.log_softmax(s / tau, -1))).sum() * tau**2 / s.numel()
    torch.testing.assert_close(distillation_loss(s, t, "soft", tau), reference)


def test_a_teacher_pools_as_its_checkpoint_was_trained(tmp_path: Path) -> None:
    """A dense ViT trained with ``pool: avg`` (the DynamicViT CPU recipe's teacher) gives its own logits as a teacher,
    not its head applied to the class token (which cost the real one 21 points of val top-1)."""
    torch.manual_seed(2)
    dense = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=3, pool="avg").eval()
    path = tmp_path / "dense.ckpt"  # what Lightning saves: the weights and the run's hyperparameters
    torch.save({"state_dict": dense.state_dict(), "hyper_parameters": dict(dense.hparams)}, path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = dense(x)
    teacher = build_teacher("vit_tiny_patch16", num_classes=3, pretrained=str(path), kwargs=TINY)
    assert teacher.network.head.pool == "avg"
    torch.testing.assert_close(teacher(x), expected)
    told = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=3, teacher="vit_tiny_patch16",
                                teacher_kwargs=TINY, teacher_pretrained=str(path), teacher_pool="cls", distillation="soft")
    assert told.teacher.network.head.pool == "cls"  # an explicit teacher_pool wins
    assert not torch.allclose(told.teacher(x), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"distillation": "none"}, "a teacher needs distillation"), ({"teacher": None}, "distillation needs a teacher"),
     ({"distillation_alpha": 1.5}, "distillation_alpha")],
)
def test_bad_distillation_options_are_named(teacher_file: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        student(teacher_file, **options)


@pytest.mark.distributed
def test_ddp_fit_with_a_teacher(shapes: Path, teacher_file: Path, tmp_path: Path, synthetic_cache: str) -> None:
    args = [
        "fit", "--seed_everything=1", "--model.backbone=vit_tiny_patch16", TINY_VIT,
        "--model.teacher=vit_tiny_patch16", TINY_VIT.replace("backbone_kwargs", "teacher_kwargs"),
        f"--model.teacher_pretrained={teacher_file}", "--model.distillation=hard",
        f"--data.root={shapes}", "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    run_task("classification", args, cache=synthetic_cache)
    rows = read_metrics(tmp_path)
    assert any("train/loss_distill_epoch" in r for r in rows)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("teacher" in k for k in saved["state_dict"])


def test_bad_teacher_files_are_named_before_training(teacher_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    module = student(teacher_file, teacher_pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        module.setup("fit")
    other = tmp_path / "other.pth"  # a timm state dict of another architecture for a timm teacher
    torch.save({"weight": torch.zeros(3)}, other)
    module = student(teacher_file, teacher="timm:resnet18", teacher_kwargs=None, teacher_pretrained=str(other))
    with pytest.raises(ValueError, match=r"other\.pth does not fit timm model 'timm:resnet18'"):
        module.setup("fit")


@pytest.mark.parametrize("cpu_kernels", ["off", "on"])
def test_a_teacher_runs_the_students_cpu_kernels(cpu_kernels: str) -> None:
    from ops.onednn_linear import OneDnnLinear

    teacher = build_teacher(
        "vit_tiny_patch16", num_classes=3, pretrained=None, cpu_kernels=cpu_kernels,
        kwargs={"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
    )
    linears = [m for m in teacher.network.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, OneDnnLinear) == (cpu_kernels == "on") for m in linears)
