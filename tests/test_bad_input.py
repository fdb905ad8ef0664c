"""Bad input caught before training and said in one line: truncated images and volumes, NaN voxels, checkpoint
files of the wrong kind, video clips no reader can decode, stale checkpoint temporaries, the CLI's error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from cli_runs import REPO, write_shapes
from PIL import Image

from datamodules.classification import ClassificationDataModule
from datamodules.errors import CheckpointError, DataError, InputError
from datamodules.medical import MedicalDataModule
from datamodules.segmentation import SegmentationDataModule
from datamodules.synthetic_videos import MOTION_CLASSES, deforming_shape_clip, write_mp4
from datamodules.synthetic_volumes import write_decathlon_folder
from datamodules.video import VideoDataModule, collate_clips
from engine.checkpointing import AtomicCheckpointIO, check_trainer_checkpoint
from engine.cli import input_errors_in_one_line

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def save_image(path: Path, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def save_mask(path: Path, size: tuple[int, int] = (40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(size, dtype=np.uint8), mode="L").save(path)
    return path


# --- images: decoded in full up front -----------------------------------------------------------------------------


def test_truncated_jpeg_fails_the_classification_check_but_not_the_header_form(tmp_path: Path, capsys) -> None:
    root = write_shapes(tmp_path / "shapes", train_per_class=2, val_per_class=1)
    bad = truncate(save_image(root / "train" / "circle" / "photo.jpg"))
    dm = ClassificationDataModule(str(root), image_size=32, num_workers=0)
    with pytest.raises(DataError, match=rf"(?s)1 unreadable image.*{bad.name}: OSError") as err:
        dm.setup("fit")
    assert err.value.one_line().startswith(f"{bad}: OSError")
    assert "checked 7 images (full) in" in capsys.readouterr().out  # and said how long it took

    ClassificationDataModule(str(root), image_size=32, num_workers=0, check_files="header").setup("fit")
    ClassificationDataModule(str(root), image_size=32, num_workers=0, check_files=False).setup("fit")


@pytest.mark.parametrize("layout", ["ade20k", "cityscapes"])
def test_truncated_segmentation_image_is_named_at_setup(tmp_path: Path, layout: str) -> None:
    root = tmp_path / layout
    if layout == "ade20k":
        image, mask = root / "images" / "validation" / "a.jpg", root / "annotations" / "validation" / "a.png"
    else:
        image = root / "leftImg8bit" / "val" / "aachen" / "a_leftImg8bit.png"
        mask = root / "gtFine" / "val" / "aachen" / "a_gtFine_labelTrainIds.png"
    save_image(image, size=(64, 64)), save_mask(mask, size=(64, 64))
    truncate(image)
    with pytest.raises(DataError, match=rf"{image.name}: OSError"):
        SegmentationDataModule(str(root), num_workers=0).setup("validate")
    SegmentationDataModule(str(root), num_workers=0, check_files="header").setup("validate")  # the fast form


# --- volumes: voxels read up front --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    write_decathlon_folder(root, num_train=5, num_test=1, size=24)
    return root


@pytest.mark.parametrize("kind", ["truncated", "nan"])
def test_bad_volume_is_named_before_training(ct_root: Path, tmp_path: Path, kind: str) -> None:
    import shutil

    root = Path(shutil.copytree(ct_root, tmp_path / "set"))
    image = sorted((root / "imagesTr").glob("*.nii.gz"))[1]
    if kind == "truncated":
        truncate(image, 0.7)
        message = "unreadable voxel data"
    else:
        volume = nib.load(image)
        data = np.asanyarray(volume.dataobj).astype(np.float32)
        data[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(data, volume.affine), str(image))
        message = "1 NaN or infinite voxel"
    small = {"spacing": (3.0, 3.0, 3.0), "roi_size": (16, 16, 16), "num_samples": 1, "num_workers": 0}
    with pytest.raises(DataError, match=message) as err:
        MedicalDataModule(str(root), **small).setup("fit")
    assert err.value.one_line().startswith(str(image))
    if kind == "nan":  # the header form reads no image voxels
        MedicalDataModule(str(root), check_files="header", cache_rate=0.0, **small).setup("fit")
    else:  # without the voxel check the file is still named when MONAI's LoadImaged fails on it (while caching)
        with pytest.raises(RuntimeError, match="applying transform") as err:
            MedicalDataModule(str(root), check_files="header", **small).setup("fit")
        assert isinstance(err.value.__cause__, DataError) and str(err.value.__cause__).startswith(f"{image}: cannot read")


# --- checkpoints given to --ckpt_path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning.pytorch.demos.boring_classes import BoringModel

    folder = tmp_path_factory.mktemp("ckpt")
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=folder, limit_val_batches=0)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(folder / "run.ckpt")
    return folder / "run.ckpt"


def test_checkpoint_of_the_wrong_kind_is_named(lightning_ckpt: Path, tmp_path: Path) -> None:
    check_trainer_checkpoint(str(lightning_ckpt))  # a real one passes
    plain = tmp_path / "weights.pth"
    torch.save({"layer.weight": torch.zeros(2, 2), "layer.bias": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match=rf"{plain}: a plain state dict of 2 tensors, not a Lightning .*--model.pretrained"):
        check_trainer_checkpoint(str(plain))
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(lightning_ckpt.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=rf"{broken}: unreadable checkpoint, truncated: its zip directory"):
        check_trainer_checkpoint("last", last_dir=tmp_path)  # `last` is checked as the file it resolves to
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        check_trainer_checkpoint(str(tmp_path / "nope.ckpt"))


def test_cli_checks_ckpt_path_before_building_the_model(tmp_path: Path) -> None:
    from tasks.classification import main

    plain = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="plain state dict"):  # raised before the full-size ViT-B is built
        main(["validate", "--model.backbone=vit_base_patch16", f"--ckpt_path={plain}", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}"])


def test_last_checkpoint_cut_in_half_falls_back_to_the_newest_readable_one(lightning_ckpt: Path, tmp_path: Path) -> None:
    data = lightning_ckpt.read_bytes()
    older, newer, last = tmp_path / "epoch=0.ckpt", tmp_path / "epoch=1.ckpt", tmp_path / "last.ckpt"
    older.write_bytes(data)
    newer.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])  # one flipped bit: torch.load takes it
    last.write_bytes(data[: len(data) // 2])
    os.utime(older, (1, 1))
    with pytest.warns(UserWarning, match=rf"{last} is unreadable \(truncated: .*\); resuming from {older}, the newest readable"):
        assert check_trainer_checkpoint("last", last_dir=tmp_path) == str(older)
    with pytest.raises(CheckpointError, match=rf"{newer}: unreadable checkpoint, corrupt: the record '.*' fails its CRC check"):
        check_trainer_checkpoint(str(newer))
    older.unlink()
    with pytest.raises(CheckpointError, match=rf"{last}: unreadable checkpoint, truncated: .*no other readable \*\.ckpt"):
        check_trainer_checkpoint("last", last_dir=tmp_path)


@pytest.mark.parametrize("option", ["ckpt_path", "model.pretrained", "model.teacher_pretrained"])
def test_cli_names_a_damaged_checkpoint_before_reading_it(lightning_ckpt: Path, tmp_path: Path, option: str) -> None:
    from tasks.classification import main

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(lightning_ckpt.read_bytes()[: lightning_ckpt.stat().st_size // 2])
    teacher = ["--model.teacher=vit_tiny_patch16"] if "teacher" in option else []
    with pytest.raises(CheckpointError, match=rf"{cut}: unreadable (checkpoint|weights file \(--{option}\)), truncated"):
        main(["fit", "--model.backbone=vit_base_patch16", f"--{option}={cut}", *teacher, "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}"])


def test_stale_checkpoint_temporaries_are_removed_when_the_next_write_starts(tmp_path: Path) -> None:
    stale = tmp_path / ".last.ckpt.k1ll3d_x.ckpt"  # what atomic_write leaves when the process is killed mid-write
    stale.write_bytes(b"half a checkpoint")
    others = [tmp_path / ".best.ckpt.abcdefgh.ckpt", tmp_path / "last.ckpt.bak"]
    for path in others:
        path.write_bytes(b"keep")
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "last.ckpt")
    assert not stale.exists() and all(p.exists() for p in others)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.ckpt.abcdefgh.ckpt", "last.ckpt", "last.ckpt.bak"]


# --- video: PyAV where decord fails, a ceiling on skipped clips ---------------------------------------------------


@pytest.fixture(scope="module")
def narrow_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four valid H.264 clips 16 px wide (decord fails on them), one garbage file, and lists of them."""
    root = tmp_path_factory.mktemp("narrow")
    rng = np.random.default_rng(0)
    for n in range(4):
        write_mp4(root / f"{n}.mp4", deforming_shape_clip(rng, MOTION_CLASSES[n % 2], size=32, num_frames=8)[:, :, :16])
    (root / "garbage.mp4").write_bytes(rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
    (root / "cut.mp4").write_bytes((root / "0.mp4").read_bytes())
    truncate(root / "cut.mp4", keep=0.5)
    (root / "classes.txt").write_text("\n".join(MOTION_CLASSES[:2]) + "\n")
    (root / "good.txt").write_text("".join(f"{n}.mp4 {n % 2}\n" for n in range(4)))
    (root / "bad.txt").write_text("garbage.mp4 0\n" * 4)
    (root / "mixed.txt").write_text("".join(f"{n}.mp4 {n % 2}\n" for n in range(4)) + "garbage.mp4 0\ncut.mp4 1\n")
    (root / "undecodable.txt").write_text("garbage.mp4 0\ncut.mp4 1\n")
    return root


def narrow_data(root: Path, train_list: str = "good.txt", **kw) -> VideoDataModule:
    return VideoDataModule(
        str(root), train_list=train_list, val_list="good.txt", class_names="classes.txt", num_frames=4,
        sampling_rate=1, jitter_scales=(16, 16), crop_size=16, batch_size=2, num_workers=0, **kw,
    )


def test_pyav_reads_the_clips_decord_cannot(narrow_clips: Path) -> None:
    import decord

    with pytest.raises(decord.DECORDError):
        decord.VideoReader(str(narrow_clips / "0.mp4")).get_batch([0]).asnumpy()
    dm = narrow_data(narrow_clips)
    dm.setup("validate")
    batch = collate_clips([dm.datasets["val"][i] for i in range(4)])
    assert batch["readers"] == ["pyav"] * 4 and batch["skipped"] == []
    assert batch["input"].shape == (4, 3, 4, 16, 16)


def test_a_run_whose_clips_fail_to_decode_stops_naming_them(narrow_clips: Path, tmp_path: Path) -> None:
    from tasks.video import VideoClassificationModule

    module = VideoClassificationModule(
        backbone="timesformer_nano_patch8", backbone_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2,
                                                             "num_frames": 4, "img_size": 16}, num_classes=2,
    )
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="garbage.mp4"), pytest.raises(DataError) as err:
        trainer.fit(module, narrow_data(narrow_clips, "bad.txt", check_files="none"))  # found in training
    assert "max_skipped_fraction=0.1" in str(err.value) and str(narrow_clips / "garbage.mp4") in str(err.value)
    assert trainer.global_step == 0  # stopped at the first batch, nothing trained


