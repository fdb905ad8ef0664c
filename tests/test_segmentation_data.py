"""Segmentation data: the three layouts, label conventions, up-front checks, and the training pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.common import DataError
from datamodules.segmentation import SegmentationDataModule, detect_layout, reduce_zero
from datamodules.segmentation_transforms import RandomCropCatMax, train_pipeline
from datamodules.synthetic import cache_root


def write_pair(image: Path, mask: Path, size: tuple[int, int] = (40, 48), labels: tuple[int, ...] = (0, 1, 2),
               mask_size: tuple[int, int] | None = None) -> None:
    """An RGB image of ``size`` (h, w) and a label map striped with ``labels``."""
    rng = np.random.default_rng(0)
    h, w = size
    image.parent.mkdir(parents=True, exist_ok=True)
    mask.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image)
    mh, mw = mask_size or size
    stripes = np.array(labels, dtype=np.uint8)[(np.arange(mw) * len(labels)) // mw]
    Image.fromarray(np.broadcast_to(stripes, (mh, mw)).copy(), mode="L").save(mask)


def folders(root: Path, n: int = 2, **kw) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            write_pair(root / "images" / split / f"{i}.jpg", root / "masks" / split / f"{i}.png", **kw)
    return root


def test_layouts_are_detected_and_read(tmp_path: Path) -> None:
    ade, city = tmp_path / "ade", tmp_path / "city"
    for split in ("training", "validation"):
        write_pair(ade / "images" / split / "ADE_0001.jpg", ade / "annotations" / split / "ADE_0001.png", labels=(0, 1, 150))
    for split in ("train", "val"):
        write_pair(city / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png",
                   city / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", labels=(0, 18, 255))
    assert (detect_layout(ade), detect_layout(city), detect_layout(folders(tmp_path / "f"))) == ("ade20k", "cityscapes", "folders")

    dm = SegmentationDataModule(str(ade), crop_size=(32, 32), num_workers=0)
    assert (dm.num_classes, dm.reduce_zero_label, dm.class_names[0]) == (150, True, "wall")
    dm.setup("fit")
    sample = dm.datasets["val"][0]
    assert sample["input"].shape == (3, 40, 48) and sorted(sample["target"].unique().tolist()) == [0, 149, 255]
    assert dm.datasets["train"][0]["target"].shape == (32, 32)

    dm = SegmentationDataModule(str(city), num_workers=0)
    assert (dm.num_classes, dm.reduce_zero_label, dm.palette[0]) == (19, False, (128, 64, 128))
    dm.setup("validate")
    assert sorted(dm.datasets["val"][0]["target"].unique().tolist()) == [0, 18, 255]

    with pytest.raises(DataError, match="needs data.num_classes"):
        SegmentationDataModule(str(tmp_path / "f"))
    assert SegmentationDataModule(str(tmp_path / "f"), class_names=["a", "b", "c"]).num_classes == 3


def test_default_data_knows_its_classes_without_writing() -> None:
    dm = SegmentationDataModule(synthetic_size=24, synthetic_train=3, synthetic_val=2)
    assert dm.num_classes == 6 and dm.reduce_zero_label and dm.layout == "ade20k"
    assert not any(cache_root().glob("scenes-*-s24-n3-*"))
    dm.prepare_data()
    root = dm.data_root()
    assert len(list((root / "annotations" / "training").glob("*.png"))) == 3
    with Image.open(next((root / "annotations" / "validation").glob("*.png"))) as mask:
        assert mask.mode == "P" and mask.size == (24, 24)


def test_reduce_zero_label() -> None:
    assert reduce_zero(np.array([0, 1, 2, 150, 255], np.uint8), 255).tolist() == [255, 0, 1, 149, 255]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"without a mask:\n  .*images/val/1\.jpg: no mask \(expected .*masks/val/1\.png\)"),
        ("size", r"mask .*masks/val/1\.png is 30x20 but image .*images/val/1\.jpg is 48x40"),
        ("label", r"mask .*masks/val/1\.png has label value\(s\) \[200\] outside \[0, 19\)"),
    ],
)
def test_bad_pairs_raise_errors_naming_the_file(tmp_path: Path, kind: str, message: str) -> None:
    root = folders(tmp_path / "data", labels=(0, 5, 255))
    bad_image, bad_mask = root / "images" / "val" / "1.jpg", root / "masks" / "val" / "1.png"
    if kind == "missing":
        bad_mask.unlink()
    elif kind == "size":
        write_pair(bad_image, bad_mask, mask_size=(20, 30))
    else:
        write_pair(bad_image, bad_mask, labels=(0, 200))
    dm = SegmentationDataModule(str(root), num_classes=19, num_workers=0)
    with pytest.raises(DataError, match=message):
        dm.setup("validate")


def test_colour_mask_is_rejected(tmp_path: Path) -> None:
    root = folders(tmp_path / "data")
    Image.new("RGB", (48, 40)).save(root / "masks" / "val" / "0.png")
    with pytest.raises(DataError, match=r"masks/val/0\.png is a RGB image"):
        SegmentationDataModule(str(root), num_classes=3, num_workers=0).setup("validate")


def test_cat_max_crop_avoids_crops_of_one_class() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 48:] = 1  # class 1 only in the right quarter
    crop = RandomCropCatMax(32, 32, cat_max_ratio=0.75, tries=50)
    crop.set_random_seed(0)
    for _ in range(20):
        out = crop(image=np.zeros((64, 64, 3), np.uint8), mask=mask)["mask"]
        assert out.shape == (32, 32) and np.bincount(out.ravel(), minlength=2).max() / out.size < 0.75


def test_train_pipeline_pads_small_images_with_ignore() -> None:
    pipe = train_pipeline(crop_size=(64, 64), scale=None, ratio_range=(0.5, 0.5), cat_max_ratio=0.75, hflip=0.5,
                          photometric=True, mean=(0.5,) * 3, std=(0.5,) * 3, ignore_index=255)
    out = pipe(image=np.full((80, 80, 3), 128, np.uint8), mask=np.ones((80, 80), np.uint8))
    assert out["image"].shape == (3, 64, 64) and out["mask"].shape == (64, 64)
    assert (out["mask"][:40, :40] == 1).all() and (out["mask"][40:] == 255).all() and (out["mask"][:, 40:] == 255).all()


def test_predictions_are_written_in_the_datas_own_label_convention(tmp_path: Path) -> None:
    """Cityscapes train ids are written as predicted (ADE20K's class + 1 is in test_segmentation_task.py), in the
    Cityscapes colours; the row becomes the CSV's, in place, so no array is kept after writing."""
    city = tmp_path / "city"
    image = city / "leftImg8bit" / "val" / "aachen" / "a_leftImg8bit.png"
    write_pair(image, city / "gtFine" / "val" / "aachen" / "a_gtFine_labelTrainIds.png", labels=(0, 18))
    dm = SegmentationDataModule(str(city), num_workers=0)
    label = np.array([[0, 18], [5, 1]], dtype=np.uint8)
    row = {"index": 3, "path": str(image), "name": "aachen/a", "height": 2, "width": 2, "label": label,
           "save_overlay": False}
    written = dm.write_prediction(row, tmp_path / "out")
    assert written is row and list(row) == ["index", "path", "mask", "height", "width"]
    with Image.open(tmp_path / "out" / "masks" / "aachen" / "a.png") as mask:
        assert mask.mode == "P" and mask.getpalette()[:6] == [128, 64, 128, 244, 35, 232]
        np.testing.assert_array_equal(np.asarray(mask), label)
