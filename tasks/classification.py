"""Image classification: ``ClassificationModule``, a pooling head (``heads.classification``) over any backbone.

``python -m tasks.classification fit --config configs/vit_small_patch16.yaml``
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from backbones.base import AuxiliaryLoss, PoolType
from engine.cli import TaskCLI, run_cli
from engine.distillation import DistillationKind, FrozenTeacher, build_teacher, distillation_loss, token_distillation_loss
from engine.fewshot_callback import FewShotEvaluator  # noqa: F401  (imported so --trainer.callbacks+=FewShotEvaluator resolves)
from engine.picture_makers import ClassificationPictures
from heads.classification import Classifier, classification_head, pooled_features

from .module import Stage, TaskModule


class ClassificationModule(TaskModule):
    """Image classifier: backbone, pooling head, cross-entropy with label smoothing, optional mixup/cutmix and
    knowledge distillation from a frozen teacher (DeiT).

    Args:
        pool: head pooling (see ``ClassificationHead``); ``None`` takes the backbone's default
            (``cls`` for ViTs with a class token, ``native`` for timm models, ``avg`` otherwise).
        head_drop_rate: dropout before the classifier.
        label_smoothing: cross-entropy label smoothing (ignored under mixup, which smooths itself).
        loss: ``softmax`` cross-entropy, or ``sigmoid``: independent binary cross-entropies summed over classes,
            with the classifier bias starting at -10 (big_vision's ``sigmoid_xent`` and ``init_head_bias``, the
            scaling paper's choice) unless a checkpoint brings one.
        mixup_alpha, cutmix_alpha: Beta parameters of timm's Mixup/CutMix; 0 disables each.
        mixup_prob, mixup_switch_prob: chance to apply either, and to pick cutmix when both are on.
        teacher: backbone name (a preset or ``timm:<name>``) of a frozen teacher; ``None``: no distillation.
        teacher_kwargs: overrides of the teacher's preset (``img_size``...).
        teacher_pool: the pooling of the teacher's head (our backbones); ``None``: the ``pool`` its checkpoint
            was trained with (saved in our Lightning checkpoints), else the backbone's default.
        teacher_pretrained: the teacher's weights: any file the loader reads, a checkpoint of ours, or for
            ``timm:`` names a timm state dict with its classifier. Only the name and file are saved with our
            checkpoints, never the teacher's weights.
        distillation: ``soft`` (KL at temperature ``distillation_tau``, DeiT's normalisation), ``kl`` (the same per
            sample, the token-pruning release's) or ``hard`` (the teacher's argmax as label, DeiT's choice); with a distillation
            token (``backbone_kwargs: {distilled: true}``) the term applies to the distillation head and the class
            head keeps the true labels.
        distillation_alpha: the objective is ``(1 - alpha) * task loss + alpha * distillation loss``; with a
            backbone that distils its tokens (``token_pruning``) it is the token-pruning release's: ``task loss +
            alpha * distillation loss + alpha * token_distill`` (its ``distill_weight`` for both) ``+ 2 * keep_ratio``.
        distillation_tau: temperature of ``soft`` and ``kl`` distillation.
        token_pruning: prune tokens as Rao et al.'s dynamic token sparsification does (the ``dynamicvit`` token
            reduction, ``backbones.token_pruning``; a ViT or TimeSformer backbone): prediction modules before
            blocks ``prune_at`` keep ``keep_ratio`` of the patch tokens each; hard Gumbel decisions as an attention
            mask in training, gathered top-k tokens at inference. Its losses: ``keep_ratio`` and, with a teacher
            (the dense model it starts from), ``token_distill``, the MSE between the student's kept final tokens
            and the teacher's. Class token, distillation token and position embeddings stay frozen. The same as
            ``token_reduction: {method: dynamicvit, keep_ratio: .., prune_at: ..}``.
        keep_ratio, prune_at: see ``backbones.token_pruning`` (defaults 0.7; blocks 3, 6, 9 of 12, scaled to the
            depth).
        pretrained_lr_mult: with ``token_pruning`` (or a ``token_reduction``), the learning rate of the pretrained network (backbone and
            head) relative to ``lr``, which the new prediction modules take (the release: 0.01).
        pretrained_frozen_epochs: with ``token_pruning`` (or a ``token_reduction``), the first epochs during which the pretrained network
            stays fixed and only the prediction modules learn (the release: 5).
        save_token_maps: with ``token_pruning`` (or ``token_merging``, a ``token_reduction``), ``predict`` also writes
            each image's token maps (the kept tokens, one panel per stage; or the merge groups) as
            ``<output_dir>/token_maps/<index>_<name>.png`` and names the file in the ``token_map`` column.
        **kwargs: backbone, data link and optimisation recipe of ``TaskModule``.
    """

    main_metric = "top1"

    def __init__(
        self,
        *,
        pool: PoolType | None = None,
        head_drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        loss: Literal["softmax", "sigmoid"] = "softmax",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        teacher: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_pretrained: str | None = None,
        teacher_pool: PoolType | None = None,
        distillation: DistillationKind = "none",
        distillation_alpha: float = 0.5,
        distillation_tau: float = 1.0,
        token_pruning: bool = False,
        keep_ratio: float = 0.7,
        prune_at: tuple[int, ...] | None = None,
        pretrained_lr_mult: float = 1.0,
        pretrained_frozen_epochs: int = 0,
        save_token_maps: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # builds the backbone (token pruning included), then ``build_head``, then loads weights
        if self.backbone.token_reduction is None and (save_token_maps or pretrained_lr_mult != 1.0 or pretrained_frozen_epochs):
            raise ValueError(
                "save_token_maps, pretrained_lr_mult and pretrained_frozen_epochs need token_pruning=true, token_merging "
                "or a token_reduction"
            )
        if self.backbone.distils_tokens and teacher is not None and teacher.startswith("timm:"):
            raise ValueError(
                f"{self.backbone.token_reduction} distils the teacher's tokens: the teacher must be one of our ViTs, not {teacher!r}"
            )
        if (teacher is None) != (distillation == "none"):
            raise ValueError(
                f"teacher={teacher!r} with distillation={distillation!r}: a teacher needs distillation 'soft' or "
                "'hard', and distillation needs a teacher"
            )
        if not 0.0 <= distillation_alpha <= 1.0 or distillation_tau <= 0:
            raise ValueError(f"need 0 <= distillation_alpha <= 1 and distillation_tau > 0, got {distillation_alpha}, {distillation_tau}")
        loaded = self.load_report.loaded if self.hparams.pretrained else []
        if loss == "sigmoid" and "head.fc.bias" not in loaded:
            nn.init.constant_(self.head.fc.bias, -10.0)  # sigmoid(-10) = 4.5e-5: no class is claimed at first
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )
        self._teacher: FrozenTeacher | None = None  # built on first use: evaluating a student needs no teacher file
        self._distillation_logits: torch.Tensor | None = None
        self._student_tokens: torch.Tensor | None = None

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The frozen teacher, built from ``teacher``/``teacher_pretrained`` when first needed (``None`` without)."""
        hp = self.hparams
        if hp.teacher is not None and self._teacher is None:
            self._teacher = build_teacher(
                hp.teacher, num_classes=self.num_classes, pretrained=hp.teacher_pretrained, kwargs=hp.teacher_kwargs,
                pool=hp.teacher_pool, cpu_kernels=hp.cpu_kernels,
            )
        return self._teacher

    def setup(self, stage: str) -> None:
        if stage == "fit":
            _ = self.teacher  # a bad teacher file is an error before training starts

    def token_reduction_options(self) -> dict[str, Any] | None:
        """``token_reduction``, or for ``token_pruning`` the ``dynamicvit`` reduction with ``keep_ratio`` and
        ``prune_at``; either with the recipe ``pretrained_lr_mult``, ``pretrained_frozen_epochs``."""
        hp, options = self.hparams, super().token_reduction_options()
        if hp.token_pruning:
            if options is not None:
                other = f"token_merging={hp.token_merging}" if hp.token_merging is not None else f"token_reduction={options}"
                raise ValueError(f"token_pruning=true and {other} both reduce tokens; set one of them")
            options = {"method": "dynamicvit", "keep_ratio": hp.keep_ratio, "prune_at": hp.prune_at}
        if options is None:
            return None
        return {"pretrained_lr_mult": hp.pretrained_lr_mult, "pretrained_frozen_epochs": hp.pretrained_frozen_epochs, **options}

    def build_head(self) -> nn.Module:
        hp = self.hparams
        head = classification_head(self.backbone, self.num_classes, hp.pool, hp.head_drop_rate)
        if self.backbone.token_reduction is not None and head.pool == "map":
            raise ValueError(f"{self.backbone.token_reduction} with pool='map' is not supported: pool by 'cls' or 'avg'")
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, self.head.pool, x), self.backbone.token_keep_weights())

    def forward_stage(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        """In training with a teacher: the class head's logits, keeping the distillation head's (with a
        distillation token) and the backbone's tokens, where it distils them, for the distillation terms; otherwise
        ``forward``."""
        if stage != "train" or self.hparams.teacher is None:
            return self(x)
        features = pooled_features(self.backbone, self.head.pool, x)
        self._student_tokens = features if self.backbone.distils_tokens else None
        if self.head.fc_dist is None:
            return self.head(features, self.backbone.token_keep_weights())
        logits, self._distillation_logits = self.head.forward_both(features)
        return logits

    def auxiliary_losses(self, batch: dict[str, Any], output: torch.Tensor, stage: Stage) -> dict[str, AuxiliaryLoss]:
        losses = super().auxiliary_losses(batch, output, stage)
        student, self._distillation_logits = self._distillation_logits, None
        tokens, self._student_tokens = self._student_tokens, None
        if stage == "train" and self.hparams.teacher is not None:
            hp = self.hparams
            if tokens is None:
                teacher = self.teacher(batch["input"])
            else:
                teacher, teacher_tokens = self._teacher_with_tokens(batch["input"])
            student = output if student is None else student.float()
            with torch.autocast(self.device.type, enabled=False):
                term = distillation_loss(student, teacher, hp.distillation, hp.distillation_tau)
                losses["distill"] = AuxiliaryLoss(term, hp.distillation_alpha)
                if tokens is not None:
                    losses["token_distill"] = AuxiliaryLoss(self._token_distillation(tokens, teacher_tokens), hp.distillation_alpha)
        return losses

    def _teacher_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.teacher
        if not (isinstance(teacher.network, Classifier) and teacher.network.backbone.has_tokens):
            raise ValueError(
                f"{self.backbone.token_reduction} distils the teacher's tokens: the teacher must be one of our token "
                f"backbones (the dense ViT the student starts from), not {type(teacher.network).__name__}"
            )
        return teacher.forward_with_tokens(x)

    def _token_distillation(self, tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        """MSE between the student's kept final patch tokens and the dense teacher's (prefix tokens left out)."""
        student, weights = self.backbone.distillation_tokens(tokens)
        teacher_patches = teacher_tokens[:, self.teacher.network.backbone.num_prefix_tokens :]
        return token_distillation_loss(student.float(), teacher_patches, weights)

    def task_loss_weight(self, stage: Stage) -> float:
        distils_logits_only = self.hparams.teacher is not None and not self.backbone.distils_tokens
        return 1.0 - self.hparams.distillation_alpha if distils_logits_only else 1.0

    def picture_maker(self) -> ClassificationPictures:
        return ClassificationPictures([self.class_name(i) for i in range(self.num_classes)])

    def build_metrics(self, stage: Stage) -> MetricCollection:
        metrics = {"top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    def prepare_batch(self, batch: dict[str, Any], stage: Stage) -> dict[str, Any]:
        if stage != "train" or self.mixup is None:
            return batch
        if batch["input"].shape[0] % 2:
            raise ValueError("mixup/cutmix needs an even batch size (set data.batch_size to an even number)")
        x, soft = self.mixup(batch["input"], batch["target"])
        return {**batch, "input": x, "loss_target": soft}

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "sigmoid":
            if target.ndim == 1:
                smoothing = self.hparams.label_smoothing
                target = F.one_hot(target, output.shape[-1]).float() * (1 - smoothing) + smoothing / output.shape[-1]
            return F.binary_cross_entropy_with_logits(output, target, reduction="none").sum(-1).mean()
        if target.ndim == 2:  # soft targets from mixup/cutmix
            return torch.sum(-target * F.log_softmax(output, dim=-1), dim=-1).mean()
        return F.cross_entropy(output, target, label_smoothing=self.hparams.label_smoothing)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        probs = self(batch["input"]).float().softmax(-1)
        conf, pred = probs.max(-1)
        rows = [
            {"index": int(i), "path": p, "predicted_class": self.class_name(c), "probability": f"{v:.6f}"}
            for i, p, c, v in zip(batch["index"].tolist(), batch["path"], pred.tolist(), conf.tolist())
        ]
        if self.hparams.save_token_maps:
            self._write_token_maps(batch["input"], rows)
        return rows

    def _write_token_maps(
        self, x: torch.Tensor, rows: list[dict[str, Any]], draw: Callable[..., Any] | None = None
    ) -> None:
        """The backbone's token maps of the last forward pass over ``x``, one PNG per row (named in ``token_map``),
        drawn by ``draw`` (default ``engine.token_maps.token_map_image``)."""
        from engine.token_maps import token_map_image, write_row_token_maps

        out_dir = Path(self.predict_output_dir) / "token_maps"
        write_row_token_maps(x, self.backbone.token_maps(x), rows, out_dir, draw or token_map_image)


def main(args: Any = None) -> TaskCLI:
    """``python -m tasks.<task>``; returns the CLI, its trainer and model after the subcommand ran."""
    from datamodules.classification import ClassificationDataModule

    return run_cli(ClassificationModule, ClassificationDataModule, args=args)


if __name__ == "__main__":
    main()
