"""``SupernetWarmup``: tells a super-network the training epoch, for the progressive warm-up of its choices."""

from __future__ import annotations

import lightning as L

from backbones.vit_resnas_supernet import ViTResNASSupernet


class SupernetWarmup(L.Callback):
    """Set ``backbone.epoch`` at the start of every training epoch (a resumed run too), so the choices a
    ``ViTResNASSupernet`` draws widen from the largest only to all over its ``num_warmup_epochs``. Every process
    sets the same epoch, so the draws stay a function of ``(seed, epoch, batch)``."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone = pl_module.backbone
        if not isinstance(backbone, ViTResNASSupernet):
            raise TypeError(f"SupernetWarmup needs a ViTResNASSupernet backbone, got {type(backbone).__name__}")
        backbone.epoch = trainer.current_epoch
