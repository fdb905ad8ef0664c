"""Token reduction as a seam: a second method, defined here, plugs into the classification task through the
``Backbone`` hooks alone (parameter groups, frozen parameters, losses, logs, keep weights, distilled tokens, maps),
and the factory's errors name the method and option."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch import nn

from backbones.token_reduction import TOKEN_REDUCTIONS, TokenReducer, reduce_tokens, register_token_reduction
from backbones.vit import VisionTransformer
from datamodules.classification import ClassificationDataModule
from tasks.classification import ClassificationModule

from cli_runs import read_metrics, write_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"img_size": 32, "depth": 4, "embed_dim": 48, "num_heads": 2, "patch_size": 4}  # 64 patch tokens


class KeepAllTokens(TokenReducer, VisionTransformer):
    """A toy token reduction that drops no token: it scales the final tokens by a learned gate (1 at the start, so
    the network is the dense one) with the auxiliary loss ``gate``, and declares what a task reads of it."""

    token_reduction = "keep_all"
    gate: nn.Linear | None

    @classmethod
    def wrap(cls, vit: VisionTransformer, *, gate: bool = True, gate_weight: float = 0.5) -> KeepAllTokens:
        vit.__class__ = cls
        model: KeepAllTokens = vit  # type: ignore[assignment]
        model.gate = nn.Linear(vit.embed_dim, 1) if gate else None
        if model.gate is not None:
            nn.init.zeros_(model.gate.weight)
            nn.init.zeros_(model.gate.bias)
        model.gate_weight, model.weights = gate_weight, None
        return model

    def added_modules(self) -> dict[str, nn.Module]:
        return {} if self.gate is None else {"gate": self.gate}

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [self.pos_embed]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = super().forward_tokens(x)
        self.weights = tokens.new_ones(tokens.shape[:2]) if self.training else None
        if self.gate is None:
            return tokens
        scale = 1.0 + self.gate(tokens)  # [B, P + N, 1]
        self.add_auxiliary_loss("gate", (scale - 1.0).square().mean(), weight=self.gate_weight)
        return tokens * scale

    def token_keep_weights(self) -> torch.Tensor | None:
        return self.weights

    def training_logs(self) -> dict[str, torch.Tensor]:
        return {"kept_fraction_0": torch.tensor(1.0)}

    def distillation_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.num_prefix_tokens
        return tokens[:, p:], None if self.weights is None else self.weights[:, p:]

    def token_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.new_ones(x.shape[0], *self.patch_embed.grid(x.shape[2:]))]


@pytest.fixture(autouse=True)
def keep_all_registered() -> Iterator[None]:
    register_token_reduction("keep_all", KeepAllTokens.wrap)
    yield
    TOKEN_REDUCTIONS.pop("keep_all")


def tiny(**kwargs) -> ClassificationModule:
    return ClassificationModule(**{"backbone": "vit_tiny_patch16", "backbone_kwargs": TINY, "num_classes": 3, **kwargs})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def dense_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense tiny classifier pooling by average: the teacher, and the weights the student starts from."""
    path = tmp_path_factory.mktemp("dense") / "dense.pth"
    torch.manual_seed(1)
    torch.save(tiny(pool="avg").state_dict(), path)
    return path


def test_a_second_method_trains_through_the_contract_alone(shapes: Path, dense_file: Path, tmp_path: Path) -> None:
    module = tiny(
        pool="avg", token_reduction={"method": "keep_all", "gate_weight": 0.25}, pretrained=str(dense_file),
        pretrained_lr_mult=0.1, pretrained_frozen_epochs=1, teacher="vit_tiny_patch16", teacher_kwargs=TINY,
        teacher_pretrained=str(dense_file), distillation="kl", lr=1e-2, warmup_steps=0,
    )
    assert type(module.backbone) is KeepAllTokens
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert groups["gate"]["lr"] == 1e-2 and "frozen_epochs" not in groups["gate"]
    assert groups["backbone"]["lr"] == pytest.approx(1e-3) and groups["head"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone"]["frozen_epochs"] == groups["head"]["frozen_epochs"] == 1
    trained = {id(p) for g in groups.values() for p in g["params"]}
    assert id(module.backbone.pos_embed) not in trained and id(module.backbone.cls_token) in trained
    assert module.task_loss_weight("train") == 1.0  # it distils tokens: the token-distillation objective

    dense = tiny(pool="avg", pretrained=str(dense_file)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), dense(x))  # the gate starts at 1

    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path), limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, ClassificationDataModule(str(shapes), image_size=32, batch_size=4, num_workers=0))
    rows = read_metrics(tmp_path)
    for name in ("loss_gate", "loss_distill", "loss_token_distill", "kept_fraction_0"):
        assert any(f"train/{name}_step" in r for r in rows), name
    after = module.state_dict()
    assert torch.equal(after["backbone.blocks.0.attn.qkv.weight"], before["backbone.blocks.0.attn.qkv.weight"])
    assert torch.equal(after["head.fc.weight"], before["head.fc.weight"])
    assert not torch.equal(after["backbone.gate.weight"], before["backbone.gate.weight"])


def test_predict_draws_the_maps_the_method_declares(tmp_path: Path) -> None:
    module = tiny(token_reduction={"method": "keep_all"}, save_token_maps=True).eval()
    module.predict_output_dir = tmp_path
    batch = {"input": torch.randn(2, 3, 32, 32), "index": torch.tensor([0, 1]), "path": ["a/cat.png", "b/dog.png"]}
    with torch.no_grad():
        rows = module.predict_step(batch, 0)
    with Image.open(rows[1]["token_map"]) as picture:
        assert Path(rows[1]["token_map"]).name == "1_dog.png" and picture.height == 32 and picture.width > 2 * 32


def test_the_general_form_builds_what_token_pruning_builds() -> None:
    torch.manual_seed(0)
    old = tiny(token_pruning=True, keep_ratio=0.5, prune_at=(1, 3)).eval()
    torch.manual_seed(0)
    new = tiny(token_reduction={"method": "dynamicvit", "keep_ratio": 0.5, "prune_at": [1, 3]}).eval()
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"token_reduction": {"method": "evit"}}, r"one of \[.*'dynamicvit'.*'keep_all'.*'tome'\]; got 'evit'"),
        ({"token_reduction": {"method": "tome"}}, "'tome' takes other options .*missing a required argument: 'r'"),
        ({"token_reduction": {"keep_ratio": 0.5}}, "token reduction needs a method"),
        ({"token_reduction": {"method": "dynamicvit", "keep_raito": 0.5}}, "'dynamicvit' takes other options .*keep_raito"),
        ({"token_reduction": {"method": "dynamicvit"}, "token_pruning": True}, "set one of them"),
        ({"token_reduction": {"method": "keep_all", "gate": False}, "pretrained_lr_mult": 0.1}, "keep_all adds no module"),
        ({"token_reduction": {"method": "keep_all"}, "freeze_backbone": True}, r"modules keep_all adds \(gate\)"),
        ({"pretrained_frozen_epochs": 1}, "need token_pruning=true"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**options)


def test_a_method_without_added_modules_trains_as_the_network_it_wraps() -> None:
    from backbones import create_backbone

    reduced = reduce_tokens(create_backbone("vit_tiny_patch16", **TINY), "keep_all", gate=False)
    tuning = reduced.fine_tuning()
    assert tuning.added == {} and tuning.pretrained_lr_mult == 1.0 and tuning.pretrained_frozen_epochs == 0
    with pytest.raises(ValueError, match="already registered"):
        register_token_reduction("keep_all", lambda backbone: backbone)
