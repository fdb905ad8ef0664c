"""The backbone contract shared by every task.

A backbone maps an input of fixed layout (image ``[B, C, H, W]``, video ``[B, C, T, H, W]``, volume
``[B, C, D, H, W]``) to a list of channel-first feature maps, shallow to deep, and declares each map's
channels and stride up front in ``feature_info`` so heads can be built without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

PoolType = Literal["cls", "avg", "map", "native"]


@dataclass(frozen=True)
class FeatureInfo:
    """One output of a backbone: its channel count and its stride per spatial dimension."""

    channels: int
    stride: tuple[int, ...]

    @property
    def reduction(self) -> int:
        """The largest stride, timm's ``reduction`` (for 2-D maps with equal strides they coincide)."""
        return max(self.stride)


@dataclass(frozen=True)
class AuxiliaryLoss:
    """A training loss a module adds besides its output (a keep-ratio loss, a super-network's extra term):
    ``value`` is unweighted; ``weight`` is the module's default, which the task's ``loss_weights`` can override."""

    value: torch.Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class SubnetPasses:
    """The sub-networks one training step runs one after another on the same batch, their losses summed into one
    optimizer step (a super-network's sandwich rule); with ``distill``, those after the first learn the first one's
    predictions instead of the labels (in-place distillation)."""

    configs: tuple[Any, ...]
    distill: bool = False


@dataclass(frozen=True)
class FineTuning:
    """How a network that a wrapper built around a pretrained one trains (``Backbone.fine_tuning``): the wrapper's
    new modules (``added``, by optimizer group name) at the task's ``lr``; the pretrained network, the rest of the
    backbone and the head, at ``lr * pretrained_lr_mult``, held fixed for its first ``pretrained_frozen_epochs``."""

    added: dict[str, nn.Module] = field(default_factory=dict)
    pretrained_lr_mult: float = 1.0
    pretrained_frozen_epochs: int = 0


