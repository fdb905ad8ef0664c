"""``export``: a trained task model as ONNX, TorchScript or safetensors, each file checked right after writing.

``python -m tasks.<task> export --config ... --ckpt_path .../last.ckpt --export.format onnx``

- ONNX: torch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``), opset 17, a dynamic batch axis
  (and dynamic height and width for segmentation). Chosen over the ``dynamo=True`` exporter because, on these
  models under torch 2.14, it exports in 0.2-1.6 s where dynamo takes 3-25 s, and needs no ``onnxscript``; both gave
  onnxruntime outputs within 1e-5 of PyTorch, but dynamo's graph without its optimisation pass failed to run
  in onnxruntime (UNETR's Conv3d bias). The file is run with onnxruntime and compared with PyTorch.
- TorchScript: ``torch.jit.trace``, reloaded with ``torch.jit.load`` and compared the same way.
- safetensors: the state dict, with the hyperparameters and class names as metadata; ``--model.pretrained
  file.safetensors`` loads it. Checked by reading it back through our checkpoint loader.

ONNX and safetensors files carry in their metadata what it takes to feed them as ``predict`` feeds the model: the
task, the class names, the input layout and size, the channel order, the normalisation (``pixel_scale``, ``mean``,
``std``) and the data's evaluation settings (``input_metadata``).

Every check runs the sample input (batch 2), a batch of 3 and, for segmentation, another height and width, and
prints the largest absolute difference. A file is written under a temporary name beside its destination, checked,
then renamed (``atomic_write``): a failed check leaves no file. The model exported is its inference form (eval
mode; a token-pruned ViT gathers its kept tokens; a super-network runs its full network); the medical model takes
one ROI window, the sliding window over a whole volume stays outside the graph.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.module import _jit_is_scripting

from datamodules.io import atomic_write

ExportFormat = Literal["onnx", "torchscript", "safetensors"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
ONNX_OPSET = 17
TaskKind = Literal["classification", "video", "segmentation", "medical"]


class ExportCheckError(RuntimeError):
    """The exported file's outputs differ from PyTorch's by more than the tolerance; nothing was written."""


@dataclass(frozen=True)
class ExportOptions:
    """What ``export`` writes.

    Args:
        format: ``onnx``, ``torchscript`` or ``safetensors``.
        output: the file to write; by default beside the checkpoint (``last.ckpt`` -> ``last.onnx``), or
            ``<trainer.default_root_dir>/export/model.<suffix>`` without one.
        input_size: the sample input's size without batch and channels (``[H, W]``, ``[T, H, W]`` for video,
            ``[D, H, W]`` for 3-D); by default what the data feeds the model (``data.image_size``,
            ``data.crop_size``, ``data.num_frames``, the medical ROI ``data.roi_size``).
        opset: the ONNX opset version.
        atol: the largest absolute difference from PyTorch's outputs that the check after writing accepts.
    """

    format: ExportFormat = "onnx"
    output: str | None = None
    input_size: tuple[int, ...] | None = None
    opset: int = ONNX_OPSET
    atol: float = 1e-4


class TaskTrainer(L.Trainer):
    """Lightning's ``Trainer`` with one more entry point for the CLI: ``export``."""

    def run_export(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        export: ExportOptions = ExportOptions(),
    ) -> Path:
        """Export the model as ONNX, TorchScript or safetensors, checked against PyTorch right after writing.

        Args:
            model: the task model the config builds.
            datamodule: the data, whose input size the sample input takes.
            ckpt_path: the run's checkpoint whose weights are exported (``last``: ``<checkpoint.dirpath>/last.ckpt``).
                Without it the config's model is exported if ``--model.pretrained`` gives its weights; random
                weights are refused.
            export: the format, the file and the check's tolerance.
        """
        if export.format not in FORMATS:
            raise ValueError(f"unknown export format {export.format!r}; choose one of {', '.join(FORMATS)}")
        if ckpt_path == "last" and self.checkpoint_callback is not None and self.checkpoint_callback.dirpath:
            ckpt_path = os.path.join(self.checkpoint_callback.dirpath, "last.ckpt")
        if ckpt_path:
            load_run_checkpoint(model, ckpt_path)
        elif not model.hparams.get("pretrained"):
            raise ValueError(
                "export needs trained weights: give --ckpt_path (a run's .ckpt) or --model.pretrained (a weights "
                "file); without either the model has its random initial weights"
            )
        output = Path(export.output or default_output(ckpt_path, self.default_root_dir, export.format))
        input_size = tuple(export.input_size) if export.input_size else default_input_size(model, datamodule)
        return export_model(
            model, export.format, output, input_size=input_size, opset=export.opset, atol=export.atol,
            input_info=input_metadata(task_kind(model), datamodule, input_size),
        )

    # the subcommand; jsonargparse names the method's argument group after the function, so the function is not
    # called ``export``, which would clash with the ``--export.*`` options group
    export = run_export


