"""``export``: ONNX of every task run in onnxruntime equals PyTorch (dynamic batch, and height/width for
segmentation), TorchScript and safetensors round trips, the CLI subcommand, and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from backbones.weights import read_checkpoint
from datamodules.synthetic import SHAPE_CLASSES
from tasks.classification import ClassificationModule
from tasks.classification import main as classification_main
from engine.export import ExportCheckError, export_metadata, export_model, load_run_checkpoint
from tasks.medical import MedicalSegmentationModule
from tasks.segmentation import SegmentationModule
from tasks.video import VideoClassificationModule

TINY_VIT = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2}
TINY_MIT = {"embed_dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 4), "drop_path_rate": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def classifier(**kwargs) -> ClassificationModule:
    return ClassificationModule(backbone="vit_small_patch16", backbone_kwargs=TINY_VIT, num_classes=len(SHAPE_CLASSES),
                                class_names=list(SHAPE_CLASSES), **kwargs)  # the classes of the default data


def segmenter() -> SegmentationModule:
    return SegmentationModule(backbone="mit_b0", backbone_kwargs=TINY_MIT, decoder_dim=32, num_classes=4)


TASKS = {  # model, input size (without batch and channels), the other sizes the file must take
    "classification": (classifier, (32, 32), [(3, 3, 32, 32)]),
    "video": (
        lambda: VideoClassificationModule(backbone="timesformer_nano_patch8", num_classes=4,
                                          backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "num_frames": 4}),
        (4, 32, 32), [(3, 3, 4, 32, 32)],
    ),
    "segmentation": (segmenter, (64, 64), [(3, 3, 64, 64), (1, 3, 96, 32), (2, 3, 40, 72)]),
    "medical": (  # one ROI window, as the sliding window feeds it
        lambda: MedicalSegmentationModule(backbone="unetr_vit_base", num_classes=3, feature_size=8, sw_roi_size=(32, 32, 32),
                                          backbone_kwargs={**TINY_VIT, "depth": 4, "out_indices": [0, 1, 2, 3]}, in_channels=1),
        (32, 32, 32), [(3, 1, 32, 32, 32)],
    ),
}


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Weights away from their initial values (zero biases, unit norms), so a mix-up of tensors shows."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_onnx_in_onnxruntime_equals_pytorch_at_other_batch_sizes(task: str, tmp_path: Path, capsys) -> None:
    build, size, other_shapes = TASKS[task]
    model = randomise(build())
    path = export_model(model, "onnx", tmp_path / f"{task}.onnx", input_size=size)
    assert f"ONNX (opset 17) in onnxruntime {onnxruntime.__version__} against PyTorch: batch 2" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in other_shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["task"] == task and meta["input_layout"].startswith("B,C,")
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


@pytest.mark.slow
def test_token_pruned_vit_exports_its_gathering_inference_form(tmp_path: Path) -> None:
    model = randomise(ClassificationModule(backbone="vit_small_patch16", backbone_kwargs={**TINY_VIT, "depth": 4},
                                           num_classes=3, token_pruning=True, keep_ratio=0.5))
    path = export_model(model, "onnx", tmp_path / "pruned.onnx", input_size=(32, 32))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= 1e-4


TINY_SUPERNET = {
    "img_size": 56, "stem_channels": 8, "head_dims": (8, 8, 8),
    "embed_dim_choices": ((32, 24), (48, 40), (64, 56)), "head_choices": ((2, 1), (2, 1), (2, 1)),
    "mlp_hidden_choices": ((64, 32), (96, 64), (128, 96)), "depths": (2, 2, 2), "skippable": ((1,), (1,), (1,)),
}


@pytest.mark.slow
def test_super_network_exports_its_full_network_whatever_subnet_was_active(tmp_path: Path) -> None:
    model = randomise(ClassificationModule(backbone="vit_resnas_supernet_tiny", backbone_kwargs=TINY_SUPERNET, num_classes=3))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        full = model(x)
        model.backbone.set_subnet(model.backbone.sample_subnet(torch.Generator().manual_seed(1)))
        assert not torch.allclose(model(x), full, atol=1e-3)  # a sub-network active: another network
    path = export_model(model, "onnx", tmp_path / "supernet.onnx", input_size=(56, 56))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - full.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_torchscript_round_trip_takes_other_batch_and_image_sizes(tmp_path: Path) -> None:
    model = randomise(segmenter())
    path = export_model(model, "torchscript", tmp_path / "seg.torchscript.pt", input_size=(64, 64))
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 3, 96, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)


def test_safetensors_reloads_through_model_pretrained(tmp_path: Path) -> None:
    model = randomise(classifier(head_drop_rate=0.1))
    path = export_model(model, "safetensors", tmp_path / "model.safetensors", input_size=(32, 32))
    meta = export_metadata(path)
    assert meta["hyper_parameters"]["backbone_kwargs"] == TINY_VIT and meta["hyper_parameters"]["head_drop_rate"] == 0.1
    assert meta["class_names"] == list(SHAPE_CLASSES) and meta["task"] == "classification"
    reloaded = classifier(head_drop_rate=0.1, pretrained=str(path)).eval()
    assert sorted(reloaded.load_report.loaded) == sorted(k for k in model.state_dict() if k.startswith(("backbone.", "head.")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def write_run_checkpoint(model: L.LightningModule, path: Path) -> Path:
    """A checkpoint as a run writes it: state dict, hyperparameters, class names."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "class_names": model.class_names,
                "pytorch-lightning_version": L.__version__}, path)
    return path