class AuxiliaryLossSource(nn.Module):
    """A module (backbone or head) whose forward pass can leave losses for the task's shared step.

    The forward pass calls ``add_auxiliary_loss``; the step takes them with ``pop_auxiliary_losses`` right
    after the forward pass, adds them with their weights and logs each as ``train/loss_<name>``.
    """

    def add_auxiliary_loss(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        losses = self.__dict__.setdefault("_auxiliary_losses", {})
        losses[name] = AuxiliaryLoss(value, weight)

    def pop_auxiliary_losses(self) -> dict[str, AuxiliaryLoss]:
        """The losses left by the last forward pass (of this module and its sub-modules), cleared."""
        found: dict[str, AuxiliaryLoss] = {}
        for module in self.modules():
            if isinstance(module, AuxiliaryLossSource):
                found.update(module.__dict__.pop("_auxiliary_losses", {}))
        return found


class Backbone(AuxiliaryLossSource):
    """Base class of every backbone, and the one place where the hooks that loaders and tasks call are declared.

    Subclasses set ``feature_info`` in ``__init__`` and implement ``forward(x) -> list[Tensor]``.
    ``in_chans`` and ``spatial_dims`` describe the input. Token models (ViTs) also implement
    ``forward_tokens(x) -> [B, num_prefix_tokens + N, num_features]`` so a head can pool by class token,
    average or attention; ``default_pool`` is what a classification head uses unless told otherwise.

    Optional hooks, each with a default that fits a fixed network:

    - checkpoints: ``checkpoint_prefix``, ``adapt_checkpoint_tensor``, ``derive_checkpoint_tensors``
      (called by ``backbones.weights.load_pretrained``);
    - pooled features of the architecture's own head: ``forward_pooled`` (``has_pooled``);
    - auxiliary losses: ``add_auxiliary_loss`` / ``pop_auxiliary_losses`` (``AuxiliaryLossSource``);
    - dynamic networks: ``set_epoch``, ``sample_subnet`` / ``set_subnet`` (``is_dynamic``), called before every
      training step by ``engine.run_state.DynamicChoices`` with a generator seeded from ``(seed, epoch, batch)``;
      ``training_passes`` when a step runs several sub-networks (the sandwich rule, ``SubnetPasses``);
    - training past one device's memory: ``set_activation_checkpointing`` (``supports_activation_checkpointing``),
      called by the task for ``activation_checkpointing: true``, and ``sharding_units``, the blocks FSDP shards one
      by one (``engine.distributed``);
    - token reduction (a wrapper from ``backbones.token_reduction.reduce_tokens``, DynamicViT's pruning):
      ``token_reduction``, ``fine_tuning``, ``frozen_parameters``, ``token_keep_weights``, ``training_logs``,
      ``distillation_tokens`` (``distils_tokens``) and ``token_maps``, read by the task after each forward pass.
    """

    feature_info: list[FeatureInfo]
    in_chans: int = 3
    spatial_dims: int = 2
    num_features: int
    num_prefix_tokens: int = 0
    default_pool: PoolType = "avg"
    distilled: bool = False
    """The backbone was trained with a distillation classifier beside its own (DeiT's distillation token, read by
    heads at prefix position 1; EfficientFormerV2's second classifier on its pooled features): the classification
    head gets ``fc_dist`` and averages the two at evaluation."""
    num_heads: int | None = None
    """Attention heads of a transformer backbone; a ``map`` pooling head takes as many, and the blocks' MLP width
    ratio ``mlp_ratio`` for its MLP (big_vision's MAPHead). ``None``: the head uses 8."""
    mlp_ratio: float = 4.0
    activation_checkpointing: bool = False
    """Blocks recompute their activations in the backward pass (set by ``set_activation_checkpointing``)."""
    checkpoint_prefix: str = ""
    """Prefix of this module's parameters under which checkpoint keys of the wrapped model load (``model.``
    for a timm model kept whole)."""
    token_reduction: str | None = None
    """The option that made this backbone run fewer tokens through its later blocks (``token_pruning``), named in
    errors; ``None``: every token runs through every block."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- tokens and pooled features ---------------------------------------------------------------------

    @property
    def has_tokens(self) -> bool:
        return type(self).forward_tokens is not Backbone.forward_tokens

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is not a token model; pool by 'avg' over its last feature map")

    @property
    def has_pooled(self) -> bool:
        return type(self).forward_pooled is not Backbone.forward_pooled

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[B, num_features]`` pooled by the architecture's own head (XCiT's class attention)."""
        raise TypeError(f"{type(self).__name__} has no pooling of its own; pool by 'cls', 'avg' or 'map'")

    def no_weight_decay(self) -> set[str]:
        """Names of parameters, besides norms and biases, that must not be weight-decayed."""
        return set()

    # --- checkpoints ------------------------------------------------------------------------------------

    def adapt_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Make a checkpoint tensor of another shape fit parameter ``name`` (resample a position embedding,
        adapt input channels); ``None`` when it cannot, which the loader reports as an error naming the key."""
        return None

    def derive_checkpoint_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors this model has but the checkpoint ``state`` (our names) lacks, made from the ones it has
        (a video model's temporal attention from an image model's spatial one)."""
        return {}

    # --- training past one device's memory -----------------------------------------------------------------

    @property
    def supports_activation_checkpointing(self) -> bool:
        return type(self).set_activation_checkpointing is not Backbone.set_activation_checkpointing

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Keep only each block's input in the forward pass and recompute the block in the backward pass (memory
        for about a third more compute); exact, dropout included. A backbone without it raises when asked: a run
        that was meant to fit in memory must not start without it."""
        if enabled:
            raise TypeError(
                f"{type(self).__name__} does not support activation checkpointing; set activation_checkpointing: false "
                "or use a backbone that does (ViT, DeiT, TimeSformer, UNETR, MiT)"
            )

    def sharding_units(self) -> list[nn.Module]:
        """Sub-modules FSDP shards as units of their own, each gathered only while it runs (the transformer blocks);
        the rest forms one unit with the head. Default: none, the whole model is one unit."""
        return []

    # --- token reduction (backbones.token_reduction) -------------------------------------------------------

    def fine_tuning(self) -> FineTuning:
        """The optimisation the task gives this backbone and its head: by default one network trained as a whole."""
        return FineTuning()

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters the task keeps fixed (a pruned ViT's class token and position embeddings); default none."""
        return []

    def token_keep_weights(self) -> torch.Tensor | None:
        """How much each token returned by the last ``forward_tokens`` counts in a pooling head, ``[B, prefix + N]``
        (1 kept, 0 dropped: in training a pruned backbone returns its dropped tokens too); ``None``: all count."""
        return None

    def training_logs(self) -> dict[str, torch.Tensor]:
        """Scalars of the last training forward pass that the task logs as ``train/<name>`` beside the losses
        (DynamicViT's ``kept_fraction_<stage>``); default none."""
        return {}

    @property
    def distils_tokens(self) -> bool:
        """A task with a teacher adds token distillation (``distillation_tokens``) to its objective."""
        return type(self).distillation_tokens is not Backbone.distillation_tokens

    def distillation_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a token-distillation loss compares with a dense teacher's final patch tokens: from ``tokens``, the
        output of the last ``forward_tokens``, the patch tokens on the teacher's grid ``[B, N, C]`` and their
        weights ``[B, N]`` (``None``: all count)."""
        raise TypeError(f"{type(self).__name__} has no tokens to distil apart from its logits")

    def token_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What ``predict`` can draw of the last forward pass over ``x``: per stage, a map ``[B, *grid]`` over the
        input's patch grid, 1 where a patch still runs through the blocks, 0 where it was dropped; or an integer map of
        merge groups (a merging ViT: patches with the same value ended in one token); default none."""
        return []

    # --- dynamic networks -------------------------------------------------------------------------------

    @property
    def is_dynamic(self) -> bool:
        return type(self).sample_subnet is not Backbone.sample_subnet

    def set_epoch(self, epoch: int) -> None:
        """The training epoch the next draws belong to (a super-network widens its choices over the first epochs);
        called before every ``sample_subnet``, so a resumed run knows it too."""

    def sample_subnet(self, generator: torch.Generator) -> Any:
        """Draw the dynamic choices of the next training step (a sub-network) from ``generator`` alone, so
        every process and a resumed run draw the same ones; a fixed network has none (``None``)."""
        return None

    def set_subnet(self, config: Any) -> None:
        """Make ``config`` (from ``sample_subnet``, or ``None`` for the full network) the active sub-network."""
        if config is not None:
            raise TypeError(f"{type(self).__name__} is a fixed network; it has no sub-network {config!r}")

    def training_passes(self) -> SubnetPasses | None:
        """The sub-networks the current training step runs in turn (set by ``set_subnet``); ``None``: one pass."""
        return None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected layout when ``x`` does not fit this backbone."""
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.in_chans:
            layout = "[B, C, H, W]" if self.spatial_dims == 2 else "[B, C, D, H, W] or video [B, C, T, H, W]"
            raise ValueError(
                f"{type(self).__name__} expects input {layout} with C={self.in_chans}, got shape {tuple(x.shape)}"
            )


# --- super-networks: what a network search needs (search/) ---------------------------------------------------------

from collections.abc import Callable, Sequence  # noqa: E402  (this block's own)

Gene = tuple[str, tuple[Any, ...]]
"""A searchable choice of a super-network: its name (``embed_dims[1]``, ``keep[2][3]``) and its values, largest first."""


@dataclass(frozen=True)
class LatencyPart:
    """A part of a sub-network whose latency a table measures once, for every sub-network that has it: ``key`` names
    it (one key, one module and input shape), ``build()`` makes it in its inference form with an input,
    ``(module, args)``, so that ``module(*args)`` is what it costs."""

    key: str
    build: Callable[[], tuple[nn.Module, tuple[Any, ...]]]


@dataclass(frozen=True)
class Reduction:
    """One step of pruning a sub-network (MES pruning): what it does (``drop block 2.3``) and where it leads."""

    action: str
    config: Any


def changed_config(config: dict[str, list], field: str, stage: int, block: int | None, value: Any) -> dict[str, list]:
    """A copy of the sub-network ``config`` (per-stage lists, or per-stage lists of per-block values) with
    ``config[field][stage]`` (``block`` None) or ``config[field][stage][block]`` set to ``value``: the step of a
    ``Reduction``."""
    new = {key: [list(row) if isinstance(row, list) else row for row in rows] for key, rows in config.items()}
    if block is None:
        new[field][stage] = value
    else:
        new[field][stage][block] = value
    return new


class SubnetSpace(Protocol):
    """What a super-network's search space answers (``Supernet.space``); configs are plain lists and numbers."""

    def genes(self) -> list[Gene]: ...

    def decode(self, values: Sequence[Any]) -> Any: ...

    def encode(self, config: Any) -> tuple[Any, ...]: ...

    def extreme(self, largest: bool) -> Any: ...

    def reductions(self, config: Any) -> list[Reduction]: ...


