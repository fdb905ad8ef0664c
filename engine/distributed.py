"""What changes when more than one process trains: BatchNorm statistics shared across processes, but only where
they can be; and the model sharded over the processes (FSDP2) when it does not fit on one device."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


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


class FullyShardedStrategy(ModelParallelStrategy):
    """``--trainer.strategy fsdp``: every process holds a 1/N shard of each parameter, its gradient and its optimizer
    state (FSDP2, ``torch.distributed.fsdp.fully_shard``, through Lightning's ``ModelParallelStrategy`` with all
    processes on the data-parallel axis). The backbone's ``sharding_units`` (the transformer blocks) are gathered one
    at a time in forward and backward; the rest of the model (embeddings, final norm, head) is the root unit.

    FSDP2 rather than Lightning's ``FSDPStrategy`` (FSDP1): each parameter stays a tensor of its own shape, sharded
    on dim 0 (a DTensor), so an optimizer sees the real 2-D weights (big_vision's factored Adafactor stays factored;
    FSDP1 hands it flat 1-D slices) and the optimizer's results equal one process's; it runs on CPU processes (gloo),
    which Lightning's ``FSDPStrategy`` refuses; and it composes with activation checkpointing inside the blocks.

    Args:
        save_distributed_checkpoint: ``False`` (default): rank 0 writes one ordinary ``.ckpt`` with the full weights
            and optimizer state, which a one-process run or another world size loads as it is; ``True``: a folder
            with one shard per process (faster to write for billions of parameters; resumes at the same world size).
        **kwargs: ``process_group_backend``, ``timeout`` of ``ModelParallelStrategy``.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure data parallelism: one mesh axis
        self._tensor_parallel_size = 1
        super().setup_environment()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """As the parent, with ``torch.dtype`` values of the parameter groups (big_vision Adafactor's
        ``momentum_dtype``) written as their names: torch's state-dict gathering takes no other objects."""
        groups = getattr(optimizer, "optimizer", optimizer).param_groups
        dtypes = [{k: v for k, v in group.items() if isinstance(v, torch.dtype)} for group in groups]
        for group, found in zip(groups, dtypes):
            group.update({k: str(v) for k, v in found.items()})
        try:
            state = super().optimizer_state(optimizer)
        finally:
            for group, found in zip(groups, dtypes):
                group.update(found)
        for group in state.get("param_groups", []):  # the file holds what one process would write
            restore_dtypes(group)
        return state


def restore_dtypes(group: dict[str, Any]) -> None:
    """Turn ``"torch.bfloat16"``-style values of an optimizer parameter group back into ``torch.dtype`` objects, in
    place (what ``FullyShardedStrategy.optimizer_state`` gathered them as)."""
    for key, value in group.items():
        if isinstance(value, str) and value.startswith("torch.") and isinstance(getattr(torch, value[6:], None), torch.dtype):
            group[key] = getattr(torch, value[6:])


def shard_task_module(module: nn.Module, units: list[nn.Module], mesh: Any) -> None:
    """Apply ``fully_shard`` to each of ``units`` and then to ``module`` (a LightningModule) as the root unit.

    The root's parameters are gathered around each step method, the entry points Lightning calls, so every forward
    pass inside a step (the task's own, a teacher's, a sliding window) sees them whole. Idempotent: Lightning calls
    ``configure_model`` again for each ``fit``/``validate``/``test``.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):
        return
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in STEP_METHODS:
        register_fsdp_forward_method(module, name)