def load_run_checkpoint(model: L.LightningModule, path: str | Path) -> None:
    """Load a Lightning checkpoint of a run (read with ``weights_only=True``) into ``model``, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickled objects...: the user needs the file and the reason
        raise ValueError(f"--ckpt_path {path} cannot be read: {type(err).__name__}: {err}") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(
            f"--ckpt_path {path} is not a Lightning checkpoint of a run (it has no 'state_dict'); a plain weights "
            f"file is exported with --model.pretrained {path}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"--ckpt_path {path} does not fit the model the config builds: {err}") from err
    model.on_load_checkpoint(checkpoint)


def default_output(ckpt_path: str | None, root: str | Path, fmt: str) -> Path:
    """Beside the checkpoint, with the format's suffix; without one, ``<root>/export/model<suffix>``."""
    if ckpt_path:
        return Path(ckpt_path).with_suffix(SUFFIXES[fmt])
    return Path(root) / "export" / f"model{SUFFIXES[fmt]}"


def task_kind(model: torch.nn.Module) -> TaskKind:
    """Which of the four tasks ``model`` is, by class name: ``python -m tasks.<task>`` runs the task's file as
    ``__main__``, so its classes are not the ones ``tasks.<task>`` would import."""
    names = {cls.__name__ for cls in type(model).__mro__}
    kinds: list[tuple[str, TaskKind]] = [
        ("VideoClassificationModule", "video"), ("ClassificationModule", "classification"),
        ("SegmentationModule", "segmentation"), ("MedicalSegmentationModule", "medical"),
    ]
    for name, kind in kinds:
        if name in names:
            return kind
    raise TypeError(f"export takes a model of one of the four tasks, not {type(model).__name__}")


def default_input_size(model: torch.nn.Module, datamodule: L.LightningDataModule | None) -> tuple[int, ...]:
    """What the data feeds the model: the classification image size, the video clip (frames, crop, crop), the
    segmentation crop, the medical ROI window (one window: the sliding window stays outside the exported graph)."""
    kind = task_kind(model)
    if kind == "medical":
        return tuple(model.roi_size)
    hp = datamodule.hparams if datamodule is not None else {}
    if kind == "video" and "num_frames" in hp and "crop_size" in hp:
        return (hp["num_frames"], hp["crop_size"], hp["crop_size"])
    if kind == "segmentation" and "crop_size" in hp:
        return tuple(hp["crop_size"])
    if kind == "classification" and "image_size" in hp:
        return (hp["image_size"], hp["image_size"])
    raise ValueError(f"set --export.input_size: the {kind} data gives no input size to export at")


# the data module's evaluation settings a user needs to prepare an input as ``predict`` does, per task
EVAL_SETTINGS: dict[str, tuple[str, ...]] = {
    "classification": ("interpolation",),
    "video": ("sampling", "sampling_rate", "target_fps", "test_clips", "test_crops"),
    "segmentation": ("eval_scale", "reduce_zero_label", "ignore_index"),
    "medical": ("intensity", "ct_window", "spacing"),
}


