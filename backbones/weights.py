"""Read checkpoint files, recognise their format, map their key names onto ours, load with a report.

Every format converter returns a state dict in one namespace: ``backbone.<our name>`` for encoder
weights, ``head.<our name>`` for a classifier, and ``foreign.<the file's own name>`` for the rest of a full
model (a decoder). The key maps of task heads live with the heads in ``heads/`` and are registered per
format with ``register_head_map``; they turn ``foreign.`` keys into ``head.`` ones. ``load_pretrained`` puts
the result into either a bare backbone (heads are skipped) or a task network with ``.backbone`` and ``.head``.
Tensors whose shapes differ are handed to the owning module's ``adapt_checkpoint_tensor`` (position
embeddings are resampled, input channels adapted, 2-D kernels inflated); what still does not fit raises.
A format may imply conventions of the model that made it (smp upsamples with ``align_corners=True``); the report
carries them, and a task takes them for options its config leaves unset (``LoadReport.take_conventions``).
Wherever a file is read, a Hub name (``hf-hub:<org>/<repo>``, ``timm:<model>.<tag>``) works too (``hub.py``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("state_dict", "model_state", "model", "module", "net", "params")


@dataclass(frozen=True)
class CheckpointFormat:
    """A known key layout: ``detect`` recognises it, ``convert`` renames into our namespace; ``conventions``: the
    settings of the model that made such files which are not in its tensors (``{"align_corners": True}``)."""

    name: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[[StateDict], StateDict]
    conventions: Mapping[str, Any] = field(default_factory=dict)


_FORMATS: list[CheckpointFormat] = []
_HEAD_MAPS: dict[str, Callable[[StateDict], StateDict]] = {}


def register_format(
    name: str, detect: Callable[..., bool], convert: Callable[[StateDict], StateDict], **conventions: Any
) -> None:
    """Add a checkpoint format; formats registered later are tried first. ``conventions``: model options the files
    imply (``align_corners=True``), taken by a task whose config leaves them unset."""
    _FORMATS.insert(0, CheckpointFormat(name, detect, convert, dict(conventions)))


def register_head_map(format_name: str, convert: Callable[[StateDict], StateDict]) -> None:
    """Map the ``foreign.`` keys of format ``format_name`` (names without the prefix) onto a task head's names
    (without ``head.``); keys it leaves out are not loaded (a decoder part our head does not have)."""
    _HEAD_MAPS[format_name] = convert


@dataclass
class LoadReport:
    """What happened to each key: loaded, adapted, skipped on purpose, missing or unexpected."""

    path: str
    format: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    conventions: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def take_conventions(self, options: dict[str, Any]) -> None:
        """Set each of ``options`` (a task's hyperparameters) that is ``None`` (unset) and that this format has a
        convention for to the convention's value; an option the config set keeps its value. Both are noted."""
        for key, implied in self.conventions.items():
            if key not in options:
                continue
            if options[key] is None:
                options[key] = implied
                note = f"{key}={implied} taken from the {self.format} checkpoint (the convention of its models); set {key} to choose"
            elif options[key] != implied:
                note = f"{key}={options[key]} as set in the config, although {self.format} checkpoints use {key}={implied}"
            else:
                continue
            self.notes.append(note)
            log.info(note)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} (format: {self.format})"]
        for label, keys in (
            ("adapted", self.adapted),
            ("skipped", self.skipped),
            ("missing (left at initial values)", self.missing),
            ("unexpected (ignored)", self.unexpected),
        ):
            if keys:
                lines.append(f"  {label}: {len(keys)}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
        if self.conventions:
            lines.append("  format conventions: " + ", ".join(f"{k}={v}" for k, v in self.conventions.items()))
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def read_checkpoint(path: str | Path) -> StateDict:
    """Read a state dict from ``.safetensors``, ``.npz`` (numpy, ``allow_pickle=False``: big_vision's flattened
    Flax trees) or a torch file (``weights_only=True``, plus ``argparse.Namespace``: the DeiT-style training
    checkpoints of the releases save their ``args``), unwrapping the usual containers (``state_dict``,
    ``model_state``, ``model``, ...) and ``module.`` prefixes. ``path`` may be a Hub name (``hub.py``)."""
    from .hub import resolve_pretrained

    path = resolve_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        elif path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as arrays:
                obj = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in arrays.files}
        else:  # training checkpoints of the papers' releases keep their argparse.Namespace beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the loaders raise many types; the user needs the file and the reason
        raise ValueError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err}. Files are read with "
            "torch.load(weights_only=True) or safetensors; a checkpoint holding pickled objects must be "
            "re-saved as a plain state dict (torch.save(model.state_dict(), path))."
        ) from err
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors (top-level keys: {_keys(obj)})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def detect_format(state: Mapping[str, torch.Tensor]) -> CheckpointFormat:
    for fmt in _FORMATS:
        if fmt.detect(state):
            return fmt
    raise ValueError(
        f"unrecognised checkpoint layout (first keys: {_keys(state)}); known formats: "
        f"{', '.join(f.name for f in _FORMATS)}"
    )


