"""The command line says where things went (fit: run folder, checkpoints, curves, TensorBoard; test: the metrics
file; predict: the predictions folder), Lightning's advertising tips stay silent, and an exported ONNX file's
metadata are enough to reproduce ``predict``'s probabilities with onnxruntime alone, by the docs' own example."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
from pathlib import Path

import lightning_utilities.core.rank_zero
import numpy as np
import pytest

from datamodules.synthetic import shape_image
from engine.run_summary import TIP_PREFIX, silence_lightning_tips
from tasks.classification import main as classification_main
from tests.cli_runs import TINY_VIT, write_shapes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PAGE = ROOT / "docs/tasks/classification.md"


def run(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        classification_main(args)
    return out.getvalue()


def said(output: str, label: str) -> Path:
    """The path a ``  <label>: <path>`` line of the summary names (it must exist)."""
    found = re.search(rf"^  {re.escape(label)}: (?:tensorboard --logdir )?(\S+)", output, flags=re.MULTILINE)
    assert found, f"no '{label}:' line in:\n{output[-3000:]}"
    path = Path(found.group(1))
    assert path.exists(), path
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """A two-step fit of a one-block ViT on 3 classes of 32x32 shapes; its common arguments and its output."""
    tmp = tmp_path_factory.mktemp("outputs")
    root = write_shapes(tmp / "shapes", train_per_class=4, val_per_class=2)
    common = [
        "--config=configs/vit_small_patch16.yaml", "--model.backbone=vit_tiny_patch16", TINY_VIT,
        "--data.image_size=32", f"--data.root={root}", "--data.batch_size=6", "--data.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp / 'runs'}",
    ]
    output = run(["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                  "--trainer.num_sanity_val_steps=0"])
    return common, output


def test_fit_says_where_its_outputs_went(trained: tuple[list[str], str]) -> None:
    _, output = trained
    folder = said(output, "run folder")
    assert said(output, "last checkpoint").name == "last.ckpt"
    assert said(output, "curves") == folder / "curves.png"
    assert said(output, "TensorBoard") == folder and list(folder.glob("events.out.tfevents.*"))
    assert "best checkpoint: none kept" in output


def test_test_and_predict_say_where_their_outputs_went(trained: tuple[list[str], str]) -> None:
    common, _ = trained
    metrics = said(run(["test", *common, "--ckpt_path=last"]), "metrics")
    assert metrics.name == "metrics.csv" and "test/top1" in metrics.read_text()
    preds = said(run(["predict", *common, "--ckpt_path=last", f"--predictions.output_dir={metrics.parent / 'p'}"]),
                 "predictions")
    assert (preds / "predictions.csv").is_file()


def test_lightning_tips_are_silenced() -> None:
    # the function Lightning's logger and checkpoint connectors print their tips with
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import rank_zero_info

    silence_lightning_tips()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = lightning_utilities.core.rank_zero.log  # Lightning points it at its own logger when imported
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        rank_zero_info(f"{TIP_PREFIX} For seamless cloud uploads and versioning, try installing litmodels")
        rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records == ["GPU available: False, used: False"]


def docs_example() -> str:
    """The onnxruntime example of the classification page, as a user copies it."""
    text = EXAMPLE_PAGE.read_text()
    found = re.search(r"<!-- onnxruntime-example -->\n```python\n(.*?)```", text, flags=re.DOTALL)
    assert found, f"{EXAMPLE_PAGE} lost its onnxruntime example"
    return found.group(1)


def test_docs_onnxruntime_example_reproduces_predict(trained: tuple[list[str], str], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    common, _ = trained
    common = [*common, "--data.crop_pct=0.8"]  # resize the short side to 40, then crop the centre 32x32
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i, kind in enumerate(("circle", "square", "triangle", "circle", "square", "triangle")):
        shape_image(rng, kind, 56).crop((0, 3 * i, 56, 47)).save(photos / f"{i}.png")  # 56 x 44..29, not square
    preds = tmp_path / "preds"
    run(["predict", *common, "--ckpt_path=last", f"--data.predict_dir={photos}", f"--predictions.output_dir={preds}"])
    onnx_file = tmp_path / "model.onnx"
    assert f"wrote {onnx_file}" in run(["export", *common, "--ckpt_path=last", f"--export.output={onnx_file}"])
    example = docs_example()
    assert len(example.strip().splitlines()) <= 15
    with open(preds / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        code = re.sub(r"^ONNX_FILE, IMAGE = .*$", f"ONNX_FILE, IMAGE = {str(onnx_file)!r}, {row['path']!r}",
                      example, count=1, flags=re.MULTILINE)
        scope: dict = {}
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(code, str(EXAMPLE_PAGE), "exec"), scope)
        name, probability = printed.getvalue().split()
        assert name == row["predicted_class"]
        assert abs(float(probability) - float(row["probability"])) <= 1e-5
