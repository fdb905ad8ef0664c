"""The sandwich rule (Yu & Huang, 2019, used by Li et al., 2022 for their super-network): one training step runs the
sub-networks a super-network's ``training_passes`` names, one after another on the same (augmented) batch, and sums
their losses, so their gradients accumulate into one optimizer step.

The first pass (the largest network) learns the labels and is what the step's metrics report; with in-place
distillation (``SubnetPasses.distill``) the others learn its predictions (soft cross-entropy to its detached
softmax), otherwise the labels too. The total is logged as ``train/loss``, the largest network's own term as
``train/loss_largest``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from backbones.base import SubnetPasses


def sandwich_step(module: L.LightningModule, batch: dict[str, Any], passes: SubnetPasses) -> torch.Tensor | None:
    """The training loss of one step over every sub-network of ``passes`` (see the module docstring)."""
    if module.hparams.get("teacher") is not None:
        raise ValueError("the sandwich rule distils the largest sub-network in place; train the super-network "
                         "without a teacher (model.teacher: null)")
    if module.skip_batch(batch, "train"):
        return None
    backbone = module.backbone
    batch = module.prepare_batch(batch, "train")  # one augmentation (mixup) for every pass
    target = batch["target"]
    label = batch.get("loss_target", target)
    with torch.autocast(module.device.type, enabled=False):
        total, teacher = None, label
        for i, config in enumerate(passes.configs):
            backbone.set_subnet(config)
            output = module(batch["input"]).float()
            loss = module.compute_loss(output, teacher if passes.distill else label)
            if i == 0:
                teacher = output.detach().softmax(-1)
                largest = loss.detach()
                module.metrics["train_metrics"].update(*module.metric_inputs(output, target))
            total = loss if total is None else total + loss
    backbone.set_subnet(passes)  # the largest active again, the step's passes kept
    if not module.check_finite({"sandwich": total}, batch):  # the sum over the passes
        return None
    batch_size = target.shape[0]
    mean_loss = module.losses["train_loss"]
    mean_loss(total.detach().expand(batch_size))
    module.log("train/loss", mean_loss, on_step=True, on_epoch=True, prog_bar=True)
    module.log("train/loss_largest", largest, on_step=True, on_epoch=True, batch_size=batch_size)
    module.log_dict(module.metrics["train_metrics"], on_step=False, on_epoch=True, batch_size=batch_size)
    return total
