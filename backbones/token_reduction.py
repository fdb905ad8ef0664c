"""Token reduction as a backbone capability: the base class of token-reducing wrappers, their registry and the
factory a task calls.

A wrapper makes a token backbone (a ViT) run fewer tokens through its later blocks, and declares what a task needs
of it through the hooks of ``Backbone`` (``fine_tuning``, ``frozen_parameters``, ``token_keep_weights``,
``training_logs``, ``distillation_tokens``, ``token_maps``; its losses through ``add_auxiliary_loss``), so task
modules never name a concrete method. A method registers a factory ``(backbone, **options) -> TokenReducer``
under its name; ``reduce_tokens`` builds one from the task's hyper-parameters, before any weights load, so
checkpoint keys of the wrapper (``backbone.predictors.*``) load as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .base import Backbone, FineTuning

TokenReducerFactory = Callable[..., "TokenReducer"]

TOKEN_REDUCTIONS: dict[str, TokenReducerFactory] = {}


class TokenReducer(Backbone):
    """Base of a token-reducing wrapper: it sets ``token_reduction`` (the option a user sets, named in errors),
    lists the modules it adds to the pretrained network (``added_modules``) and takes the optimisation recipe of
    those (``pretrained_lr_mult``, ``pretrained_frozen_epochs``) from ``reduce_tokens``. A training-free method adds
    none and trains as the network it wraps."""

    token_reduction: str
    pretrained_lr_mult: float = 1.0
    pretrained_frozen_epochs: int = 0

    def added_modules(self) -> dict[str, nn.Module]:
        """The modules the wrapper added to the pretrained network, by optimizer group name (DynamicViT's
        ``predictors``); they train at the task's ``lr``. Default: none."""
        return {}

    def fine_tuning(self) -> FineTuning:
        return FineTuning(self.added_modules(), self.pretrained_lr_mult, self.pretrained_frozen_epochs)

    def set_fine_tuning(self, pretrained_lr_mult: float = 1.0, pretrained_frozen_epochs: int = 0) -> None:
        """The pretrained network's learning rate relative to the added modules', and the first epochs it stays
        fixed; a wrapper that adds no module has nothing to set apart and refuses other values than the defaults."""
        if pretrained_lr_mult < 0 or pretrained_frozen_epochs < 0:
            raise ValueError(
                f"need pretrained_lr_mult >= 0 and pretrained_frozen_epochs >= 0, got {pretrained_lr_mult}, {pretrained_frozen_epochs}"
            )
        if not self.added_modules() and (pretrained_lr_mult != 1.0 or pretrained_frozen_epochs):
            raise ValueError(
                f"{self.token_reduction} adds no module to the pretrained network: pretrained_lr_mult and "
                "pretrained_frozen_epochs have nothing to set apart"
            )
        self.pretrained_lr_mult, self.pretrained_frozen_epochs = float(pretrained_lr_mult), int(pretrained_frozen_epochs)


def register_token_reduction(method: str, factory: TokenReducerFactory) -> None:
    """Make ``reduce_tokens(backbone, method, **options)`` call ``factory(backbone, **options)``."""
    if method in TOKEN_REDUCTIONS and TOKEN_REDUCTIONS[method] != factory:
        raise ValueError(f"a token reduction named {method!r} is already registered")
    TOKEN_REDUCTIONS[method] = factory


def reduce_tokens(
    backbone: Backbone,
    method: str | None = None,
    *,
    pretrained_lr_mult: float = 1.0,
    pretrained_frozen_epochs: int = 0,
    **options: Any,
) -> TokenReducer:
    """``backbone`` made into the token-reducing wrapper ``method`` (``dynamicvit``: ``keep_ratio``, ``prune_at``).

    Args:
        backbone: the token backbone to wrap (in place, where the method keeps parameter names).
        method: a registered token reduction (``TOKEN_REDUCTIONS``).
        pretrained_lr_mult: learning rate of the pretrained network (backbone and head) relative to the task's
            ``lr``, which the modules the method adds take.
        pretrained_frozen_epochs: the first epochs during which the pretrained network stays fixed.
        **options: the method's own settings.
    """
    factory = TOKEN_REDUCTIONS.get(method) if method is not None else None
    if factory is None:
        raise ValueError(f"token reduction needs a method, one of {sorted(TOKEN_REDUCTIONS)}; got {method!r}")
    try:
        inspect.signature(factory).bind(backbone, **options)
    except TypeError as err:
        raise ValueError(f"token reduction {method!r} takes other options than {sorted(options)}: {err}") from err
    reducer = factory(backbone, **options)
    reducer.set_fine_tuning(pretrained_lr_mult, pretrained_frozen_epochs)
    return reducer