class Supernet(Backbone):
    """A backbone holding the weights of the largest network of a search space, any sub-network of which it runs
    (``set_subnet``) and cuts out as an ordinary backbone with sliced weights (``extract``): the contract a network
    search (``search/``) works through, whichever the space.

    A sub-network is a ``config`` in the super-network's own terms, plain lists and numbers (YAML and JSON). The
    space is a list of genes (``search_space``), each a choice with its values largest first, so evolution can
    sample, mutate and cross over gene values, which ``subnet`` turns into a config (``subnet_genes`` the other
    way). Training draws come from ``sample_subnet`` and ``set_subnet`` (``Backbone``'s dynamic hooks).

    A subclass sets ``subnet_preset`` (the registered preset whose class an extracted sub-network is; the ``backbone``
    of a found network's YAML), ``fixed_kwargs`` (the architecture arguments every sub-network shares) and ``space``,
    to which the search-space methods below hand their work.
    """

    space: SubnetSpace
    """The search space: its genes, configs and reductions (``SubnetSpace``)."""
    subnet_preset: str
    """The preset an extracted sub-network is built by, with ``arch_kwargs`` as its ``backbone_kwargs``."""
    fixed_kwargs: dict[str, Any]
    """Architecture arguments every sub-network shares (input size and channels, fixed widths)."""

    # --- the search space -----------------------------------------------------------------------------------

    def search_space(self) -> list[Gene]:
        """Every choice, in a fixed order: ``(name, values)``, values largest first."""
        return self.space.genes()

    def subnet(self, genes: Sequence[Any]) -> Any:
        """The sub-network of gene values (one per ``search_space`` entry, in its order)."""
        return self.space.decode(genes)

    def subnet_genes(self, config: Any) -> tuple[Any, ...]:
        """The gene values of ``config``; a ValueError naming the choice and its values when it lies outside."""
        return self.space.encode(config)

    def extreme_subnet(self, largest: bool) -> Any:
        """The largest sub-network (every first value) or the smallest (every last value)."""
        return self.space.extreme(largest)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input as every sub-network is built, counted and timed for, ``(C, H, W)`` (``fixed_kwargs``'
        ``in_chans`` and ``img_size``)."""
        return (self.fixed_kwargs["in_chans"], *self.fixed_kwargs["img_size"])

    # --- one sub-network --------------------------------------------------------------------------------------

    def extract(self, config: Any) -> Backbone:
        """The sub-network as an ordinary backbone (of ``subnet_preset``'s class) with weights sliced from (copies
        of) the super-network's: it gives the outputs the super-network gives running ``config``."""
        raise NotImplementedError

    def arch_kwargs(self, config: Any) -> dict[str, Any]:
        """The ``backbone_kwargs`` of ``subnet_preset`` that build the sub-network (``fixed_kwargs`` included)."""
        raise NotImplementedError

    def describe(self, config: Any) -> dict[str, Any]:
        """The sub-network as a task's YAML names it: ``{"backbone": preset, "backbone_kwargs": {...}}``."""
        return {"backbone": self.subnet_preset, "backbone_kwargs": self.arch_kwargs(config)}

    def macs_params(self, config: Any) -> tuple[int, int]:
        """MACs of the sub-network's forward pass on one input of the built size (matrix products, convolutions and
        attention, as ``torch.utils.flop_counter`` counts them) and its parameters, without building it."""
        raise NotImplementedError

    def latency_parts(self, config: Any, batch_size: int) -> list[LatencyPart]:
        """The parts whose latencies add up to the sub-network's, at ``batch_size`` (a latency table times each
        distinct key once): so no search code names a block class."""
        raise NotImplementedError

    def reductions(self, config: Any) -> list[Reduction]:
        """Every one-step reduction of ``config`` that pruning may take (drop a block, narrow a stage, fewer heads, a
        smaller MLP), each still in the space."""
        return self.space.reductions(config)