CLI_TINY = ["--model.backbone", "vit_small_patch16", "--model.backbone_kwargs", str(TINY_VIT), "--data.image_size", "32"]


@pytest.mark.slow
def test_cli_exports_the_checkpoints_weights_beside_it(tmp_path: Path, capsys) -> None:
    model = randomise(classifier())
    ckpt = write_run_checkpoint(model, tmp_path / "last.ckpt")
    classification_main(["export", *CLI_TINY, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "max abs diff" in out and f"wrote {tmp_path / 'last.onnx'}" in out
    session = onnxruntime.InferenceSession(str(tmp_path / "last.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - model(x).numpy()).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "last.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == list(SHAPE_CLASSES)


@pytest.mark.slow
def test_cli_ckpt_path_last_is_the_runs_last_checkpoint(tmp_path: Path) -> None:
    model = randomise(classifier())
    (tmp_path / "checkpoints").mkdir()
    write_run_checkpoint(model, tmp_path / "checkpoints" / "last.ckpt")
    args = ["--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path), "--export.format", "safetensors"]
    classification_main(["export", *CLI_TINY, *args])
    state = read_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_cli_rejects_an_unknown_format_and_missing_weights(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        classification_main(["export", *CLI_TINY, "--export.format", "tflite"])
    assert "export.format" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ckpt_path .* or --model.pretrained"):
        classification_main(["export", *CLI_TINY, "--trainer.default_root_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown export format 'tflite'; choose one of onnx, torchscript, safetensors"):
        export_model(classifier(), "tflite", tmp_path / "m.tflite", input_size=(32, 32))


def test_a_plain_state_dict_as_ckpt_path_points_to_model_pretrained(tmp_path: Path) -> None:
    torch.save(classifier().state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=r"weights.pth is not a Lightning checkpoint.*--model.pretrained"):
        load_run_checkpoint(classifier(), tmp_path / "weights.pth")


def test_failed_check_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ExportCheckError, match="differ from PyTorch's"):
        export_model(classifier(), "torchscript", tmp_path / "m.torchscript.pt", input_size=(32, 32), atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vision-suite\[export\]'"):
        export_model(classifier(), "onnx", tmp_path / "m.onnx", input_size=(32, 32))
    assert list(tmp_path.iterdir()) == []