@pytest.mark.parametrize("mode", ["full", "header"])
def test_undecodable_clips_are_all_listed_at_setup(narrow_clips: Path, mode: str, capsys) -> None:
    with pytest.raises(DataError, match=r"2 undecodable train clip\(s\) of 6, more than max_skipped_fraction=0\.1") as err:
        narrow_data(narrow_clips, "mixed.txt", check_files=mode).setup("fit")
    assert all(f"{narrow_clips / name}: cannot be decoded: decord: " in str(err.value) for name in ("garbage.mp4", "cut.mp4"))
    assert err.value.one_line().startswith(f"{narrow_clips / 'garbage.mp4'}: cannot be decoded")
    assert f"checked 6 train clips ({mode}) in" in capsys.readouterr().out
    dm = narrow_data(narrow_clips, "mixed.txt", check_files=mode, max_skipped_fraction=0.5)
    with pytest.warns(UserWarning) as warned:  # within the share: left out, each named
        dm.setup("fit")
    assert sorted(Path(str(w.message).split(":")[0].removeprefix("leaving out ")).name for w in warned) == ["cut.mp4", "garbage.mp4"]
    assert [s.path.name for s in dm.datasets["train"].samples] == ["0.mp4", "1.mp4", "2.mp4", "3.mp4"]