def load_pretrained(
    target: nn.Module, path: str | Path, *, load_head: bool = True, state: StateDict | None = None
) -> LoadReport:
    """Load a checkpoint file into a backbone or a task network (``.backbone`` + ``.head``).

    Head tensors whose shape differs from ours (another number of classes) are skipped, as in
    fine-tuning; a backbone tensor that cannot be adapted raises a ValueError naming the key. ``state``: the
    file's tensors when the caller has already read them (``read_checkpoint(path)``), so it is not read twice.
    ``path`` may be a Hub name (``hf-hub:<org>/<repo>[/<file>]``, ``timm:<model>.<tag>``), read from the cache.
    """
    from .base import Backbone
    from .hub import resolve_pretrained

    source = str(path)
    if state is None:
        resolved = resolve_pretrained(path)
        source = source if str(resolved) == source else f"{source} ({resolved})"
        state = read_checkpoint(resolved)
    fmt = detect_format(state)
    try:
        converted = fmt.convert(state)
    except ValueError as err:  # a layout of the format this code does not take (a distillation model ...)
        raise ValueError(f"checkpoint {source} (format {fmt.name}): {err}") from err
    backbone = target if isinstance(target, Backbone) else target.backbone
    is_task = backbone is not target
    report = LoadReport(path=source, format=fmt.name, conventions=dict(fmt.conventions))
    act = fmt.conventions.get("mlp_act")  # a backbone option, fixed when it was built: named, not changed
    if act is not None and getattr(backbone, "mlp_act", act) != act:
        report.notes.append(
            f"{fmt.name} models compute their MLPs with mlp_act={act}, this backbone with mlp_act={backbone.mlp_act}: "
            f"set backbone_kwargs mlp_act: {act} to compute as they do"
        )
        log.warning(report.notes[-1])
    foreign = {k.removeprefix("foreign."): v for k, v in converted.items() if k.startswith("foreign.")}
    converted = {k: v for k, v in converted.items() if not k.startswith("foreign.")}
    if foreign and fmt.name in _HEAD_MAPS:
        converted.update({f"head.{k}": v for k, v in _HEAD_MAPS[fmt.name](foreign).items()})
    elif foreign:
        where = report.unexpected if is_task else report.skipped
        where.extend(f"{k} (no head key map for format {fmt.name})" for k in foreign)
    # e.g. a video ViT's temporal attention initialised from an image ViT's spatial one
    local = {k.removeprefix("backbone."): v for k, v in converted.items() if k.startswith("backbone.")}
    derived = {f"backbone.{k}": v for k, v in backbone.derive_checkpoint_tensors(local).items()}
    converted.update(derived)
    report.adapted.extend(f"{k} (derived)" for k in derived)
    ours = target.state_dict()
    to_load: StateDict = {}
    for key, tensor in converted.items():
        part = key.split(".", 1)[0]
        if part == "head" and (not is_task or not load_head):
            report.skipped.append(key)
            continue
        if part == "backbone":  # a wrapper backbone (timm:) keeps the foreign model under a prefix
            key_local = backbone.checkpoint_prefix + key[len("backbone."):]
            name = f"backbone.{key_local}" if is_task else key_local
        else:
            name = key
        if name not in ours:
            report.unexpected.append(key)
            continue
        if tensor.shape != ours[name].shape:
            if part == "head":
                report.skipped.append(f"{key} (checkpoint {tuple(tensor.shape)}, model {tuple(ours[name].shape)})")
                continue
            adapted = backbone.adapt_checkpoint_tensor(name.removeprefix("backbone."), tensor)
            if adapted is None or adapted.shape != ours[name].shape:
                raise ValueError(
                    f"checkpoint {path}: tensor {key!r} has shape {tuple(tensor.shape)} but the model's "
                    f"{name!r} has {tuple(ours[name].shape)}; the checkpoint was made for another architecture "
                    "(check the preset and its embed_dim/depth/patch_size)"
                )
            tensor = adapted
            report.adapted.append(key)
        to_load[name] = tensor.to(ours[name].dtype)
    if not to_load:
        raise ValueError(f"checkpoint {path} (format {fmt.name}) has no tensor that fits this model")
    try:
        target.load_state_dict(to_load, strict=False)
    except ValueError as err:  # a module refusing an outdated layout (a map head without its norm)
        raise ValueError(f"checkpoint {path}: {err}") from err
    report.loaded = sorted(to_load)
    prefix_ok = ("backbone.", "head.") if is_task else ("",)
    report.missing = sorted(k for k in ours if k not in to_load and k.startswith(prefix_ok))
    log.info(report.summary())
    return report


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def _keys(obj: object) -> list[str]:
    return list(obj)[:6] if isinstance(obj, Mapping) else [type(obj).__name__]


# --- formats -------------------------------------------------------------------------------------------


def _convert_ours(state: StateDict) -> StateDict:
    """Our own checkpoints: a Lightning ``.ckpt`` or a saved task network (``backbone.``/``head.``)."""
    stripped = {k.removeprefix("model."): v for k, v in state.items()}
    return {k: v for k, v in stripped.items() if k.split(".", 1)[0] in ("backbone", "head")}


def _is_timm_vit(state: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and "blocks.0.attn.qkv.weight" in state


def convert_timm_classifier(state: StateDict) -> StateDict:
    """A timm model whose backbone uses timm's names as ours do (``VisionTransformer``, DeiT's
    ``VisionTransformerDistilled``, ``EfficientFormerV2``): its classifier ``head`` maps onto our head's ``fc``, a
    distillation classifier ``head_dist`` onto ``fc_dist``, attention pooling / ``fc_norm`` into the head."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("head."):
            out["head.fc." + key.removeprefix("head.")] = value
        elif key.startswith("head_dist."):
            out["head.fc_dist." + key.removeprefix("head_dist.")] = value
        elif key.startswith(("attn_pool.", "fc_norm.")):
            out["head." + key] = value
        else:
            out["backbone." + key] = value
    return out


def _is_timesformer_release(state: Mapping[str, torch.Tensor]) -> bool:
    return "model.patch_embed.proj.weight" in state and "model.blocks.0.attn.qkv.weight" in state


def _convert_timesformer_release(state: StateDict) -> StateDict:
    """facebookresearch/TimeSformer ``.pyth`` files: ``model_state`` (unwrapped by ``read_checkpoint``)
    holding timm-style names under ``model.``, plus ``time_embed`` and ``blocks.N.temporal_*``, which are
    our names too."""
    return convert_timm_classifier({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})


def _convert_plain(state: StateDict) -> StateDict:
    """Any other state dict (a timm model's, a bare backbone's): names kept, a ``head.`` classifier is ours."""
    return {(f"head.fc.{k[5:]}" if k.startswith("head.") else f"backbone.{k}"): v for k, v in state.items()}


register_format("plain", lambda s: True, _convert_plain)
register_format("timm-vit", _is_timm_vit, convert_timm_classifier)
register_format("timesformer-release", _is_timesformer_release, _convert_timesformer_release)
register_format("vision-suite", lambda s: any(k.startswith(("backbone.", "model.backbone.")) for k in s), _convert_ours)