def input_metadata(kind: TaskKind, datamodule: L.LightningDataModule | None, input_size: Sequence[int]) -> dict[str, str]:
    """How to feed the exported graph as the data feeds the model, each value JSON: ``input_size`` (without batch
    and channels), ``channel_order``, and for images ``pixel_scale``, ``mean`` and ``std`` (the input is
    ``(pixels / pixel_scale - mean) / std``, channel first), classification's ``resize_short_side`` and centre crop,
    and the data's other evaluation settings (``EVAL_SETTINGS``)."""
    hp = dict(datamodule.hparams) if datamodule is not None else {}
    info: dict[str, Any] = {"input_size": list(input_size)}
    if kind == "medical":
        info["channel_order"] = "the modality order of dataset.json"
    else:
        info |= {"channel_order": "RGB", "pixel_scale": 255}
        info |= {k: list(hp[k]) for k in ("mean", "std") if hp.get(k) is not None}
    if kind == "classification" and {"image_size", "crop_pct"} <= hp.keys():
        info["resize_short_side"] = round(hp["image_size"] / hp["crop_pct"])
        info["center_crop"] = [hp["image_size"], hp["image_size"]]
    info |= {k: hp[k] for k in EVAL_SETTINGS[kind] if k in hp}
    return {k: json.dumps(v) for k, v in info.items()}


def inference_form(model: torch.nn.Module) -> torch.nn.Module:
    """The model as it runs at inference: on the CPU in float32, eval mode, a super-network's full network."""
    model = model.cpu().float().eval()
    if model.backbone.is_dynamic:
        model.backbone.set_subnet(None)
        print(f"{type(model.backbone).__name__} is a super-network: exporting its full network (what validate "
              "evaluates); a searched sub-network is exported from the search's recipe and weights", flush=True)
    return model


def sample_inputs(model: torch.nn.Module, input_size: Sequence[int], *, dynamic_hw: bool) -> list[torch.Tensor]:
    """The export's sample (batch 2) and the check's other shapes: a batch of 3 and, where height and width are
    dynamic, one more at another size (larger by the backbone's largest stride, so every stage still divides it)."""
    generator = torch.Generator().manual_seed(0)
    channels = model.backbone.in_chans
    shapes = [(2, channels, *input_size), (3, channels, *input_size)]
    if dynamic_hw:
        stride = max(info.stride[-1] for info in model.backbone.feature_info)
        height, width = input_size
        shapes.append((1, channels, height + stride, width + 2 * stride))
    return [torch.randn(shape, generator=generator) for shape in shapes]