@pytest.mark.slow
def test_cli_stops_before_training_on_undecodable_clips(narrow_clips: Path, tmp_path: Path) -> None:
    from tasks.video import main

    args = [
        "fit", f"--data.root={narrow_clips}", "--data.val_list=good.txt", "--data.class_names=classes.txt",
        "--data.num_frames=4", "--data.sampling_rate=1", "--data.jitter_scales=[16, 16]", "--data.crop_size=16",
        "--data.num_workers=0", "--model.backbone=timesformer_nano_patch8", "--trainer.logger=false",
        "--model.backbone_kwargs={embed_dim: 16, depth: 1, num_heads: 2, num_frames: 4, img_size: 16}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
    ]
    with pytest.raises(DataError, match=r"2 undecodable train clip\(s\) of 2") as err:  # every clip: in-process
        main([*args, "--data.train_list=undecodable.txt"])
    assert "garbage.mp4" in str(err.value) and "cut.mp4" in str(err.value)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("VISION_SUITE_VERBOSE", None)
    run = subprocess.run([sys.executable, "-m", "tasks.video", *args, "--data.train_list=mixed.txt"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {narrow_clips / 'garbage.mp4'}: cannot be decoded"), run.stderr[-3000:]
    assert lines[-1].endswith("(and 1 more undecodable train clip(s) of 6, more than max_skipped_fraction=0.1, listed above)")
    assert any(line.strip().startswith(f"{narrow_clips / 'cut.mp4'}: cannot be decoded") for line in lines)
    assert "Traceback" not in run.stderr and not (tmp_path / "checkpoints").exists()  # no step was trained


# --- the command line's last line -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_prints_a_bad_data_root_as_one_line_without_traceback(tmp_path: Path) -> None:
    root = write_shapes(tmp_path / "shapes", train_per_class=2, val_per_class=1)
    bad = truncate(save_image(root / "val" / "square" / "scan.jpg"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("VISION_SUITE_VERBOSE", None)
    run = subprocess.run(
        [sys.executable, "-m", "tasks.classification", "validate", f"--data.root={root}", "--data.num_workers=0",
         "--model.backbone=vit_tiny_patch16", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert lines[-1].startswith(f"error: {bad}: OSError"), run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout


def test_verbose_switch_shows_the_traceback_and_still_ends_with_the_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("VISION_SUITE_VERBOSE", "1")
    with pytest.raises(SystemExit) as exit_info, input_errors_in_one_line():
        raise DataError("/data/x.png: cannot read image")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1] == "error: /data/x.png: cannot read image"


def test_an_error_raised_in_a_loader_worker_keeps_its_one_line() -> None:
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("cannot read image /data/y.jpg: OSError: image file is truncated")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(InputError) as err:
        wrapped.reraise()
    assert err.value.one_line() == "cannot read image /data/y.jpg: OSError: image file is truncated"


def test_an_input_error_wrapped_by_a_library_is_still_one_line(monkeypatch, capsys) -> None:
    monkeypatch.delenv("VISION_SUITE_VERBOSE", raising=False)
    with pytest.raises(SystemExit), input_errors_in_one_line():
        try:
            raise DataError("/data/ct_3.nii.gz: cannot read the volume: EOFError: truncated")
        except DataError as err:
            raise RuntimeError("applying transform <LoadVolumesd object at 0x7f>") from err
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: /data/ct_3.nii.gz: cannot read the volume: EOFError: truncated"
    assert "Traceback" not in err
    with pytest.raises(KeyError), input_errors_in_one_line():  # not the user's input: the traceback stays
        raise KeyError("a bug")


def test_a_checkpoint_of_other_classes_or_another_class_order_is_refused() -> None:
    from tasks.classification import ClassificationModule

    def module(names):
        tiny = {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}
        return ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=tiny, num_classes=3, class_names=names)

    trained = module(["circle", "square", "cross"])
    ckpt = {}
    trained.on_save_checkpoint(ckpt)
    module(["circle", "square", "cross"]).on_load_checkpoint(ckpt)  # the same classes load
    unnamed = module(None)
    unnamed.on_load_checkpoint(ckpt)  # data without class names (a predict folder) takes the checkpoint's
    assert unnamed.class_names == ["circle", "square", "cross"]
    numbered = module(["0", "1", "2"])
    numbered.on_load_checkpoint(ckpt)  # data that only numbers its classes takes the checkpoint's names
    assert numbered.class_names == ["circle", "square", "cross"]
    with pytest.raises(ValueError, match=r"another order: an image folder's classes are its sub-folders sorted"):
        module(["circle", "cross", "square"]).on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"the checkpoint's classes are \['circle', 'square', 'cross'\], the data's "
                                         r"are \['a', 'b', 'c'\]; evaluate on data"):
        module(["a", "b", "c"]).on_load_checkpoint(ckpt)


def test_an_empty_built_in_split_is_refused() -> None:
    from datamodules.classification import ClassificationDataModule

    with pytest.raises(ValueError, match="synthetic_val_per_class must be 1 or more, got 400 and 0"):
        ClassificationDataModule(synthetic_val_per_class=0)


def test_an_empty_built_in_video_split_is_refused() -> None:
    from datamodules.video import VideoDataModule

    with pytest.raises(ValueError, match="synthetic_per_class and synthetic_val_per_class must be 1 or more, got 128 and 0"):
        VideoDataModule(synthetic_val_per_class=0)
