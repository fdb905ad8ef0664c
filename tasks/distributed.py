"""What changes when more than one process trains: BatchNorm statistics shared across processes, but only where
they can be."""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn


class SyncBatchNormWhenDistributed(TorchSyncBatchNorm):
    """``--trainer.sync_batchnorm true`` that converts BatchNorm layers to ``SyncBatchNorm`` only when more than
    one process trains on devices torch can synchronise; a one-process run (even under ``strategy=ddp``) and CPU
    processes (gloo, where torch's SyncBatchNorm raises) keep per-process BatchNorm. The CLI swaps it in for
    Lightning's plugin; in Python pass ``Trainer(plugins=[SyncBatchNormWhenDistributed()])``.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world < 2:
            rank_zero_info("sync_batchnorm: one process, BatchNorm kept as it is")
            return model
        if dist.get_backend() == "gloo":
            rank_zero_warn("sync_batchnorm: torch synchronises BatchNorm on GPUs only; CPU processes keep their own statistics")
            return model
        return super().apply(model)