def export_model(
    model: torch.nn.Module, fmt: str, output: str | Path, *, input_size: Sequence[int], opset: int = ONNX_OPSET,
    atol: float = 1e-4, input_info: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (a task module) as ``fmt`` to ``output``, check it against PyTorch and return the path.
    ``input_info`` (``input_metadata``) joins the file's metadata: how to prepare an input."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    kind = task_kind(model)
    model = inference_form(model)
    inputs = sample_inputs(model, input_size, dynamic_hw=kind == "segmentation")
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    metadata = {"task": kind, "class_names": json.dumps(model.class_names), "input_layout": _layout(kind)}
    metadata |= input_info or {"input_size": json.dumps(list(input_size))}
    writers: dict[str, Callable[[str], None]] = {
        "onnx": lambda tmp: write_onnx(
            model, tmp, inputs, expected, kind=kind, opset=opset, atol=atol, metadata=metadata
        ),
        "torchscript": lambda tmp: write_torchscript(model, tmp, inputs, expected, atol=atol),
        "safetensors": lambda tmp: write_safetensors(model, tmp, metadata=metadata),
    }
    path = atomic_write(output, writers[fmt])
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return path


def require_onnx() -> None:
    """Raise, before anything is exported, when the ONNX packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs onnx and onnxruntime ({err}); install them with pip install 'vision-suite[export]'"
        ) from err


def write_onnx(
    model: torch.nn.Module, path: str, inputs: list[torch.Tensor], expected: list[torch.Tensor], *, kind: TaskKind,
    opset: int, atol: float, metadata: dict[str, str],
) -> None:
    import onnx
    import onnxruntime

    axes = {0: "batch", 2: "height", 3: "width"} if kind == "segmentation" else {0: "batch"}
    with warnings.catch_warnings():
        # torch marks this exporter deprecated in favour of dynamo=True; it is the one chosen here (module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants; see the check
        torch.onnx.export(
            model, (inputs[0],), path, dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["logits"], dynamic_axes={"input": axes, "logits": axes},
        )
    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    check_outputs(f"ONNX (opset {opset}) in onnxruntime {onnxruntime.__version__}", run, inputs, expected, atol)


def write_torchscript(
    model: torch.nn.Module, path: str, inputs: list[torch.Tensor], expected: list[torch.Tensor], *, atol: float,
) -> None:
    # Lightning's own guard for tracing: its `trainer` property raises on a module without one
    with _jit_is_scripting(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants; see the check
        traced = torch.jit.trace(model, (inputs[0],), check_trace=False)
    torch.jit.save(traced, path)
    loaded = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        check_outputs("TorchScript (torch.jit.trace)", loaded, inputs, expected, atol)


def write_safetensors(model: torch.nn.Module, path: str, *, metadata: dict[str, str]) -> None:
    """The state dict (each tensor cloned: safetensors refuses tensors sharing memory) with the hyperparameters,
    class names and task as metadata; read back through ``backbones.weights.read_checkpoint`` and compared."""
    from safetensors.torch import save_file

    from backbones.weights import read_checkpoint

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    hparams = json.dumps(dict(model.hparams), default=str)
    save_file(state, path, metadata={"format": "pt", "hyper_parameters": hparams, **metadata})
    back = read_checkpoint(Path(path))
    differ = sorted(set(state) ^ set(back)) + [k for k in state if k in back and not torch.equal(state[k], back[k])]
    if differ:
        raise ExportCheckError(f"{path} read back through the checkpoint loader differs in {differ[:5]}")
    print(f"safetensors check: {len(state)} tensors read back equal by the checkpoint loader", flush=True)


def check_outputs(
    what: str, run: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor], expected: list[torch.Tensor],
    atol: float,
) -> None:
    """Run each input through the exported file; print and check the largest absolute difference from PyTorch."""
    results = []
    for x, ref in zip(inputs, expected):
        out = run(x)
        shape = "x".join(str(s) for s in x.shape[2:])
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportCheckError(
                f"{what}: output shape {tuple(out.shape)} for input {tuple(x.shape)}, PyTorch gives {tuple(ref.shape)}"
            )
        diff = float((out.float() - ref.float()).abs().max())
        results.append((x.shape[0], shape, diff))
    shown = "; ".join(f"batch {b} at {s}: max abs diff {d:.2e}" for b, s, d in results)
    print(f"{what} against PyTorch: {shown} (tolerance {atol:g})", flush=True)
    worst = max(d for _, _, d in results)
    if not worst <= atol:  # also catches NaN
        raise ExportCheckError(
            f"{what}: outputs differ from PyTorch's by {worst:.3e} > {atol:g}; the file was not written"
        )


def _layout(kind: TaskKind) -> str:
    return {"video": "B,C,T,H,W", "medical": "B,C,D,H,W"}.get(kind, "B,C,H,W")


def export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an exported safetensors file carries: ``hyper_parameters`` and ``class_names`` decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for key in ("hyper_parameters", "class_names"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta
