"""Decathlon-format data: the synthetic writer, folds, CT and multi-channel MRI batches, the up-front check."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.common import DataError
from datamodules.medical import MedicalDataModule, collate_volumes, split_folds
from datamodules.synthetic_volumes import CLASS_NAMES, write_decathlon_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


SMALL = dict(spacing=(3.0, 3.0, 3.0), roi_size=(16, 16, 16), num_samples=2, batch_size=2, num_workers=0)


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    write_decathlon_folder(root, num_train=5, num_test=1, size=32)
    return root


def copy_set(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_synthetic_set_is_decathlon_shaped(ct_root):
    meta = json.loads((ct_root / "dataset.json").read_text())
    assert meta["labels"] == {str(i): n for i, n in enumerate(CLASS_NAMES)} and meta["modality"] == {"0": "CT"}
    assert len(meta["training"]) == 5 and len(meta["test"]) == 1
    image = nib.load(ct_root / meta["training"][1]["image"])
    label = np.asanyarray(nib.load(ct_root / meta["training"][1]["label"]).dataobj)
    zooms = image.header.get_zooms()
    assert zooms[2] > zooms[0] * 1.2  # anisotropic: thicker slices
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # every third case is stored in LPS order
    assert set(np.unique(label)) == set(range(len(CLASS_NAMES)))


def test_num_classes_without_writing_anything(tmp_path, monkeypatch, ct_root):
    monkeypatch.setenv("VISION_SUITE_CACHE", str(tmp_path / "cache"))
    dm = MedicalDataModule()
    assert dm.num_classes == 5 and dm.in_channels == 1 and dm.intensity == "ct"
    assert not (tmp_path / "cache").exists()
    assert MedicalDataModule(str(ct_root)).num_classes == 5


def test_folds_are_disjoint_and_cover_the_set():
    entries = [{"image": f"{i}.nii.gz", "label": f"l{i}.nii.gz"} for i in range(11)]
    held = []
    for fold in range(3):
        train, val = split_folds(entries, fold, 3, seed=1)
        assert not {e["image"] for e in train} & {e["image"] for e in val}
        held += [e["image"] for e in val]
    assert sorted(held) == sorted(e["image"] for e in entries)
    assert split_folds(entries, 0, 3, seed=1) == split_folds(entries, 0, 3, seed=1)
    keyed = [{**e, "fold": i % 2} for i, e in enumerate(entries)]
    assert [e["image"] for e in split_folds(keyed, 1, 2, seed=0)[1]] == [f"{i}.nii.gz" for i in range(1, 11, 2)]


def test_ct_batches(ct_root):
    dm = MedicalDataModule(str(ct_root), fold=0, num_folds=5, **SMALL)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 1, 16, 16, 16)  # 2 volumes x 2 crops
    assert batch["target"].shape == (4, 1, 16, 16, 16) and batch["target"].max() < 5
    assert -0.1 - 1e-6 <= batch["input"].min() and batch["input"].max() <= 1.1 + 1e-6  # window to [0, 1], shift 0.1
    val = next(iter(dm.val_dataloader()))
    assert val["input"].shape[2:] == val["target"].shape[2:]
    np.testing.assert_allclose(val["spacing"][0].numpy(), [3.0, 3.0, 3.0], atol=1e-6)



def test_one_volume_is_batched_as_views_equal_to_the_stacked_batch(ct_root):
    """A whole volume (evaluation) reaches the model without a copy: input and uint8 labels are views of the cached
    item, and every field equals that of the stacked (general) batch."""
    dm = MedicalDataModule(str(ct_root), fold=0, num_folds=5, **SMALL)
    dm.setup("validate")
    item = dm.datasets["val"][0]
    batch, stacked = collate_volumes([item]), collate_volumes([item, item])
    assert batch["input"].data_ptr() == item["image"].data_ptr()
    assert batch["target"].dtype == torch.uint8 and batch["target"].data_ptr() == item["label"].data_ptr()
    assert batch.keys() == stacked.keys()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == stacked[key].dtype and torch.equal(value, stacked[key][:1]), key
        else:
            assert value == stacked[key][:1], key

def test_multichannel_mri(tmp_path):
    write_decathlon_folder(tmp_path, num_train=3, num_test=1, size=32, channels=2)
    dm = MedicalDataModule(str(tmp_path), fold=0, num_folds=3, **SMALL)
    assert dm.in_channels == 2 and dm.intensity == "mri"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 2, 16, 16, 16)
    dm.setup("predict")
    item = next(iter(dm.predict_dataloader()))
    assert item["input"].shape[1] == 2 and "target" not in item


def break_case(root: Path, kind: str) -> str:
    """Spoil the first training case and return the file that should be named."""
    entry = json.loads((root / "dataset.json").read_text())["training"][0]
    image, label = root / entry["image"], root / entry["label"]
    if kind == "missing":
        image.unlink()
        return str(image)
    img = nib.load(label)
    data = np.asanyarray(img.dataobj).copy()
    if kind == "shape":
        data = data[:, :, :-2]
    else:
        data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, img.affine), str(label))
    return str(label)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("missing", "file not found"), ("shape", "differs from its image"), ("value", "declares 5 classes")],
)
def test_bad_input_is_named(tmp_path, ct_root, kind, message):
    root = copy_set(ct_root, tmp_path / "set")
    culprit = break_case(root, kind)
    dm = MedicalDataModule(str(root), fold=0, num_folds=5, **SMALL)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert culprit in str(err.value) and message in str(err.value)
