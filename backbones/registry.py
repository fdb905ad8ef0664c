"""The registry of named backbone presets: ``register`` a preset function, ``create_backbone`` by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .base import Backbone

_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Register a preset function under its own name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"backbone {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Names accepted by ``create_backbone`` (besides any ``timm:<model name>``)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, *, pretrained: str | None = None, **kwargs: Any) -> Backbone:
    """Build a backbone by name and optionally load a checkpoint file into it.

    Args:
        name: a registered preset (``list_backbones()``) or ``timm:<model name>``.
        pretrained: path of a checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``/``.pyth``) in one of
            the formats ``backbones.weights`` knows; key names are mapped onto ours.
        **kwargs: overrides of the preset's architecture; unknown names raise a TypeError.
    """
    if name.startswith("timm:"):
        from .timm import TimmBackbone

        model: Backbone = TimmBackbone(name.removeprefix("timm:"), **kwargs)
    else:
        if name not in _REGISTRY:
            import difflib

            close = difflib.get_close_matches(name, list_backbones(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown backbone {name!r}.{hint} Registered: {', '.join(list_backbones())}; "
                "any timm model works as 'timm:<model name>'."
            )
        fn = _REGISTRY[name]
        params = inspect.signature(fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise TypeError(f"backbone {name!r} got unknown arguments {unknown}; it accepts {sorted(params)}")
        model = fn(**kwargs)
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model, pretrained)
    return model


def build_preset(cls: type[Backbone], defaults: dict[str, Any], overrides: dict[str, Any]) -> Backbone:
    """Merge a preset's architecture with the caller's overrides, rejecting names ``cls`` does not take."""
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"{cls.__name__} got unknown arguments {unknown}; it accepts {sorted(accepted)}")
    return cls(**{**defaults, **overrides})
